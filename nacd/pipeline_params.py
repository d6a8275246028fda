"""Config <-> pipeline parameters, and the small helpers the KFP components call.

No KFP import here: components in ``components/`` are thin wrappers that import this module
inside their bodies, and the CLI uses it to turn a YAML config into pipeline arguments.

Parameter design (one pipeline parameter per config section):
- ``name`` (str) and ``budget`` (float) are scalars; every other top-level section of
  :class:`nacd.config.RunConfig` (``storage``, ``data``, ``source``, ``experts``,
  ``seed_selection``, ``distill``, ``selection``, ``evaluation``) is one ``dict`` parameter whose
  default is the schema's default, so the KFP UI shows every value a user may change.
- Each component receives only the sections it depends on (:data:`STAGE_SECTIONS`) and rebuilds
  a validated ``RunConfig`` from them (:func:`config_from_sections`); sections it did not get
  stay at their defaults and the stage does not read them. KFP's cache key covers a task's
  inputs, so changing ``distill.iterations`` re-runs distill and what consumes its output, never
  the experts.
- Evaluation is fanned out by a tiny planning step per data variant (:func:`eval_items`) whose
  items carry the evaluation settings without the ``targets``/``variants`` lists, so adding a
  target re-runs only that target's evaluations.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from pydantic import ValidationError

from nacd.config import (LESS_DEFAULT_TARGET_SPLIT, ConfigError, RunConfig, budget_count,
                         format_validation_error)

SCALARS = ("name", "budget")
SECTIONS = ("storage", "data", "source", "experts", "seed_selection", "distill", "selection",
            "evaluation")
VARIANTS = ("distilled", "random", "less", "full", "none")

# The config sections each stage reads: the component gets exactly these as inputs.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare_data": ("data", "source"),
    "train_experts": ("source", "experts", "storage"),
    "select_seeds": ("budget", "seed_selection"),
    "distill": ("budget", "source", "distill", "storage"),
    "project_ids": ("source", "distill"),
    "select_random": ("budget", "selection"),
    "select_less": ("budget", "source", "selection", "data"),
    "full_variant": (),
    "eval_plan": ("evaluation", "data"),
}


# --------------------------------------------------------------------------- config <-> params
def config_to_params(cfg: RunConfig) -> dict[str, Any]:
    """The pipeline arguments for a validated config: scalars plus one JSON dict per section.

    ``None`` values are dropped (KFP parameter structs cannot hold null); every field that may
    be ``None`` defaults to ``None``, so the round trip through :func:`config_from_sections` is
    exact."""
    dumped = _drop_none(cfg.model_dump(mode="json"))
    return {key: dumped[key] for key in (*SCALARS, *SECTIONS)}


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def default_params() -> dict[str, Any]:
    return config_to_params(RunConfig())


def config_from_sections(**sections: Any) -> RunConfig:
    """Rebuild a validated ``RunConfig`` from the sections a component received."""
    unknown = set(sections) - set(SCALARS) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s): {sorted(unknown)}")
    try:
        return RunConfig.model_validate({k: v for k, v in sections.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "pipeline parameters")) from None


def stage_params(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The subset of pipeline arguments a stage's component receives (used for cache reasoning)."""
    params = config_to_params(cfg)
    return {key: params[key] for key in STAGE_SECTIONS[stage]}


def params_from_overrides(items: Iterable[str], base: Mapping[str, Any] | None = None) -> dict:
    """``--param distill.iterations=20`` / ``--param budget=0.1`` -> full, validated pipeline args."""
    from nacd.config import apply_overrides

    data = json.loads(json.dumps(dict(base or default_params())))
    apply_overrides(data, list(items), flag="--param")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "--param")) from None
    return config_to_params(cfg)


# --------------------------------------------------------------------------- pre-flight checks
def pool_upper_bound(cfg: RunConfig) -> int | None:
    """An upper bound on the prepared pool size known before any data is read, or None."""
    bounds = []
    if cfg.data.pool_size is not None:
        bounds.append(cfg.data.pool_size)
    rows = [s.max_rows for s in cfg.data.sources]
    if all(r is not None for r in rows):
        bounds.append(sum(rows))  # type: ignore[arg-type]
    return min(bounds) if bounds else None


