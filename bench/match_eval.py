"""Does a distillation make its set match the experts better? L_match of a set on fixed draws.

A distillation's history cannot say: each iteration draws its own expert, start checkpoint and
minibatches, and L_match differs more between draws (0.34 to 1.66 for one set on the ten draws
below) than over a run. This scores sets on the same draws: every expert x every start checkpoint
distillation may draw x ``--schedules`` minibatch schedules, the student's N steps at the set's
alpha, L_match at the end. For each distillation of a ``bench/quality.py`` unit it scores four sets
on the same seed rows:

    initial            the prompt tokens distillation started from, at the initial alpha
    initial, alpha     the same tokens at the learnt alpha (what alpha alone does)
    learnt vectors     the learnt prompt vectors and alpha (what plain distillation trains)
    projected          the learnt vectors' nearest tokens, at the learnt alpha: the text the
                       projection writes (what straight-through distillation trains)

and, paired over draws, on how many each ends nearer the expert than ``initial`` and than
``initial, alpha`` (what the vectors or tokens add beyond alpha).

    python bench/match_eval.py --work bench/results/work-small-st --setting A --budget 0.05 \\
        --seeds 0 --runs ,straight_through_lr_1e-1 --data-dir ../shared/data

``--runs`` names the distillations by ablation ('' for the headline one). Prints a table and writes
JSON after every run (``--json``). A student step is a forward and backward pass (no second order):
both runs of one setting-A small-scale seed take about 5 min on 2 CPU cores.

Measured (bench/results/match_eval.json; setting A 5 %, small scale; 10 draws a set: 2 experts x 5
starts): straight-through's text (``straight_through_lr_1e-1``, 70-109 of 160 tokens changed) ends
nearer the expert than its initial tokens at the same alpha on 47 of 50 draws over seeds 0-4, at
0.90-0.93 of their L_match (geometric mean per seed). Plain distillation's learnt vectors (seeds 0,
3, 4) end at 1.76 (one draw at 56 against 1.1), 0.71 and 0.74 of it, but they project to their
initial tokens, so its text is exactly the initial tokens at the learnt alpha.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import quality  # (the benchmark's settings, ablations and config builder)
from _table import print_table

SETS = ("initial", "initial, alpha", "learnt vectors", "projected")


def draws(num_experts: int, starts: range, num_samples: int, batch: int, steps: int, schedules: int,
          seed: int) -> list[tuple[int, int, list]]:
    """(expert, start, minibatch schedule) for every expert x start x schedule, drawn once so that
    every set is scored on the same ones (minibatches as the distillation loop draws them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(e, t, [torch.randperm(num_samples, generator=g)[:min(batch, num_samples)] for _ in range(steps)])
            for e in range(num_experts) for t in starts for _ in range(schedules)]


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` evenly spaced from the first (all of them for n = 0 or n >= len): on the
    expert-major list of draws, every expert keeps its share of the start range."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


_scored: dict[tuple, list[float]] = {}


def _content(syn) -> str:
    """A digest of what the student trains on: the prompt vectors, alpha and the seed rows."""
    import hashlib

    h = hashlib.sha256()
    for t in (syn.prompt_embeds, syn.log_alpha, syn.seed_input_ids):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def synthetic_dir(unit: Path, run: str) -> Path:
    return unit / f"synthetic{quality.distilled_suffix(run)}"


def score_run(cfg, student, exclude: list[int], unit: Path, store: str, run: str, fixed_draws: int,
              schedules: int, seed: int) -> list[dict]:
    """One row per set of ``SETS`` for the distillation in ``unit/synthetic[-run]``; ``student`` and
    ``exclude`` as ``nacd.distill.run.source_student`` makes them for ``cfg``."""
    import torch

    from nacd.distill.gradients import match_value
    from nacd.distill.synthetic import SyntheticSet
    from nacd.projection import nearest_rows
    from nacd.trajectories import open_store

    d = cfg.distill
    syn_dir = synthetic_dir(unit, run)
    device, dtype = student.table.device, student.table.dtype
    learnt = SyntheticSet.from_pretrained(syn_dir).to(device)  # made on the CPU; the student may be on a GPU
    if learnt.init_prompt_ids is None:
        raise SystemExit(f"match_eval.py: {syn_dir}: its prompt did not start from tokens (init={d.init})")
    experts = open_store(store, cfg.storage).experts()
    nearest, _ = nearest_rows(learnt.prompt_embeds.reshape(-1, learnt.hidden_size), student.table, d.distance,
                              exclude_ids=exclude)
    initial_alpha = torch.tensor(math.log(d.init_alpha), dtype=learnt.log_alpha.dtype, device=device)
    from_tokens = learnt.with_learnable_vectors(student.table[learnt.init_prompt_ids.reshape(-1)])
    sets = {"initial": replace(from_tokens, log_alpha=initial_alpha),
            "initial, alpha": from_tokens, "learnt vectors": learnt,
            "projected": learnt.with_learnable_vectors(student.table[nearest])}
    changed = int((nearest != learnt.init_prompt_ids.reshape(-1)).sum())
    fixed = spread(draws(len(experts), range(d.min_start, d.max_start), learnt.num_samples, d.batch_syn,
                         d.syn_steps, schedules, seed), fixed_draws)
    pairs = {}  # (expert, start) -> (theta*_t, theta*_{t+M}), read once for all sets
    rows = []
    for name in SETS:
        started = time.perf_counter()
        key = (str(unit), store, _content(sets[name]), len(fixed))
        if key not in _scored:  # runs of one seed start from the same set: score it once
            values = []
            for e, t, schedule in fixed:
                if (e, t) not in pairs:
                    pairs[(e, t)] = (experts[e].read(t).to(device, dtype),
                                     experts[e].read(t + d.expert_epochs).to(device, dtype))
                start, target = pairs[(e, t)]
                values.append(match_value(student, start, target, sets[name], schedule))
            _scored[key] = values
        values = _scored[key]
        rows.append({"run": run or "distilled", "set": name, "alpha": float(sets[name].log_alpha.exp()),
                     "tokens_changed": changed if name == "projected" else 0, "tokens": len(nearest),
                     "draws": [{"expert": e, "start": t, "l_match": v} for (e, t, _), v in zip(fixed, values)],
                     "l_match_mean": statistics.fmean(values), "l_match_median": statistics.median(values),
                     "seconds": round(time.perf_counter() - started, 1)})
    # paired over draws: how often a set ends nearer the expert than the initial set, and than the
    # initial tokens at the set's own alpha (what the vectors or tokens add beyond alpha)
    initial, at_alpha = ([x["l_match"] for x in rows[i]["draws"]] for i in (0, 1))
    for row in rows:
        row["better_than_initial"] = sum(x["l_match"] < i for x, i in zip(row["draws"], initial))
        row["better_than_initial_alpha"] = sum(x["l_match"] < i for x, i in zip(row["draws"], at_alpha))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of bench/quality.py")
    ap.add_argument("--scale", choices=["small", "full"], default="small")
    ap.add_argument("--setting", choices=sorted(quality.SETTINGS), default="A")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--runs", default=",straight_through_lr_1e-1",
                    help="comma list of distillations by ablation name; empty for the headline one")
    ap.add_argument("--schedules", type=int, default=1, help="minibatch schedules per (expert, start)")
    ap.add_argument("--draws", type=int, default=0, help="score this many of the draws, spread evenly over experts and starts (0: all)")
    ap.add_argument("--draw-seed", type=int, default=1234)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", type=Path, default=BENCH / "results" / "match_eval.json")
    a = ap.parse_args(argv)
    from nacd.storage import write_bytes

    runs = a.runs.split(",")
    unknown = [r for r in runs if r and r not in quality.ABLATIONS]
    if unknown:
        raise SystemExit(f"match_eval.py: --runs: unknown ablation(s) {unknown}; choose from {', '.join(quality.ABLATIONS)}")
    plan = quality.parse_args(["--scale", a.scale, "--work", str(a.work)] + (["--data-dir", a.data_dir] if a.data_dir else [])
                              + [x for o in a.overrides for x in ("--set", o)])
    command = "python bench/match_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    jobs = [(seed, run, quality.unit_dir(a.work, a.setting, a.budget, seed))
            for seed in [int(s) for s in a.seeds.split(",")] for run in runs]
    missing = [str(synthetic_dir(unit, run)) for _, run, unit in jobs
               if not (synthetic_dir(unit, run) / "synthetic.json").is_file()]
    if missing:  # before an hour of scoring, not after it
        raise SystemExit("match_eval.py: no finished distillation in " + ", ".join(missing))
    from nacd.distill.run import source_student

    rows: list[dict] = []
    students: dict[str, tuple] = {}  # one model load per source model and exclusion, not per run
    for seed, run, unit in jobs:
        cfg = quality.setting_config(plan, a.setting, a.budget, seed, quality.ablation_overrides(run))
        source = cfg.source.model_dump_json() + str(cfg.distill.exclude_special_tokens)
        if source not in students:
            student, _, exclude = source_student(cfg)
            students[source] = (student, exclude)
        store = str(quality.store_dir(a.work, a.setting, run))
        rows += [{"setting": a.setting, "budget": a.budget, "seed": seed, **r}
                 for r in score_run(cfg, *students[source], unit, store, run, a.draws, a.schedules, a.draw_seed)]
        write_bytes(str(a.json), json.dumps({"commands": [command], "rows": rows}, indent=1).encode())
    print_table(rows, [("seed", lambda r: str(r["seed"])), ("run", lambda r: r["run"]), ("set", lambda r: r["set"]),
                       ("alpha", lambda r: f"{r['alpha']:.4f}"),
                       ("tokens changed", lambda r: f"{r['tokens_changed']}/{r['tokens']}"),
                       ("L_match mean", lambda r: f"{r['l_match_mean']:.3f}"),
                       ("median", lambda r: f"{r['l_match_median']:.3f}"),
                       ("< initial", lambda r: f"{r['better_than_initial']}/{len(r['draws'])}"),
                       ("< initial, alpha", lambda r: f"{r['better_than_initial_alpha']}/{len(r['draws'])}"),
                       ("s", lambda r: f"{r['seconds']:.0f}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
