"""Quality benchmark: does a distilled set train models better than selection at the same budget,
and does the edge survive the transfer to another architecture?

For each setting (A: ARC-Easy train as instruction data; B: LIMA + Dolly open_qa + FLAN v2 CoT),
budget and seed it runs the library's stages in order (prepare -> experts -> seeds -> distill ->
projection; random; LESS; full; none), fine-tunes every target on every variant with the same
recipe, scores the benchmarks, and writes

    <out>/quality.json   one row per (setting, budget, variant, target, seed, benchmark)
                         (acc: on MMLU the macro average over subjects, acc_micro pooled)
    <out>/quality.md     mean +- std over seeds; distilled - random and distilled - LESS with a
                         paired t-test over seeds
    <out>/quality.png    accuracy against budget per variant

Every unit of work lands in ``<work>/...`` through the stages' atomic writers and is skipped when
already there, so a killed run resumes where it stopped and a rerun only aggregates. Each stage's
config is recorded under ``<work>/.stage-configs/``; a finished stage made under another config
stops the run with the keys that differ, so a stale folder never mixes into the results.
``--report-only`` runs no stage: it puts together what the ``--work`` folder holds for the plan and
lists, in quality.md, every stage it lacks (so one command can report units run by several);
``--notes FILE`` appends a hand-written account of which commands made those stages.
``quality.json`` is the record and the ``--work`` folder a cache: ``--merge QUALITY_JSON`` keeps the
rows of an earlier record that this run does not make again, so a run on a fresh machine adds to the
results instead of replacing them.

    python bench/quality.py --scale small --data-dir ../shared/data   # CPU, reduced
    bench/quality_gpu.sh OUT_DIR                                       # one H200, --scale full
    python bench/quality.py --scale small --only-setting A --budgets 0.05 --seeds 0 --ablations beta0,P4@0
    python bench/quality.py --scale small --report-only --data-dir ../shared/data      # run nothing

Measured on 2 CPU cores (setting A, 5 %): experts 2 x 4 min; per seed distill 7 min, LESS
4.5 min; per evaluation on all 570 ARC-Easy validation questions 2.5 min on SmolLM2 and 6-7 min on
Gemma 3 270M; the full-data variant 12 min on SmolLM2. ``--scale small --only-setting A --budgets
0.05 --seeds 0,1,2 --full-seeds 0 --targets smollm2-135m-instruct`` therefore takes about 75 min
from nothing. Setting B (363-row pool, SmolLM2 only, no full data) took 57 min for one seed: experts
2 x 3.5 min, distill 7, LESS 7, and 9.3 min per evaluation (ARC-Easy 2.2, all 1531 MMLU val
questions 7). With ``--set evaluation.method=direct`` (the same scores; see bench/scoring_speed.py)
a SmolLM2 evaluation of setting B takes 4-5 min (ARC-Easy 1, MMLU 3-3.5), its full-data variant
10 min, and one seed of setting B with full data 41 min with the experts cached; a Gemma 3
evaluation of setting B takes about 8 min (20-30 with the harness). The latest results
are in ``bench/results/quality.md``: its command line, then the notes in
``bench/results/quality-notes.md`` on the earlier commands whose stages it reused.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

SETTINGS: dict[str, dict[str, Any]] = {
    # Setting A: task data. The pool is ARC-Easy train; LESS targets come from held-out train rows.
    "A": {"data": {"sources": [{"name": "arc_easy", "split": "train"}]},
          "evaluation": {"benchmarks": [{"name": "arc_easy", "split": "validation"}]},
          "selection": {"less": {"target_benchmark": "arc_easy"}}},
    # Setting B: general instruction data; LESS targets MMLU dev (5 per subject, as LESS does).
    "B": {"data": {"sources": [{"name": "lima", "split": "train"},
                               {"name": "dolly_open_qa", "split": "train"},
                               {"name": "flan_v2_cot", "split": "train"}]},
          "evaluation": {"benchmarks": [{"name": "arc_easy", "split": "validation"},
                                        {"name": "mmlu", "split": "val"}]},
          "selection": {"less": {"target_benchmark": "mmlu"}}},
}
# PEZ-style: the student trains on the nearest tokens, so what is learnt survives projection; lr 0.1
# is large enough for a prompt vector to reach another token's neighbourhood in 20 iterations
STRAIGHT_THROUGH = ["distill.straight_through=true", "distill.lr_embeddings=0.1"]
# The beta / P / N / M ablations. On the continuous default the projection returns every
# initial token, so they change L_match but never the text; the straight_through_* twins can.
KNOB_ABLATIONS: dict[str, list[str]] = {
    "beta0": ["distill.beta=0"],
    "P4": ["distill.prompt_len=4"], "P16": ["distill.prompt_len=16"],
    "N2": ["distill.syn_steps=2"], "N8": ["distill.syn_steps=8"],
    "M1": ["distill.expert_epochs=1"], "M4": ["distill.expert_epochs=4"],
}
# Ablations of a 5 % unit (setting A, the headline, unless named): dotted config overrides (one that changes the
# experts trains its own), plus "no_projection", which trains the source model on the learnt
# embeddings themselves.
ABLATIONS: dict[str, list[str]] = {
    **KNOB_ABLATIONS,
    **{f"straight_through_{name}": STRAIGHT_THROUGH + overrides for name, overrides in KNOB_ABLATIONS.items()},
    # an embedding learning rate large enough for vectors to reach other tokens' neighbourhoods
    "lr_emb_1e-1": ["distill.lr_embeddings=0.1"],
    "straight_through_lr_1e-1": STRAIGHT_THROUGH,
    # a strong pull to the current token acts as hysteresis: a token changes only where the match
    # gradient keeps asking for it (beta 0.1 over 160 vectors is ~1 % of the match gradient)
    "straight_through_beta10": STRAIGHT_THROUGH + ["distill.beta=10"],
    "straight_through_beta1": STRAIGHT_THROUGH + ["distill.beta=1"],
    # starts drawn along the whole expert path: scored like a target, expert 0 of setting A is at
    # 52.3 -> 51.8 % over the first 12 steps (all the default max_start reaches) and 54.9 % at the end
    "straight_through_start45": STRAIGHT_THROUGH + ["distill.max_start=45"],
    # starts only in the expert's second half: scored like a target, expert 0 of setting A is at 52.3,
    # 51.8, 52.5 and 52.8 % at steps 0, 12, 24 and 48, and 54.9 % at step 98 (what it learns, it
    # learns late); checkpoints 24..47 start at steps 48..94
    "straight_through_start24-48": STRAIGHT_THROUGH + ["distill.min_start=24", "distill.max_start=48"],
    # the same stretch matched for 3x the iterations: after 20, its L_match was still 1.7-2.1 on the
    # last 5 (0.5-0.8 on the first stretch), so it may have stopped before matching what teaches
    "straight_through_start24-48_it60": STRAIGHT_THROUGH + ["distill.min_start=24", "distill.max_start=48",
                                                           "distill.iterations=60"],
    # experts that learn within the matched stretch: at SGD lr 0.05 expert 0 of setting A is at
    # 52.3 -> 51.8 % over the first 12 steps; 4x the lr covers 48 steps' worth of that path there
    # (alpha follows the expert's lr: N = 4 student steps cover M = 2 checkpoints of 2 steps)
    "straight_through_expert_lr_2e-1": STRAIGHT_THROUGH + ["experts.lr=0.2", "distill.init_alpha=0.2"],
    # the seeds are LESS's rows, not random ones: distillation refines the selected samples
    # (distilled is then compared with LESS on the same rows, as distilled with random by default)
    "straight_through_less_seeds": STRAIGHT_THROUGH + ["seed_selection.method=less"],
    # its control: LESS's rows behind the prefix the continuous default leaves at its initial tokens
    "less_seeds": ["seed_selection.method=less"],
    # its seed 2 had outer gradient norms of 9.7e4, 2.0e3 and 6.7e6 (iterations 14, 18, 19) against
    # 0.6-510 in the rest: the same run with each gradient clipped to 1000 (distill.max_grad_norm)
    "less_seeds_clip1000": ["seed_selection.method=less", "distill.max_grad_norm=1000"],
    # distillation may rewrite the seed's instruction tokens too, not only an 8-token prefix
    "straight_through_instruction": STRAIGHT_THROUGH + ["distill.learnable_instruction=true"],
    "no_projection": [],
    # the previous small-scale default: an expert checkpoint every 10 steps, alpha starting at 0.01
    "segments_10": ["experts.save_every=10", "distill.init_alpha=0.01"],
}


@dataclass
class Ablation:
    """One ablation of a 5 % unit (setting A unless named), on some seeds and targets (None: the plan's)."""
    name: str
    seeds: list[int] | None = None
    targets: list[str] | None = None
    setting: str = "A"


@dataclass
class Plan:
    scale: str
    settings: list[str]
    budgets: list[float]
    seeds: list[int]
    targets: list[str]
    ablations: list[Ablation]
    out: Path
    work: Path
    data_dir: str | None
    overrides: list[str] = field(default_factory=list)
    full_seeds: list[int] | None = None  # None: every seed
    full_targets: list[str] | None = None  # None: every target
    adopt_unrecorded: bool = False  # reuse stages that predate config records (see once)
    report_only: bool = False  # run no stage: report what the --work folder holds (see NotRun)
    not_run: list[str] = field(default_factory=list)  # with report_only: the stages it lacks
    notes: str = ""  # Markdown appended to quality.md: where the reported stages came from
    earlier_rows: list[dict] = field(default_factory=list)  # --merge: kept unless made again
    ablations_only: bool = False  # run the ablation units, not the settings x budgets x seeds grid


def setting_config(plan: Plan, setting: str, budget: float, seed: int, extra: list[str] = ()):
    """The RunConfig of one unit: scale preset, setting, budget and seed, then user overrides."""
    import yaml

    from nacd.config import RunConfig, apply_overrides, deep_merge

    base = yaml.safe_load((BENCH / f"quality_{plan.scale}.yaml").read_text())
    data = deep_merge(base, SETTINGS[setting])
    data = deep_merge(data, {"budget": budget,
                             "data": {"data_dir": plan.data_dir},
                             "seed_selection": {"seed": seed},
                             "distill": {"seed": seed},
                             "selection": {"seed": seed, "less": {"seed": seed}},
                             "evaluation": {"targets": plan.targets, "finetune": {"seed": seed}}})
    data = apply_overrides(data, [*plan.overrides, *extra])
    return RunConfig.model_validate(data)


class StaleWork(SystemExit):
    """A ``--work`` folder holds a stage made with another config than this run's."""


class NotRun(Exception):
    """With ``--report-only``: a stage the ``--work`` folder does not hold. A missing evaluation or
    variant drops its rows; a missing stage they all need (experts, distill) drops the unit."""


def stage_key(cfg, *paths: str, **extra: Any) -> dict:
    """What a stage's output depends on: the named dotted parts of the config, plus extras.
    ``data.data_dir`` is left out: the same files sit in other folders on other machines."""
    dump = cfg.model_dump(mode="json")
    dump["data"].pop("data_dir", None)
    key: dict[str, Any] = {}
    for path in paths:
        node: Any = dump
        for part in path.split("."):
            node = node[part]
        key[path] = node
    return json.loads(json.dumps({**key, **extra}))


# Config fields added after stage records were first written, each with the value that behaves as
# the code did before it: a record that lacks one was made with that value. At 2 GiB the scorings
# recorded before max_logits_gib keep their batch, but for SmolLM2 on MMLU in setting B: batch_size
# 16 (2.3 GiB of logits) becomes 13. A batch changes log-likelihoods by float rounding only
# (tests/test_evaluation.py), and bench/results/quality-notes.md has that scoring rerun at 13.
# Every scoring before evaluation.method was the harness's.
ADDED_FIELDS: dict[str, Any] = {"distill.min_start": 0, "distill.max_grad_norm": None,
                                "evaluation.max_logits_gib": 2.0, "evaluation.method": "lm_eval"}


def with_added_fields(key: dict) -> dict:
    """A stage key with every ADDED_FIELDS leaf it lacks filled in, where its section is: nested
    (``{"distill": {...}}``) or beside the section's other dotted parts (``"evaluation.batch_size"``)."""
    filled = json.loads(json.dumps(key))
    for dotted, value in ADDED_FIELDS.items():
        *sections, leaf = dotted.split(".")
        if any(k.startswith(".".join(sections) + ".") for k in filled):
            filled.setdefault(dotted, value)
            continue
        node: Any = filled
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return filled


def key_differences(recorded: Any, wanted: Any, where: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two stage keys."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(recorded) | set(wanted))
                for d in key_differences(recorded.get(k), wanted.get(k), f"{where}.{k}" if where else k)]
    return [] if recorded == wanted else [f"{where or '<root>'}: {recorded!r} -> {wanted!r}"]


def once(plan: Plan, marker: Path, run: Callable[[], Any], label: str, key: dict) -> float:
    """Run a stage unless its completion marker exists; return its wall time (0 when skipped).

    The stage's config ``key`` is recorded under ``<work>/.stage-configs/`` before it runs, and a
    finished stage is reused only when its record equals this run's key: a folder made under
    another config is an error, never a silent mix of results."""
    record = plan.work / ".stage-configs" / marker.relative_to(plan.work).with_name(marker.name + ".key.json")
    recorded = json.loads(record.read_text()) if record.exists() else None
    if marker.exists():
        if recorded is None and not plan.adopt_unrecorded:
            raise StaleWork(f"quality.py: {marker.parent} has no config record (made before records "
                            f"existed?): delete it, or pass --adopt-unrecorded if it was made with this config")
        then, now = (None, None) if recorded is None else (with_added_fields(recorded), with_added_fields(key))
        if then != now:
            raise StaleWork(f"quality.py: {marker.parent} was made with another config; "
                            + "; ".join(key_differences(then, now))
                            + ". Delete it or use another --work folder.")
        if recorded is None:
            _write_record(record, key)
        return 0.0
    if plan.report_only:
        raise NotRun(label)
    _write_record(record, key)  # before the run: a stage killed midway is redone under this key
    print(f"[quality] {label}", flush=True)
    start = time.time()
    reset_device_peak()
    run()
    wall = time.time() - start
    peak = release_device_memory()
    if peak is not None:
        print(f"[quality] {label}: {wall:.0f} s, device peak {peak:.1f} GiB", flush=True)
    return wall


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_device_peak() -> None:
    import torch

    if _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()


def release_device_memory() -> float | None:
    """The stage's peak GPU memory in GiB (None off CUDA), after handing the cached blocks back.

    The stages of a unit share one process: without this, the allocator keeps the experts' 40-50 GiB
    of activations cached through distillation, and a second unit on the same GPU runs out of memory
    (the first GPU run, bench/results/quality_gpu_2026-11-30.json)."""
    import gc

    import torch

    if not _cuda_in_use():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def once_if_held(plan: Plan, marker: Path, run: Callable[[], Any], label: str, key: dict) -> float | None:
    """``once`` for a stage only some rows need (a variant, an evaluation): under ``--report-only``
    a missing one is noted in ``plan.not_run`` and None returned, so the rest of the unit reports."""
    try:
        return once(plan, marker, run, label, key)
    except NotRun as missing:
        plan.not_run.append(str(missing))
        return None


def _write_record(record: Path, key: dict) -> None:
    from nacd.storage import write_json

    write_json(str(record), key)


def training_text_sha256(variant_dir: Path) -> str:
    """sha256 of what fine-tuning reads from a variant: each row's prompt and response, in order
    (the rows' other fields, such as projection distances, do not reach the target)."""
    from nacd.data.variants import read_variant

    pairs = [[row["prompt"], row["response"]] for row in read_variant(variant_dir)]
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def reuse_twin(plan: Plan, scores_root: Path, out: Path, key: dict) -> bool:
    """Copy the scores of a sibling evaluation recorded under the same key (the same text, recipe,
    benchmarks and target: the evaluation is a deterministic function of them) into ``out``."""
    records = plan.work / ".stage-configs" / scores_root.relative_to(plan.work)
    for record in sorted(records.glob("*/*/scores.json.key.json")):
        twin = scores_root / record.relative_to(records).parent / "scores.json"
        if twin.parent != out and twin.exists() and json.loads(record.read_text()) == key:
            from nacd.data.variants import atomic_dir, write_json

            print(f"[quality]   same text as {twin.parent}: its evaluation is reused", flush=True)
            with atomic_dir(out, "scores.json") as tmp:
                shutil.copytree(twin.parent, tmp, dirs_exist_ok=True)
                write_json(tmp / "reused-from.json", {"scores": str(twin.parent.relative_to(plan.work))})
            return True
    return False


def score_rows(scores_file: Path, context: dict) -> list[dict]:
    """The unit's context wins over the scores file's own fields: a file made under another name
    (an ablation's cached evaluation) or once for every seed (``none``) is labelled by the unit."""
    rows = json.loads(scores_file.read_text())
    # MMLU's accuracy here is the macro average over subjects (the scorer's acc pools questions)
    return [{**row, **({"acc": row["acc_macro"], "acc_micro": row["acc"]} if "acc_macro" in row else {}), **context}
            for row in rows]


def unit_dir(work: Path, setting: str, budget: float, seed: int) -> Path:
    """Where a (setting, budget, seed) unit keeps its stages."""
    return work / setting / f"budget-{budget:g}" / f"seed-{seed}"


def store_dir(work: Path, setting: str, name: str = "") -> Path:
    """The expert trajectories a unit matches: an ablation that changes how experts train gets its
    own; the rest share the setting's."""
    own = any(o.startswith("experts.") for o in ablation_overrides(name))
    return work / setting / (f"trajectories-{name}" if own else "trajectories")


def distilled_suffix(name: str = "") -> str:
    """'-NAME' of an ablation's synthetic-/distilled- folders; '' for the headline run and for
    no_projection, which reuses its synthetic set (it changes the evaluation, not distill)."""
    return f"-{name}" if name and name != "no_projection" else ""


def ablation_overrides(name: str = "") -> list[str]:
    """The config overrides of ablation ``name``; none for the headline run ('')."""
    return ABLATIONS[name] if name else []


def run_unit(plan: Plan, setting: str, budget: float, seed: int, name: str = "") -> list[dict]:
    """One (setting, budget, seed[, ablation]) unit: every variant, every target; returns rows."""
    from nacd.data.prepare import prepare_data
    from nacd.data.variants import full_variant
    from nacd.distill.run import distill
    from nacd.evaluation.run import evaluate
    from nacd.experts import train_expert
    from nacd.projection import project_ids
    from nacd.selection.less import select_less
    from nacd.selection.random import select_random
    from nacd.selection.seeds import select_seeds

    cfg = setting_config(plan, setting, budget, seed, ablation_overrides(name))
    root = plan.work / setting
    unit = unit_dir(plan.work, setting, budget, seed)
    tag = f"{setting} budget={budget:g} seed={seed}{' ' + name if name else ''}"
    dataset, store = root / "prepared", store_dir(plan.work, setting, name)
    walls: dict[str, float] = {}
    # What each stage's output depends on (see once): a stage is reused only under the same key.
    prepared_key = stage_key(cfg, "data", "source.name", "source.revision")
    experts_key = {**prepared_key, **stage_key(cfg, "source", "experts")}
    variant_keys = {"random": {**prepared_key, **stage_key(cfg, "budget", "selection.seed")},
                    "less": {**prepared_key, **stage_key(cfg, "budget", "source", "selection")},
                    "full": prepared_key}
    seeds_from_less = cfg.seed_selection.method == "less"
    seeds_key = {**prepared_key, **stage_key(cfg, "budget", "seed_selection"),
                 **({"less": variant_keys["less"]} if seeds_from_less else {})}
    distill_key = {**experts_key, **seeds_key, **stage_key(cfg, "distill")}
    scoring_key = stage_key(cfg, "evaluation.benchmarks", "evaluation.batch_size", "evaluation.max_logits_gib",
                            "evaluation.method")
    def eval_key(target: str) -> dict:  # the recipe this target is fine-tuned with, the benchmarks
        return {**scoring_key, "target": target,
                "evaluation.finetune": cfg.evaluation.finetune_for(target).model_dump(mode="json")}
    # Shared by all budgets and seeds of a setting: the pool and the expert trajectories.
    walls["prepare"] = once(plan, dataset / "prepare.json", lambda: prepare_data(cfg, dataset),
                            f"{tag}: prepare", prepared_key)
    for e in range(cfg.experts.num_experts):
        manifest = store / "experts" / f"expert-{e:03d}" / "manifest.json"
        walls[f"expert{e}"] = once(plan, manifest, lambda e=e: train_expert(cfg, dataset, str(store), e),
                                   f"{tag}: expert {e}", {**experts_key, "expert": e})
    less_dir = unit / "less"
    if seeds_from_less:  # the seeds are LESS's rows: the variant the headline unit also evaluates
        walls["less"] = once(plan, less_dir / "variant.json", lambda: select_less(cfg, dataset, less_dir),
                             f"{tag}: less", variant_keys["less"])
    seeds_dir = unit / ("seeds-less" if seeds_from_less else "seeds")
    walls["seeds"] = once(plan, seeds_dir / "seeds.json",
                          lambda: select_seeds(cfg, dataset, seeds_dir, less_dir),  # read with method=less only
                          f"{tag}: seeds", seeds_key)
    suffix = distilled_suffix(name)
    syn, distilled = unit / f"synthetic{suffix}", unit / f"distilled{suffix}"
    walls["distill"] = once(plan, syn / "synthetic.json", lambda: distill(cfg, dataset, seeds_dir, str(store), syn),
                            f"{tag}: distill", distill_key)
    walls["project"] = once(plan, distilled / "variant.json", lambda: project_ids(cfg, syn, distilled),
                            f"{tag}: project", distill_key)
    diagnostics = distill_diagnostics(syn, distilled)
    if name == "no_projection":  # the synthetic set of the headline run, used without projection
        out = unit / "scores" / "no_projection" / cfg.source.name
        walls["eval:no_projection"] = once(plan, out / "scores.json", lambda: evaluate_embeddings(cfg, syn, out),
                                           f"{tag}: evaluate {cfg.source.name} on the embeddings",
                                           {**distill_key, **eval_key(cfg.source.name)})
        return [{**r, "stage_wall_s": walls, "distill_diagnostics": diagnostics}
                for r in score_rows(out / "scores.json", {"setting": setting, "budget": budget, "seed": seed,
                                                          "variant": "distilled-no_projection"})]
    wanted = set(cfg.evaluation.variants) if not name else set()
    if plan.full_seeds is not None and seed not in plan.full_seeds:
        wanted.discard("full")
    selections = {"random": (select_random, unit / "random"), "less": (select_less, less_dir),
                  "full": (lambda c, d, o: full_variant(d, o), root / "full")}
    rows = []
    # Each variant is scored as soon as it exists, the cheap ones first (LESS's per-example gradients
    # are the slowest stage): a run stopped midway, by a GPU lease's limit say, keeps every score it reached.
    for vname in (("distilled-" + name) if name else "distilled", "random", "none", "less", "full"):
        vdir: Path | None = None
        if vname.startswith("distilled"):
            vdir = distilled
        elif vname not in wanted:
            continue
        elif vname in selections:
            fn, vdir = selections[vname]
            wall = once_if_held(plan, vdir / "variant.json", lambda fn=fn, vdir=vdir: fn(cfg, dataset, vdir),
                                f"{tag}: {vname}", variant_keys[vname])
            if wall is None:
                continue
            walls[vname] = wall
        # A distilled variant is keyed by the text it trains on: two distillations that project to
        # the same text share one score.
        text_sha256 = training_text_sha256(vdir) if vname.startswith("distilled") else None
        for target in cfg.evaluation.targets:
            if vname == "full" and plan.full_targets is not None and target not in plan.full_targets:
                continue
            # full and none do not depend on the budget: scored once per seed (none once) and reused.
            where = {"full": root / "scores" / "full" / f"seed-{seed}",
                     "none": root / "scores" / "none"}.get(vname, unit / "scores" / vname)
            out = where / target
            # none is not fine-tuned: only the benchmarks and the target matter.
            key = ({**scoring_key, "target": target}
                   if vname == "none" else
                   {**eval_key(target), "training_text_sha256": text_sha256}
                   if vname.startswith("distilled") else {**variant_keys[vname], **eval_key(target)})
            wall = once_if_held(
                plan, out / "scores.json",
                lambda: reuse_twin(plan, unit / "scores", out, key) or evaluate(cfg, target, vname, vdir, out),
                f"{tag}: evaluate {target} on {vname}", key)
            if wall is None:
                continue
            walls[f"eval:{target}:{vname}"] = wall
            rows += score_rows(out / "scores.json", {"setting": setting, "budget": budget, "variant": vname,
                                                     "target": target, "seed": None if vname == "none" else seed})
    for row in rows:
        row["config"] = {"distill": cfg.distill.model_dump(), "experts": cfg.experts.model_dump(),
                         "finetune": cfg.evaluation.finetune_for(row["target"]).model_dump(), "scale": plan.scale}
        row["stage_wall_s"] = walls
        if row["variant"].startswith("distilled"):
            row["distill_diagnostics"] = diagnostics
    return rows


def distill_diagnostics(synthetic_dir: Path, distilled_dir: Path) -> dict:
    """Did distillation learn, and did the projection keep it? L_match over the first and last 5
    iterations (a seed draws the same experts, starts and batches in every variant, so equal seeds
    compare like with like), the final alpha, and how many prompt tokens the projection changed."""
    history = json.loads((synthetic_dir / "synthetic.json").read_text())["history"]
    variant = json.loads((distilled_dir / "variant.json").read_text())
    l_match = [h["l_match"] for h in history]
    changed = variant.get("tokens_changed_by_distillation") or {}
    return {"l_match_first5": statistics.fmean(l_match[:5]), "l_match_last5": statistics.fmean(l_match[-5:]),
            "alpha_last": history[-1]["alpha"], "iterations": len(history),
            "prompt_tokens_changed": changed.get("prompt"), "prompt_tokens": changed.get("prompt_total"),
            "instruction_tokens_changed": changed.get("instruction"),
            "instruction_tokens": changed.get("instruction_total"),
            "nn_distance_mean": variant["nn_distance_mean"]}


def evaluate_embeddings(cfg, synthetic_dir: Path, out_dir: Path) -> list[dict]:
    """Ablation ``no_projection``: fine-tune the *source* model on the learnt embeddings themselves
    (prompt vectors, and learnt instruction vectors if any, fed as ``inputs_embeds``) with the
    same recipe as every variant, then score it. Compared with the projected text on the same
    model, it measures what the ID projection loses."""
    import torch

    from nacd.data.variants import atomic_dir, write_json
    from nacd.distill.synthetic import SyntheticSet
    from nacd.evaluation.finetune import merged, seeded_batches
    from nacd.evaluation.run import load_target, score_benchmarks
    from nacd.models import make_trainable

    ft = cfg.evaluation.finetune_for(cfg.source.name)
    model, tokenizer = load_target(cfg.source.name)
    syn = SyntheticSet.from_pretrained(synthetic_dir)
    device = next(model.parameters()).device
    torch.manual_seed(ft.seed)
    model = make_trainable(model, ft.param_space, seed=ft.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ft.lr, weight_decay=0.0)
    k, p_len = syn.num_samples, syn.prompt_len
    steps = max(1, math.ceil(ft.epochs * k / (ft.micro_batch * ft.grad_accum)))
    batches, losses = seeded_batches(k, ft.micro_batch, ft.seed), []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(ft.grad_accum):
            idx = torch.tensor(next(batches))
            ids, labels, mask = (t[idx].to(device) for t in (syn.seed_input_ids, syn.seed_labels,
                                                            syn.seed_attention_mask))
            seed_embeds = model.get_input_embeddings()(ids)
            if syn.instruction_embeds is not None:
                keep = syn.instruction_mask[idx].to(device).unsqueeze(-1)
                seed_embeds = torch.where(keep, syn.instruction_embeds[idx].to(device, seed_embeds.dtype),
                                          seed_embeds)
            prompt = syn.prompt_embeds[idx].to(device, seed_embeds.dtype)
            embeds = torch.cat([prompt, seed_embeds], dim=1)
            full_mask = torch.cat([torch.ones(len(idx), p_len, dtype=mask.dtype, device=device), mask], dim=1)
            full_labels = torch.cat([torch.full((len(idx), p_len), -100, device=device), labels], dim=1)
            loss = model(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels).loss / ft.grad_accum
            loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()) * ft.grad_accum)
    model = merged(model.eval())
    info = {"trained": True, "on": "embeddings", "steps": steps, "examples": k,
            "loss_first": losses[0], "loss_last": losses[-1], **ft.model_dump(mode="json")}
    rows = [{"target": cfg.source.name, "variant": "no_projection", **result, "seed": ft.seed, "finetune": info}
            for result in score_benchmarks(model, tokenizer, cfg)]
    with atomic_dir(out_dir, "scores.json") as tmp:
        write_json(tmp / "scores.json", rows)
    return rows