_SPLIT_ALIASES = {"val": "validation"}


def check_no_eval_leak(cfg: RunConfig) -> None:
    """Refuse LESS target gradients from a split that the evaluation also scores (LESS's own
    caveat). A whole-config check: the select_less stage is not given the evaluation settings."""
    if "less" not in cfg.evaluation.variants and cfg.seed_selection.method != "less":
        return
    lcfg = cfg.selection.less
    split = lcfg.resolved_target_split()
    norm = _SPLIT_ALIASES.get(split, split)
    for i, b in enumerate(cfg.evaluation.benchmarks):
        if (b.name == lcfg.target_benchmark and _SPLIT_ALIASES.get(b.split, b.split) == norm
                and not lcfg.allow_eval_overlap):
            raise ConfigError(
                f"selection.less.target_split: {lcfg.target_benchmark} '{split}' is also scored by "
                f"evaluation.benchmarks[{i}]; LESS would select with gradients of the evaluation set. "
                f"Use another split ({LESS_DEFAULT_TARGET_SPLIT[lcfg.target_benchmark]!r} is the default) "
                f"or set selection.less.allow_eval_overlap=true knowingly")


def preflight(cfg: RunConfig) -> None:
    """Every whole-config check that needs no data: run by the CLI before anything is written and
    by the pipeline's first step (a run started from the KFP UI never passes through the CLI)."""
    check_budget(cfg)
    check_no_eval_leak(cfg)


def check_budget(cfg: RunConfig) -> None:
    """Reject a budget that cannot be met by any pool this config can produce (before a run)."""
    bound = pool_upper_bound(cfg)
    if bound is None:
        return
    if cfg.budget >= 1:
        budget_count(cfg.budget, bound)  # raises when the count exceeds the largest possible pool
    elif round(cfg.budget * bound) < 1:
        raise ConfigError(f"budget: {cfg.budget} of a pool of at most {bound} selects no sample")


