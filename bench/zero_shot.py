"""Zero-shot ARC-Easy validation and MMLU val accuracy of the real models, with wall time.

    nice -n 10 .venv/bin/python bench/zero_shot.py --data-dir ../shared/data \
        --arc-limit 100 --mmlu-limit 2 --json bench/zero_shot.json

Prints a table and writes JSON (rewritten after every measurement, so a partial run keeps what it
measured). ``--*-limit`` is per task as in lm-eval (MMLU: per subject); omit for the full sets.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    from nacd.evaluation.run import load_target, score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--arc-limit", type=int, default=None)
    ap.add_argument("--mmlu-limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--method", default="lm_eval", choices=["lm_eval", "direct"])
    ap.add_argument("--json", default="bench/zero_shot.json")
    args = ap.parse_args()

    rows = []
    for name in args.models:
        start = time.time()
        model, tok = load_target(name)
        load_s = time.time() - start
        for bench, split, limit in [("arc_easy", "validation", args.arc_limit), ("mmlu", "val", args.mmlu_limit)]:
            r = score(model, tok, bench, split, args.data_dir, 0, limit, args.batch_size, args.method)
            r.pop("_questions")
            rows.append({"model": name, "load_s": round(load_s, 1), "torch_threads": __import__("torch").get_num_threads(),
                         **{k: r.get(k) for k in ("benchmark", "split", "shots", "limit", "n", "acc",
                                                  "acc_norm", "acc_macro", "method", "wall_s")}})
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
            print(f"{name:24s} {bench:9s} {split:10s} n={r['n']:5d} acc={r['acc']:.4f} "
                  f"acc_norm={r['acc_norm']:.4f} macro={r.get('acc_macro') or float('nan'):.4f} "
                  f"wall={r['wall_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
