"""Expert training throughput: ``nacd.experts.train_expert`` against a plain HF ``Trainer``.

Both train the same model (LoRA, same seed), on the same tokenised rows (real ARC-Easy train
rows, prepared by ``prepare_data``), with the same optimizer, micro-batch, accumulation and number
of optimizer steps (the Trainer is fed nacd's exact micro-batches in nacd's order, so both
process the same tokens), in the same process, alternating ``--repeats`` times (best of each kept, so
neither side pays for a cold start). nacd also writes a checkpoint to the trajectory store every
``--save-every`` steps; the Trainer saves nothing. The ratio nacd / Trainer in tokens per second
is therefore the cost of recording trajectories plus any loop overhead (target >= 0.95).

    .venv/bin/python bench/expert_throughput.py --json /tmp/expert_throughput.json           # CPU
    .venv/bin/python bench/expert_throughput.py --dtype bfloat16 --steps 60 --micro-batch 16 \\
        --json out.json                                                                      # GPU

Rows ``{impl, model, device, dtype, steps, tokens, wall_s, tokens_per_s, checkpoints}`` plus the
ratio go to ``--json``; a table is printed.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nacd.config import RunConfig, load_config
from nacd.data.prepare import prepare_data
from nacd.experts import (load_token_rows, make_optimizer, make_plan, make_scheduler, step_micro_batches,
                          train_expert)
from nacd.models import load_model, make_trainable

from _table import print_table  # bench/ is on sys.path when this script runs

REPO = Path(__file__).resolve().parents[1]


def run_nacd(cfg: RunConfig, dataset: Path, store: str) -> dict:
    summary = train_expert(cfg, dataset, store, 0)
    return {"impl": "nacd.train_expert", "tokens": summary["tokens"], "wall_s": summary["wall_s"],
            "checkpoints": summary["checkpoints"]}


def run_trainer(cfg: RunConfig, dataset: Path, device: torch.device) -> dict:
    """The reference: HF Trainer, same model/seed/optimizer/batches, no checkpoints."""
    from transformers import Trainer, TrainingArguments

    from torch.utils.data import SequentialSampler

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    rows = load_token_rows(dataset)
    ecfg = cfg.experts
    seed = ecfg.base_seed
    torch.manual_seed(seed)
    model = make_trainable(load_model(cfg.source.name, dtype=cfg.source.dtype, device=device),
                           cfg.source.param_space, seed=seed).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, ecfg)
    sched = make_scheduler(opt, ecfg, ecfg.max_steps)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    counted = {"tokens": 0}

    # the very micro-batches nacd trains on, in its order: each dataset item is one micro-batch
    plan = make_plan(ecfg, len(rows))
    micro = [mb for step in range(ecfg.max_steps) for mb in step_micro_batches(plan, seed, step)]

    def collate(items: list[list[int]]) -> dict:
        batch = rows.collate(items[0], pad, cfg.data.max_length)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=1,
            gradient_accumulation_steps=ecfg.grad_accum, max_steps=ecfg.max_steps, save_strategy="no",
            report_to=[], logging_steps=10**9, disable_tqdm=True, use_cpu=device.type == "cpu",
            remove_unused_columns=False, dataloader_drop_last=True, seed=seed)
        trainer = InOrderTrainer(model=model, args=args, train_dataset=micro,
                          data_collator=collate, optimizers=(opt, sched))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return {"impl": "hf.Trainer", "tokens": counted["tokens"], "wall_s": round(wall, 3), "checkpoints": 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--store", default=None, help="trajectory store URI (default: a temp folder)")
    p.add_argument("--json", required=True)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="nacd-bench-experts-") as tmp:
        base = [f"source.name={args.model}", f"source.dtype={args.dtype}", f"data.data_dir={args.data_dir}",
                f"data.sources=[{{name: arc_easy, max_rows: {args.rows}}}]", f"data.max_length={args.max_length}",
                "data.overflow=truncate", f"experts.max_steps={args.steps}", f"experts.save_every={args.save_every}",
                f"experts.micro_batch={args.micro_batch}", f"experts.grad_accum={args.grad_accum}",
                "experts.optimizer=sgd", "experts.lr=1e-3", "experts.log_every=1000000"]
        cfg = load_config(None, base)
        dataset = Path(tmp) / "data"
        prepare_data(cfg, dataset)
        results: dict[str, list[dict]] = {"hf.Trainer": [], "nacd.train_expert": []}
        for r in range(args.repeats):
            results["hf.Trainer"].append(run_trainer(cfg, dataset, device))
            # a fresh store each time: a re-run with the same config would be reused, not trained
            store = f"{args.store.rstrip('/')}/rep{r}" if args.store else str(Path(tmp) / f"store{r}")
            results["nacd.train_expert"].append(run_nacd(cfg, dataset, store))

    rows = []
    for impl, runs in results.items():
        best = min(runs, key=lambda x: x["wall_s"] / max(1, x["tokens"]))
        rows.append({**best, "model": args.model, "device": str(device), "dtype": args.dtype,
                     "steps": args.steps, "tokens_per_s": round(best["tokens"] / best["wall_s"], 1),
                     "all_tokens_per_s": [round(x["tokens"] / x["wall_s"], 1) for x in runs]})
    by = {r["impl"]: r for r in rows}
    ratio = by["nacd.train_expert"]["tokens_per_s"] / by["hf.Trainer"]["tokens_per_s"]
    print_table(rows, [("impl", lambda r: r["impl"]), ("device", lambda r: r["device"]),
                       ("dtype", lambda r: r["dtype"]), ("steps", lambda r: str(r["steps"])),
                       ("tokens", lambda r: str(r["tokens"])), ("wall s", lambda r: f"{r['wall_s']:.2f}"),
                       ("tok/s", lambda r: f"{r['tokens_per_s']:.1f}"), ("ckpts", lambda r: str(r["checkpoints"]))])
    print(f"ratio nacd / Trainer (tokens/s): {ratio:.3f}  (target >= 0.95)")
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