# --------------------------------------------------------------------------- statistics
def paired_t(diffs: list[float]) -> tuple[float, float]:
    """Paired t-test over seeds on per-seed differences: (t, two-sided p); p=nan below 2 seeds."""
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:  # every seed gave the same difference: a t-test has nothing to say
        return (math.inf if mean > 0 else -math.inf if mean < 0 else 0.0), float("nan")
    from scipy import stats

    t = mean / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), n - 1))


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (1 seed)"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def percent(budget: float) -> str:
    return f"{100 * budget:g} %"


def summarise(rows: list[dict]) -> str:
    """Markdown: accuracy table per (setting, target, benchmark), then the paired differences."""
    key = lambda r: (r["setting"], r["target"], r["benchmark"])  # noqa: E731
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    lines = ["# Quality benchmark", "",
             "Accuracy (%) as mean ± std over seeds; `full` and `none` do not depend on the budget.", ""]
    for (setting, target, bench), rs in sorted(groups.items()):
        budgets = sorted({r["budget"] for r in rs})
        variants = sorted({r["variant"] for r in rs}, key=lambda v: (v not in ("distilled", "random", "less"), v))
        lines += [f"## Setting {setting} · target {target} · {bench}", "",
                  "| variant | " + " | ".join(percent(b) if b < 1 else f"{b:g}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for v in variants:
            cells = []
            for b in budgets:
                accs = [r["acc"] for r in rs if r["variant"] == v and (r["budget"] == b or v in ("full", "none"))]
                accs = accs if v not in ("full", "none") else _dedupe_by_seed(rs, v)
                # none is not fine-tuned: one score, not one seed
                cells.append(f"{100 * accs[0]:.1f}" if v == "none" and accs else mean_std(accs))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines += ["", "Paired over seeds (same seed rows, same fine-tuning seed):", "",
                  "| budget | variant | − random | p | − LESS | p |", "|---|---|---|---|---|---|"]
        for b, v in product(budgets, [v for v in variants if v.startswith("distilled")]):
            if not any(r["variant"] == v and r["budget"] == b for r in rs):
                continue  # an ablation runs at 5 % only
            cmp = []
            for other in ("random", "less"):
                diffs = _paired(rs, b, v, other)
                t, p = paired_t(diffs)
                p_text = ("-" if not diffs else "1 seed" if len(diffs) < 2
                          else "no spread" if math.isnan(p) else f"{p:.3f}")
                cmp += [f"{100 * statistics.fmean(diffs):+.1f}" if diffs else "-", p_text]
            lines.append(f"| {percent(b)} | {v} | " + " | ".join(cmp) + " |")
        lines.append("")
    return "\n".join(lines + scorer_note(rows) + diagnostics_table(rows))


def scorer_note(rows: list[dict]) -> list[str]:
    """Which rows nacd's direct scorer made, where the record mixes it with the harness's."""
    # per (setting, target): each fine-tuned unit (budget, seed), or None for none (one scoring for
    # every budget), with the variants scored directly and the variants it has
    direct: dict[tuple[str, str], dict[tuple[float, int] | None, set[str]]] = {}
    every: dict[tuple[str, str, tuple[float, int] | None], set[str]] = {}
    for r in rows:
        unit = None if r["variant"] == "none" else (r["budget"], r["seed"])
        every.setdefault((r["setting"], r["target"], unit), set()).add(r["variant"])
        if r.get("method", "lm_eval") == "direct":
            direct.setdefault((r["setting"], r["target"]), {}).setdefault(unit, set()).add(r["variant"])
    if not direct or all(r.get("method") == "direct" for r in rows):
        return []
    where = "; ".join(
        f"setting {s} · {t}: " + scored_units({u: None if v == every[(s, t, u)] else v for u, v in units.items()})
        for (s, t), units in sorted(direct.items()))
    text = ("Every row is scored by lm-evaluation-harness but these, scored by nacd's direct scorer "
            "(`evaluation.method=direct`: the same log-likelihoods, the output layer run only at scored "
            f"positions; `bench/scoring_speed.py` checks the two agree): {where}.")
    return ["## Scorers", "", text, ""]


def scored_units(units: dict[tuple[float, int] | None, set[str] | None]) -> str:
    """'5 % seed 2, 10 % seed 0 (distilled-P4), none': the fine-tuned units in budget order, then the
    untuned model; a unit lists its variants when only some of them were scored so."""
    def label(unit: tuple[float, int]) -> str:
        only = units[unit]
        return f"{percent(unit[0])} seed {unit[1]}" + (f" ({', '.join(sorted(only))})" if only else "")

    return ", ".join([label(u) for u in sorted(u for u in units if u is not None)]
                     + (["none"] if None in units else []))


def diagnostics_table(rows: list[dict]) -> list[str]:
    seen: dict[tuple, dict] = {}
    for r in rows:
        if r.get("distill_diagnostics") and r["variant"] != "distilled-no_projection":
            seen[(r["setting"], r["budget"], r["variant"], r["seed"])] = r["distill_diagnostics"]
    if not seen:
        return []
    lines = ["## Distillation diagnostics", "",
             "L_match is the mean over the first and the last 5 iterations; a seed draws the same experts, "
             "start checkpoints and batches in every variant. Tokens changed: prompt (and, with "
             "learnable instructions, instruction) vectors whose projection is not their initial "
             "token (the part of distillation the text keeps).", "",
             "| setting | budget | variant | seed | L_match first 5 | last 5 | alpha | tokens changed | "
             "mean NN distance |", "|---|---|---|---|---|---|---|---|---|"]
    for (setting, budget, variant, seed), d in sorted(seen.items()):
        changed = "-" if d["prompt_tokens_changed"] is None else f"{d['prompt_tokens_changed']}/{d['prompt_tokens']}"
        if d.get("instruction_tokens_changed") is not None:
            changed += f" + {d['instruction_tokens_changed']}/{d['instruction_tokens']} instruction"
        lines.append(f"| {setting} | {percent(budget)} | {variant} | {seed} | {d['l_match_first5']:.3f} | "
                     f"{d['l_match_last5']:.3f} | {d['alpha_last']:.3g} | {changed} | {d['nn_distance_mean']:.2f} |")
    return lines + [""]


def not_run_section(not_run: list[str]) -> str:
    if not not_run:
        return ""
    return "\n".join(["## Not run", "", "`--report-only` found no output for these stages in the `--work` folder:", ""]
                     + [f"- {label}" for label in not_run] + [""])


def _dedupe_by_seed(rs: list[dict], variant: str) -> list[float]:
    return list({r["seed"]: r["acc"] for r in rs if r["variant"] == variant}.values())


def _paired(rs: list[dict], budget: float, a: str, b: str) -> list[float]:
    by = {(r["variant"], r["seed"]): r["acc"] for r in rs if r["budget"] == budget}
    return [by[(a, s)] - by[(b, s)] for (v, s) in by if v == a and (b, s) in by]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nacd.storage import write_bytes

    panels = sorted({(r["setting"], r["target"], r["benchmark"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (setting, target, bench) in zip(axes[0], panels):
        rs = [r for r in rows if (r["setting"], r["target"], r["benchmark"]) == (setting, target, bench)]
        budgets = sorted({r["budget"] for r in rs})
        for v in ("distilled", "random", "less"):
            means, sds = [], []
            for b in budgets:
                accs = [100 * r["acc"] for r in rs if r["variant"] == v and r["budget"] == b]
                means.append(statistics.fmean(accs) if accs else math.nan)
                sds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
            ax.errorbar([100 * b for b in budgets], means, yerr=sds, marker="o", capsize=3, label=v)
        for v, style in (("full", "--"), ("none", ":")):
            accs = _dedupe_by_seed(rs, v)
            if accs:
                ax.axhline(100 * statistics.fmean(accs), linestyle=style, color="grey", label=v)
        ax.set(title=f"{setting} · {target} · {bench}", xlabel="budget (% of pool)", ylabel="accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()  # rendered in memory so that a crash mid-render leaves the old plot whole
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes(str(path), png.getbuffer())


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> Plan:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["small", "full"], default="small")
    ap.add_argument("--only-setting", action="append", choices=sorted(SETTINGS), dest="settings")
    ap.add_argument("--budgets", default="0.01,0.05,0.1")
    ap.add_argument("--seeds", default="0,1,2",
                    help='comma list; "" with --report-only --merge: no unit, a report of the merged record alone')
    ap.add_argument("--full-seeds", default=None,
                    help="seeds to train the full-data variant with (default: every seed); it is the "
                         "costliest variant and does not depend on the budget")
    ap.add_argument("--full-targets", default=None,
                    help="targets to train on the full data (default: every target)")
    ap.add_argument("--targets", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--ablations", nargs="?", const=",".join(ABLATIONS), default="",
                    help="also run the 5 %% ablations: all, or a comma list of NAME[@SEED+SEED][/TARGET+TARGET][:SETTING] "
                         "(beta0,no_projection,P4@0/smollm2-135m-instruct: P4 on seed 0 and one target only; "
                         "SETTING defaults to A)")
    ap.add_argument("--ablations-only", action="store_true",
                    help="run the --ablations units only, not the settings x budgets x seeds grid")
    ap.add_argument("--data-dir", default=None, help="folder laid out like shared/data (offline)")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--work", type=Path, default=None, help="stage outputs (default: <out>/work-<scale>)")
    ap.add_argument("--adopt-unrecorded", action="store_true",
                    help="reuse finished stages that have no config record (made before records existed) "
                         "and record this run's config for them; only for a --work folder you know matches")
    ap.add_argument("--report-only", action="store_true",
                    help="run no stage: put together what the --work folder holds and list what it lacks")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="config override applied to every unit, e.g. evaluation.benchmarks.0.limit=100")
    ap.add_argument("--merge", type=Path, default=None, metavar="QUALITY_JSON",
                    help="keep the rows of an earlier quality.json that this run does not make again (the "
                         "record outlives a lost --work folder; a row made again replaces its old self)")
    ap.add_argument("--notes", type=Path, default=None,
                    help="Markdown file appended to quality.md, e.g. which earlier commands made the stages "
                         "a --report-only run puts together (bench/results/quality-notes.md)")
    a = ap.parse_args(argv)
    if a.notes is not None and not a.notes.is_file():  # before any stage runs, not after hours of them
        raise SystemExit(f"quality.py: --notes {a.notes}: no such file")
    if a.ablations_only and not a.ablations:
        raise SystemExit("quality.py: --ablations-only needs --ablations")
    earlier = earlier_rows(a.merge) if a.merge is not None else []
    budgets, seeds = _numbers(a.budgets, "--budgets", float), _numbers(a.seeds, "--seeds", int)
    if not (budgets and seeds) and not a.ablations and not (a.report_only and earlier):
        raise SystemExit("quality.py: --budgets and --seeds name no unit; empty lists are for "
                         "--report-only --merge (a report of the merged record alone)")
    return Plan(scale=a.scale, settings=a.settings or sorted(SETTINGS),
                budgets=budgets, seeds=seeds,
                targets=a.targets.split(","), ablations=_ablations(a.ablations), out=a.out,
                work=a.work or a.out / f"work-{a.scale}", data_dir=a.data_dir, overrides=a.overrides,
                full_seeds=_numbers(a.full_seeds, "--full-seeds", int) if a.full_seeds else None,
                full_targets=a.full_targets.split(",") if a.full_targets else None,
                adopt_unrecorded=a.adopt_unrecorded, report_only=a.report_only,
                notes=a.notes.read_text() if a.notes else "", earlier_rows=earlier,
                ablations_only=a.ablations_only)


def _numbers(text: str, flag: str, kind: type) -> list:
    try:
        return [kind(x) for x in filter(None, text.split(","))]
    except ValueError:
        raise SystemExit(f"quality.py: {flag} {text!r}: a comma list of {kind.__name__} values") from None


ROW_IDENTITY = ("setting", "budget", "variant", "target", "seed", "benchmark")


def earlier_rows(path: Path) -> list[dict]:
    """The rows of an earlier quality.json, checked for the fields that identify a row."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"quality.py: --merge {path}: not a quality.json with a 'rows' list ({e})") from None
    for i, row in enumerate(rows):
        missing = [k for k in (*ROW_IDENTITY, "acc") if k not in row]
        if missing:
            raise SystemExit(f"quality.py: --merge {path}: rows[{i}] lacks {', '.join(missing)}")
    return rows


def merged_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """Every new row, and each earlier row whose (setting, budget, variant, target, seed,
    benchmark) no new row has (none's rows repeat per unit, so identities are compared, not rows)."""
    made = {tuple(r[k] for k in ROW_IDENTITY) for r in new}
    return [r for r in earlier if tuple(r[k] for k in ROW_IDENTITY) not in made] + new


def _ablations(spec: str) -> list[Ablation]:
    """``NAME[@SEED+SEED...][/TARGET+TARGET...][:SETTING]``, comma-separated: e.g.
    ``beta0,P4@0/smollm2-135m-instruct`` runs beta0 on every seed and target, P4 on seed 0 and the
    source model only, both on setting A; ``P4:B`` runs P4 on setting B."""
    out = []
    for item in filter(None, spec.split(",")):
        rest, _, setting = item.partition(":")
        rest, _, targets = rest.partition("/")
        name, _, seeds = rest.partition("@")
        if setting and setting not in SETTINGS:
            raise SystemExit(f"quality.py: ablation {item!r}: setting {setting!r} after ':' is one of {', '.join(SETTINGS)}")
        if name not in ABLATIONS:
            raise SystemExit(f"quality.py: unknown ablation {name!r} in {item!r}; choose from {', '.join(ABLATIONS)}")
        try:
            seed_list = [int(x) for x in seeds.split("+")] if seeds else None
        except ValueError:
            raise SystemExit(f"quality.py: ablation {item!r}: seeds after '@' are integers joined by '+'") from None
        out.append(Ablation(name, seed_list, targets.split("+") if targets else None, setting or "A"))
    return out


def main(argv: list[str] | None = None) -> int:
    from nacd.storage import write_bytes  # atomic: a killed run leaves the previous report whole

    plan = parse_args(argv)
    plan.out.mkdir(parents=True, exist_ok=True)
    results = plan.out / "quality.json"
    started = time.time()
    rows: list[dict] = []
    units = [] if plan.ablations_only else [(plan, setting, budget, seed, "") for setting, budget, seed
                                            in product(plan.settings, plan.budgets, plan.seeds)]
    for ablation in plan.ablations:
        sub = replace(plan, targets=ablation.targets or plan.targets)  # shares plan.not_run
        units += [(sub, ablation.setting, 0.05, seed, ablation.name) for seed in ablation.seeds or plan.seeds]
    for unit_plan, setting, budget, seed, name in units:
        try:
            unit_rows = run_unit(unit_plan, setting, budget, seed, name)
        except NotRun as missing:
            plan.not_run.append(f"{missing} (so none of this unit's rows)")
            continue
        rows += [r for r in unit_rows if not name or r["variant"].startswith("distilled-")]
        _write(results, plan, merged_rows(plan.earlier_rows, rows), started)
    record_alone = plan.report_only and not units and bool(plan.earlier_rows)  # --seeds "" --merge
    if not rows and not record_alone:  # with --report-only: every unit lacks a stage it needs
        first = plan.not_run[0] if plan.not_run else "no target or variant was asked for"
        print(f"quality.py: {plan.work} holds no finished unit of this plan; first missing: {first}",
              file=sys.stderr)
        return 1
    command = "python bench/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if plan.earlier_rows:
        made, rows = len(rows), merged_rows(plan.earlier_rows, rows)
        print(f"[quality] {made} rows made, {len(rows) - made} kept from --merge", flush=True)
    _write(results, plan, rows, started)  # the record as reported (also where no unit wrote it)
    report = (summarise(rows) + not_run_section(plan.not_run) + f"\nCommand: `{command}`; "
              f"wall time {time.time() - started:.0f} s (stages already done are skipped).\n"
              + (f"\n{plan.notes.rstrip()}\n" if plan.notes else ""))
    write_bytes(str(plan.out / "quality.md"), report.encode())
    plot(rows, plan.out / "quality.png")
    print(report)
    print(f"[quality] wrote {results}, quality.md and quality.png in {time.time() - started:.0f} s")
    return 0


def _write(path: Path, plan: Plan, rows: list[dict], started: float) -> None:
    from nacd.storage import write_bytes

    doc = {"scale": plan.scale, "settings": plan.settings, "budgets": plan.budgets, "seeds": plan.seeds,
           "targets": plan.targets, "wall_s": round(time.time() - started, 1), "rows": rows}
    write_bytes(str(path), json.dumps(doc, indent=1, default=str).encode())


if __name__ == "__main__":
    sys.exit(main())
