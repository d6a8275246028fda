"""How much does the stretch of expert trajectory that distillation matches teach?

Trajectory matching can at best teach a student what the expert learnt between the checkpoints it
matches. This scores the source model at chosen checkpoints of an expert trained by
``bench/quality.py`` (same scorer, same benchmarks), next to the step-0 model:

    <out>/expert_quality.json   one row per (expert, checkpoint, benchmark)
    <out>/expert_quality.md     the table

    python bench/expert_quality.py --work bench/results/work-small-st --setting A --data-dir ../shared/data

``--ablation NAME`` scores the experts of an ablation that trains its own (one that sets
``experts.*``, e.g. ``straight_through_expert_lr_2e-1``), into ``expert_quality-NAME.{json,md}``.
``--combine A.json B.json`` scores nothing and joins earlier runs on the same store into one table.

By default it scores checkpoint 0 (the LoRA init: the model itself), the farthest checkpoint a
distillation target can be (``distill.max_start - 1 + distill.expert_epochs``) and the last one.
One evaluation on the 570 ARC-Easy validation questions takes about 2.5 min on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402  (the benchmark's settings and config builder)


def checkpoint_indices(spec: str, cfg, length: int) -> list[int]:
    """``0,matched,last`` or numbers -> sorted distinct checkpoint indices of a trajectory."""
    named = {"matched": cfg.distill.max_start - 1 + cfg.distill.expert_epochs, "last": length - 1}
    out = set()
    for item in spec.split(","):
        index = named[item] if item in named else int(item)
        if not 0 <= index < length:
            raise SystemExit(f"expert_quality.py: checkpoint {item!r} = {index} is not in 0..{length - 1}")
        out.add(index)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of bench/quality.py")
    ap.add_argument("--scale", choices=["small", "full"], default="small")
    ap.add_argument("--setting", choices=sorted(quality.SETTINGS), default="A")
    ap.add_argument("--ablation", default="", choices=["", *quality.ABLATIONS],
                    help="score the experts an ablation of bench/quality.py trained (one that sets experts.*)")
    ap.add_argument("--experts", default="0", help="comma list of expert indices")
    ap.add_argument("--checkpoints", default="0,matched,last")
    ap.add_argument("--combine", type=Path, nargs="+", default=[], metavar="JSON",
                    help="score nothing: join earlier runs' expert_quality JSON files of this store into one table")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    a = ap.parse_args(argv)

    plan = quality.parse_args(["--scale", a.scale, "--work", str(a.work), "--out", str(a.out)]
                              + (["--data-dir", a.data_dir] if a.data_dir else []))
    overrides = quality.ablation_overrides(a.ablation)
    if a.ablation and not any(o.startswith("experts.") for o in overrides):
        raise SystemExit(f"expert_quality.py: ablation {a.ablation!r} shares the setting's experts; leave it out")
    cfg = quality.setting_config(plan, a.setting, 0.05, 0, overrides)
    store = str(quality.store_dir(a.work, a.setting, a.ablation))
    command = "python bench/expert_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = {"setting": a.setting, "experts": cfg.experts.model_dump(mode="json"),
           "distill": cfg.distill.model_dump(mode="json"), "store": store, "commands": [command]}
    if a.combine:
        doc = combine(doc, a.combine)
    else:
        doc["rows"] = score(cfg, a.setting, store, [int(e) for e in a.experts.split(",")], a.checkpoints)
    write_report(doc, a.out, f"expert_quality-{a.ablation}" if a.ablation else "expert_quality")
    return 0


def score(cfg, setting: str, store: str, experts: list[int], checkpoints: str) -> list[dict]:
    """One row per (expert, checkpoint, benchmark): the source model with that checkpoint's LoRA."""
    from nacd.evaluation.run import load_expert_checkpoint, score_benchmarks
    from nacd.trajectories import open_store

    rows = []
    for expert in experts:
        trajectory = open_store(store).expert(expert)
        for index in checkpoint_indices(checkpoints, cfg, len(trajectory)):
            start = time.time()
            model, tokenizer, step = load_expert_checkpoint(cfg, store, expert, index)
            for result in score_benchmarks(model, tokenizer, cfg):
                rows.append({"setting": setting, "expert": expert, "checkpoint": index, "step": step,
                             "examples_seen": step * cfg.experts.micro_batch * cfg.experts.grad_accum,
                             **result, "wall_s": round(time.time() - start, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def combine(doc: dict, paths: list[Path]) -> dict:
    """``doc`` (this invocation: store, configs, command) with the rows of earlier runs on the same
    store and configs; a checkpoint scored twice keeps the later file's row."""
    rows: dict[tuple, dict] = {}
    commands: list[str] = []
    for path in paths:
        earlier = json.loads(path.read_text())
        for field in ("store", "experts", "distill"):
            # a file from before a config field existed was made with its neutral value
            if quality.with_added_fields({field: earlier.get(field)}) != quality.with_added_fields({field: doc[field]}):
                raise SystemExit(f"expert_quality.py: {path}: '{field}' differs from this store's "
                                 f"({earlier.get(field)!r} vs {doc[field]!r}); combine runs of one store only")
        commands += earlier.get("commands", [])
        rows.update({(r["expert"], r["checkpoint"], r["benchmark"]): r for r in earlier["rows"]})
    return {**doc, "commands": commands + doc["commands"], "rows": [rows[k] for k in sorted(rows)]}


def write_report(doc: dict, out: Path, stem: str) -> None:
    """``<out>/<stem>.json`` and ``.md`` (the table, then every command that made its rows)."""
    from nacd.storage import write_bytes

    experts, distill = doc["experts"], doc["distill"]
    lines = ["# Expert checkpoints scored like a target", "",
             f"Setting {doc['setting']}, store `{doc['store']}`; SGD lr {experts['lr']}, a checkpoint every "
             f"{experts['save_every']} steps; distillation targets reach checkpoint "
             f"{distill['max_start'] - 1 + distill['expert_epochs']} at most.", "",
             "| expert | checkpoint | step | examples seen | benchmark | n | acc (%) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['expert']} | {r['checkpoint']} | {r['step']} | {r['examples_seen']} | {r['benchmark']} | "
              f"{r['n']} | {100 * r['acc']:.1f} |" for r in doc["rows"]]
    lines += ["", "Commands:", *[f"- `{c}`" for c in doc["commands"]]]
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(str(out / f"{stem}.json"), json.dumps(doc, indent=1).encode())
    write_bytes(str(out / f"{stem}.md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
