"""Scoring speed: nacd's direct scorer against lm-evaluation-harness on the same questions.

    nice -n 10 .venv/bin/python bench/scoring_speed.py --data-dir ../shared/data \
        --arc-limit 100 --mmlu-limit 2 --json bench/results/scoring_speed.json

Both score every choice's log-likelihood; the direct scorer runs the output layer only at the
positions it scores, the harness at every position (and log-softmaxes them all). For each model and
benchmark: wall time of each, their ratio, and whether they agree (accuracy, predictions that
differ, largest log-likelihood difference). Prints a table and writes JSON after every measurement.
``--*-limit`` is per task as in lm-eval (MMLU: per subject).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table


def compare(model, tok, benchmark: str, split: str, data_dir: str, limit: int | None, batch_size: int,
            max_logits_gib: float) -> dict:
    from nacd.evaluation.run import score

    runs = {method: score(model, tok, benchmark, split, data_dir, 0, limit, batch_size, method, max_logits_gib)
            for method in ("lm_eval", "direct")}
    harness, direct = runs["lm_eval"], runs["direct"]
    pairs = list(zip(harness["_questions"], direct["_questions"]))
    assert all(a["id"] == b["id"] for a, b in pairs)
    return {"benchmark": benchmark, "split": split, "limit": limit, "questions": harness["n"],
            "lm_eval_s": harness["wall_s"], "direct_s": direct["wall_s"],
            "speedup": harness["wall_s"] / direct["wall_s"],
            "lm_eval_batch": harness["batch_size"], "direct_batch": direct["batch_size"],
            "acc_lm_eval": harness.get("acc_macro", harness["acc"]), "acc_direct": direct.get("acc_macro", direct["acc"]),
            "predictions_differing": sum(a["pred"] != b["pred"] for a, b in pairs),
            "max_abs_loglik_diff": max(abs(x - y) for a, b in pairs
                                       for x, y in zip(a["loglikelihoods"], b["loglikelihoods"]))}


def main() -> None:
    import torch

    from nacd.config import MAX_LOGITS_GIB
    from nacd.evaluation.run import load_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--arc-limit", type=int, default=100)
    ap.add_argument("--mmlu-limit", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-logits-gib", type=float, default=MAX_LOGITS_GIB)
    ap.add_argument("--json", type=Path, default=Path("bench/results/scoring_speed.json"))
    args = ap.parse_args()

    rows = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model, tok = load_target(name)
        for benchmark, split, limit in [("arc_easy", "validation", args.arc_limit), ("mmlu", "val", args.mmlu_limit)]:
            rows.append({"model": name, **compare(model, tok, benchmark, split, args.data_dir, limit,
                                                  args.batch_size, args.max_logits_gib)})
            args.json.write_text(json.dumps({"batch_size": args.batch_size, "max_logits_gib": args.max_logits_gib,
                                             "threads": torch.get_num_threads(), "rows": rows},
                                            indent=2) + "\n")
    print_table(rows, [("model", lambda r: r["model"]), ("benchmark", lambda r: r["benchmark"]),
                       ("questions", lambda r: str(r["questions"])),
                       ("lm_eval s", lambda r: f"{r['lm_eval_s']:.1f}"), ("direct s", lambda r: f"{r['direct_s']:.1f}"),
                       ("speedup", lambda r: f"{r['speedup']:.2f}x"),
                       ("batch lm_eval/direct", lambda r: f"{r['lm_eval_batch']}/{r['direct_batch']}"),
                       ("acc lm_eval", lambda r: f"{100 * r['acc_lm_eval']:.2f}"),
                       ("acc direct", lambda r: f"{100 * r['acc_direct']:.2f}"),
                       ("preds differing", lambda r: str(r["predictions_differing"])),
                       ("max |d loglik|", lambda r: f"{r['max_abs_loglik_diff']:.1e}")])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
