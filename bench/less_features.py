"""LESS's per-example gradients: one backward per example (before) against one vmapped pass per batch.

    nice -n 10 .venv/bin/python bench/less_features.py --data-dir ../shared/data --examples 32 \
        --batches 1,4,16 --json bench/results/less_features.json

Both take SmolLM2's LoRA gradient of each example's mean response-token loss on the same real
ARC-Easy train rows. Per batch size: seconds and ATen calls per example of each, their ratios, and
the largest difference between the two gradients relative to the gradient's norm. The calls are the
number that carries to a GPU, where a batch-1 pass is bound by per-operator overhead: on the one
H200 run, a distillation step of about 74k calls took 0.59 s, 8 us a call
(bench/results/quality_gpu_2026-11-30.json). Prints a table and writes JSON after every batch size.

Measured (bench/results/less_features.json, 32 rows, 2 shared CPU cores): a vmapped pass of 16
makes 1,840 calls an example against 21,908, 11.9x fewer, and took 3.2 s an example against 16.9 s;
the gradients agree to 6e-6 of their norm (float32).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ops import count_aten_calls
from _table import print_table


def one_backward_per_example(model, names: list[str], examples: list[dict]):
    """The peer: what nacd's LESS did before, the model's own loss and one backward per example."""
    import torch

    named = dict(model.named_parameters())
    rows = []
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [named[n] for n in names])]))
    return torch.stack(rows)


def measure(fn, model, names, examples, batch: int):
    """(gradients, seconds per example, ATen calls per example) of ``fn`` over ``batch``-sized chunks."""
    import torch

    chunks = [examples[i:i + batch] for i in range(0, len(examples), batch)]
    start = time.perf_counter()
    grads = torch.cat([fn(model, names, c) for c in chunks]).float()
    seconds = time.perf_counter() - start
    calls_per_example = count_aten_calls(lambda: fn(model, names, chunks[0])) / len(chunks[0])
    return grads, seconds / len(examples), calls_per_example


def main() -> None:
    import torch

    from nacd.config import DataConfig, DataSourceConfig, ParamSpaceConfig, RunConfig
    from nacd.data.prepare import prepare_data
    from nacd.models import ParamSpace, load_model, make_trainable
    from nacd.selection.common import load_pool
    from nacd.selection.less import example_grads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("bench/results/less_features.json"))
    args = ap.parse_args()

    cfg = RunConfig(data=DataConfig(sources=[DataSourceConfig(name="arc_easy", split="train", max_rows=args.examples)],
                                    data_dir=args.data_dir, max_length=256))
    space_cfg = ParamSpaceConfig(kind="lora", lora_r=args.lora_r)
    model = make_trainable(load_model(args.model), space_cfg).eval()
    space = ParamSpace.from_model(model, space_cfg)
    with torch.no_grad():  # LoRA B starts at zero, which would leave every A gradient zero
        space.set(model, space.get(model) + 1e-3 * torch.randn(space.numel, generator=torch.Generator().manual_seed(0)))
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(cfg, Path(tmp) / "pool")
        pool = load_pool(Path(tmp) / "pool")
        examples = [pool[i] for i in range(len(pool))]
    reference, ref_s, ref_calls = measure(one_backward_per_example, model, space.names, examples, 1)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        grads, s, calls = measure(example_grads, model, space.names, examples, batch)
        err = float(((grads - reference).norm(dim=1) / reference.norm(dim=1)).max())
        rows.append({"batch": batch, "examples": len(examples), "tokens_mean": sum(len(e["input_ids"]) for e in examples) / len(examples),
                     "loop_s_per_example": ref_s, "batched_s_per_example": s, "speedup": ref_s / s,
                     "loop_aten_calls_per_example": ref_calls, "batched_aten_calls_per_example": calls,
                     "calls_ratio": ref_calls / calls, "max_rel_grad_diff": err})
        print_table(rows, [("batch", lambda r: str(r["batch"])),
                           ("loop s/ex", lambda r: f"{r['loop_s_per_example']:.3f}"),
                           ("vmap s/ex", lambda r: f"{r['batched_s_per_example']:.3f}"),
                           ("speedup", lambda r: f"{r['speedup']:.2f}"),
                           ("loop calls/ex", lambda r: f"{r['loop_aten_calls_per_example']:.0f}"),
                           ("vmap calls/ex", lambda r: f"{r['batched_aten_calls_per_example']:.0f}"),
                           ("calls ratio", lambda r: f"{r['calls_ratio']:.1f}"),
                           ("max rel diff", lambda r: f"{r['max_rel_grad_diff']:.1e}")])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "model": args.model,
                                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
