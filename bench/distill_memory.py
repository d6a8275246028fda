"""Memory and speed of the distillation gradient engines against the shared plain-unroll reference.

Runs ``../shared/bench/mtt_reference.py`` (``mtt-reference``), nacd's exact ``reverse`` engine and
its ``first_order`` approximation on the same model (the reference's own LoRA Llama of the chosen
shape), the same synthetic inputs and the same minibatch schedule. Every row runs in a fresh
process so its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated`` over the timed
repeats, on CPU the child's peak RSS (``ru_maxrss``; it includes the interpreter and torch, see
``setup_memory_gib`` for the level before the first outer step).

    python bench/distill_memory.py --device cpu --shape tiny --steps 1,2,4,8,16,32,64 --json out.json
    python bench/distill_memory.py --device cuda --shape smollm2-135m --dtype bfloat16 --steps 1,8,16,64

Rows: {impl, steps, seconds_per_outer_step, peak_memory_gib, grad_rel_err_vs_reference, ...};
``grad_rel_err_vs_reference`` is max(relative error of the prompt gradient, of the log_alpha
gradient) against the reference row with the same N (null when the reference ran out of memory).
``aten_calls_per_outer_step`` (and per inner step; ``aten_calls_vs_reference`` against the reference's
in this run) counts ATen calls in one more outer step: on a GPU, where small batches leave every
kernel short, they and not the arithmetic set the time (bench/_ops.py).
Defaults follow the issue's GPU shape: LoRA r=8 on q,v; 64 synthetic samples, batch 8, seed length
256, P = 16. This is a benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _ops import count_aten_calls

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "bench" / "mtt_reference.py"
IMPLS = ("mtt-reference", "reverse", "first_order")


def _reference():
    spec = importlib.util.spec_from_file_location("mtt_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gib_peak(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    """One row: build, warm up once, time ``repeats`` outer steps, save the last gradients."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO))
    from nacd.distill.gradients import total_gradients
    from nacd.distill.losses import Student
    from nacd.distill.synthetic import SyntheticSet
    from nacd.models import ParamSpace

    if args.threads:
        torch.set_num_threads(args.threads)
    ref = _reference()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    cuda = args.device.startswith("cuda")
    model, names = ref.build_model(args.shape, args.device, dtype, args.lora_r)
    prompt, seed_ids, labels, start, target, log_lr = ref.synthetic_inputs(
        model, names, args.k, args.prompt_len, args.seq_len, args.device, dtype)
    n = args.one_steps
    if args.impl != "mtt-reference":
        space = ParamSpace(tuple(names), tuple(tuple(start[x].shape) for x in names))
        student = Student.from_model(model, space)
        syn = SyntheticSet(prompt.detach(), seed_ids, labels, torch.ones_like(seed_ids), log_lr.detach())
        flat_start, flat_target = space.flatten(start), space.flatten(target)
        table = model.get_input_embeddings().weight

    def outer_step(rep: int):
        gen = torch.Generator().manual_seed(rep)  # the reference draws its batches the same way
        if args.impl == "mtt-reference":
            prompt.grad = None
            log_lr.grad = None
            loss = ref.mtt_step(model, names, start, target, prompt, seed_ids, labels, log_lr, n,
                                args.batch, args.beta, gen)
            loss.backward()
            return prompt.grad, log_lr.grad
        schedule = [torch.randperm(args.k, generator=gen)[:args.batch].to(args.device) for _ in range(n)]
        out = total_gradients(args.impl, student, flat_start, flat_target, syn, schedule, beta=args.beta,
                              distance="euclidean", table=table)
        return out.grad_prompt, out.grad_log_alpha

    setup_gib = _gib_peak(args.device)
    times = []
    try:
        for rep in range(args.repeats + 1):
            if cuda:
                torch.cuda.synchronize()
                if rep == 1:
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            g_prompt, g_alpha = outer_step(rep)
            if cuda:
                torch.cuda.synchronize()
            if rep:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return {"impl": args.impl, "steps": n, "oom": True, "note": "out of memory"}
    ops = count_aten_calls(lambda: outer_step(args.repeats + 1))
    save_file({"prompt": g_prompt.detach().float().cpu().contiguous(),
               "log_alpha": g_alpha.detach().float().cpu().reshape(1)}, args.grad_out)
    times.sort()
    return {"impl": args.impl, "steps": n, "seconds_per_outer_step": times[len(times) // 2],
            "seconds_per_inner_step": times[len(times) // 2] / n, "peak_memory_gib": _gib_peak(args.device),
            "setup_memory_gib": setup_gib, "aten_calls_per_outer_step": ops,
            "aten_calls_per_inner_step": round(ops / n), "oom": False}


def run_row(args: argparse.Namespace, impl: str, steps: int, grad_out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--one-steps", str(steps), "--grad-out", grad_out]
    for key in ("device", "shape", "dtype", "k", "batch", "seq_len", "prompt_len", "lora_r", "beta", "repeats",
                "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        oom = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower()
        return {"impl": impl, "steps": steps, "oom": oom,
                "note": ("out of memory (killed)" if oom else f"failed (exit {proc.returncode}): "
                         + proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "no output")}
    return json.loads(lines[-1])


def rel_err(path: str, ref_path: str) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(path), load_file(ref_path)
    errs = {k: float((a[k] - b[k]).norm() / b[k].norm()) for k in ("prompt", "log_alpha")}
    return {"grad_rel_err_vs_reference": max(errs.values()), "prompt_grad_rel_err": errs["prompt"],
            "log_alpha_grad_rel_err": errs["log_alpha"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "smollm2-135m"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", default="1,2,4,8,16,32,64")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--k", type=int, default=64, help="synthetic samples")
    ap.add_argument("--batch", type=int, default=8, help="synthetic samples per student step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=2, help="timed outer steps after one warm-up")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per row (0: torch's default)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--one-steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--grad-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return

    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        ap.error(f"unknown impl(s) {unknown}; choose from {IMPLS}")
    rows = []
    reference_oom = False
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'impl':<14} {'N':>4} {'s/outer':>9} {'s/inner':>9} {'peak GiB':>9} {'setup GiB':>9} "
              f"{'rel err vs ref':>15} {'aten/inner':>11} {'x ref':>6}", flush=True)
        ref_ops: dict[int, int] = {}
        for n in [int(s) for s in args.steps.split(",")]:
            ref_path = f"{tmp}/mtt-reference-{n}.safetensors"
            for impl in impls:
                if impl == "mtt-reference" and reference_oom:  # more steps only need more memory
                    row = {"impl": impl, "steps": n, "oom": True, "note": "out of memory (at fewer steps)"}
                else:
                    path = f"{tmp}/{impl}-{n}.safetensors"
                    row = run_row(args, impl, n, path)
                    if impl == "mtt-reference":
                        reference_oom = reference_oom or row.get("oom", False)
                        row["grad_rel_err_vs_reference"] = 0.0 if not row.get("oom") else None
                    elif not row.get("oom") and "seconds_per_outer_step" in row and Path(ref_path).is_file():
                        row.update(rel_err(path, ref_path))
                    else:
                        row.setdefault("grad_rel_err_vs_reference", None)
                row.update(device=args.device, shape=args.shape, dtype=args.dtype)
                rows.append(row)
                if "seconds_per_outer_step" in row:
                    err = row.get("grad_rel_err_vs_reference")
                    ops = row["aten_calls_per_outer_step"]
                    if impl == "mtt-reference":
                        ref_ops[n] = ops
                    if n in ref_ops:  # the peer's count on the same inputs, this run
                        row["aten_calls_vs_reference"] = round(ops / ref_ops[n], 3)
                    ratio = row.get("aten_calls_vs_reference")
                    print(f"{impl:<14} {n:>4} {row['seconds_per_outer_step']:>9.3f} "
                          f"{row['seconds_per_inner_step']:>9.4f} {row['peak_memory_gib']:>9.3f} "
                          f"{row['setup_memory_gib']:>9.3f} {'-' if err is None else f'{err:.2e}':>15} "
                          f"{row['aten_calls_per_inner_step']:>11} {'-' if ratio is None else f'{ratio:.2f}':>6}",
                          flush=True)
                else:
                    print(f"{impl:<14} {n:>4} {row.get('note', 'failed')}", flush=True)
                if args.json:  # after every row: a long run that is stopped keeps what it measured
                    write_json(args, rows)


def write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    hidden = ("child", "impl", "one_steps", "grad_out")
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in hidden},
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