# --------------------------------------------------------------------------- evaluation fan-out
def eval_items(evaluation: Mapping[str, Any], data: Mapping[str, Any], variant: str) -> list[dict]:
    """The evaluate tasks for one data variant: one item per target, or a single ``skip`` item
    when the variant is not requested (kfp.local cannot collect from an empty loop)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown data variant '{variant}' (choose from {', '.join(VARIANTS)})")
    cfg = config_from_sections(evaluation=dict(evaluation), data=dict(data))
    settings = cfg.evaluation.model_dump(mode="json")
    targets = settings.pop("targets")
    variants = settings.pop("variants")
    if variant not in variants:
        return [{"skip": True, "variant": variant}]
    settings = _drop_none(settings)
    data_section = _drop_none({"data_dir": cfg.data.data_dir})
    return [{"skip": False, "variant": variant, "target": t, "evaluation": settings,
             "data": data_section} for t in targets]


def config_for_item(item: Mapping[str, Any]) -> RunConfig:
    evaluation = dict(item["evaluation"], targets=[item["target"]], variants=[item["variant"]])
    return config_from_sections(evaluation=evaluation, data=dict(item.get("data") or {}))


# --------------------------------------------------------------------------- trajectory store
def expert_store_uri(cfg: RunConfig, dataset_dir: str, artifact_path: str) -> str:
    """Where expert trajectories are written.

    With an ``s3://`` storage root every expert of one (dataset, source, experts) configuration
    writes under the same content-addressed prefix, so distill reads one store by range request.
    Otherwise the expert writes into its own output artifact and distill links them together."""
    root = cfg.storage.root
    if not root.startswith("s3://"):
        return artifact_path
    fingerprint = _dataset_fingerprint(dataset_dir)
    key = hashlib.sha256(json.dumps({
        "data": fingerprint, "source": cfg.source.model_dump(mode="json"),
        "experts": cfg.experts.model_dump(mode="json"),
    }, sort_keys=True).encode()).hexdigest()[:16]
    return f"{root.rstrip('/')}/trajectories/{key}"


def _dataset_fingerprint(dataset_dir: str) -> str:
    from nacd.data.prepare import prepared_fingerprint

    if (fingerprint := prepared_fingerprint(dataset_dir)) is not None:
        return fingerprint
    return hashlib.sha256(str(dataset_dir).encode()).hexdigest()


def merge_stores(store_uris: list[str], work_dir: str) -> str:
    """One store URI holding every expert: the shared S3 prefix, or a local folder of links.

    Each local expert artifact holds ``experts/expert-NNN/``; the links make them one store
    without copying checkpoints."""
    uris = sorted(set(store_uris))
    if not uris:
        raise ValueError("distill: no expert trajectories were given")
    if len(uris) == 1:
        return uris[0]
    if any(u.startswith("s3://") for u in uris):
        raise ValueError(f"distill: experts were written to different S3 prefixes: {uris}")
    merged = Path(work_dir) / "experts"
    merged.mkdir(parents=True, exist_ok=True)
    for uri in uris:
        experts = Path(uri) / "experts"
        if not experts.is_dir():
            raise ValueError(f"distill: {uri} holds no experts/ folder")
        for expert in sorted(experts.iterdir()):
            link = merged / expert.name
            if link.exists() or link.is_symlink():
                raise ValueError(f"distill: expert {expert.name} appears in two stores")
            link.symlink_to(expert.resolve(), target_is_directory=True)
    return str(Path(work_dir))


def run_train_expert(cfg: RunConfig, dataset_dir: str, store_uri: str, expert_index: int,
                     num_gpus: int) -> dict:
    """Train one expert on the pod's GPUs: one process per GPU under torchrun with DeepSpeed
    (``nacd.experts.launch_train_expert``; rank 0 writes the store), in-process otherwise."""
    from nacd.experts import launch_train_expert

    experts = cfg.experts
    if num_gpus > 1 and experts.num_procs != num_gpus:
        # The pod's GPU count decides the process count; ZeRO-0 (plain data parallel under the
        # DeepSpeed engine) when the config names no DeepSpeed preset.
        experts = experts.model_copy(update={"num_procs": num_gpus,
                                             "deepspeed": experts.deepspeed or "zero0"})
        cfg = cfg.model_copy(update={"experts": experts})
    return launch_train_expert(cfg, dataset_dir, store_uri, expert_index)


# --------------------------------------------------------------------------- metrics
def flat_metrics(summary: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a stage summary as ``a.b`` -> float (what KFP Metrics can show)."""
    out: dict[str, float] = {}
    if isinstance(summary, Mapping):
        for k, v in summary.items():
            out.update(flat_metrics(v, f"{prefix}{k}."))
    elif isinstance(summary, bool):
        out[prefix.rstrip(".")] = float(summary)
    elif isinstance(summary, (int, float)) and math.isfinite(summary):
        out[prefix.rstrip(".")] = float(summary)
    return out


def log_metrics(metrics: Any, summary: Any) -> dict[str, float]:
    """Log a summary on a KFP ``Metrics`` artifact (duck-typed: anything with ``log_metric``).

    The values are also written to the artifact's file: KFP keeps metrics in metadata only, and
    kfp.local treats a cached output whose file is missing as a cache miss, which would re-run
    every step that logs metrics."""
    flat = flat_metrics(summary)
    for key, value in flat.items():
        metrics.log_metric(key, value)
    path = getattr(metrics, "path", None)
    if path:
        write_json(path, flat)
    return flat


def score_metrics(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    out = {}
    for row in rows:
        for field in ("acc", "acc_norm"):
            if isinstance(row.get(field), (int, float)):
                out[f"{row['target']}.{row['variant']}.{row['benchmark']}.{field}"] = float(row[field])
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (temp file + rename): a crash never leaves half a file behind."""
    # pyarrow is imported only by the steps that write
    from nacd.storage import write_bytes

    write_bytes(str(path), json.dumps(obj, indent=2).encode())
