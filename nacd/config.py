"""One validated schema for a run: YAML in, CLI overrides on top, every user-facing value here once.

Each stage takes the section it needs (``cfg.distill``, ``cfg.experts`` ...). Unknown keys and
wrong types are errors that name the dotted key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem, worded for the user: it names the file and the dotted key."""


class Section(BaseModel):
    # inf and nan are YAML floats (.inf, .nan) but no setting's value: a budget or lr of .inf
    # would pass range checks and fail deep inside a stage
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- storage
class StorageConfig(Section):
    """Where artifacts and trajectories live. Credentials are never config values: they come
    from the standard AWS environment (AWS_ACCESS_KEY_ID, ...) or a Kubernetes Secret."""

    root: str = "./nacd-runs"  # a folder or s3://bucket/prefix
    endpoint_url: str | None = None  # MinIO / Ceph; falls back to AWS_ENDPOINT_URL
    region: str | None = None  # falls back to AWS_REGION / AWS_DEFAULT_REGION
    retries: int = Field(5, ge=0)


# --------------------------------------------------------------------------- data
class DataSourceConfig(Section):
    """One instruction dataset in a mixture."""

    name: str  # built-in (arc_easy, mmlu, lima, dolly_open_qa, flan_v2_cot) or a path / hub id / s3 URI
    format: Literal["auto", "alpaca", "messages", "dolly", "flan_cot", "arc", "mmlu"] = "auto"
    split: str = "train"
    weight: float = Field(1.0, gt=0)
    max_rows: int | None = Field(None, gt=0)


class DataConfig(Section):
    sources: list[DataSourceConfig] = Field(default_factory=lambda: [DataSourceConfig(name="arc_easy")])
    data_dir: str | None = None  # local folder laid out like shared/data; None = hub
    template: Literal["plain", "chat"] = "plain"  # plain text transfers across tokenizers
    max_length: int = Field(256, gt=8)
    overflow: Literal["truncate", "drop"] = "drop"
    pool_size: int | None = Field(None, gt=0)  # cap the mixture (seeded subsample)
    seed: int = 0

    @model_validator(mode="after")
    def _non_empty(self) -> DataConfig:
        if not self.sources:
            raise ValueError("data.sources is empty: name at least one dataset")
        return self


# --------------------------------------------------------------------------- models
class ParamSpaceConfig(Section):
    """Which parameters are trained and therefore recorded in trajectories and matched."""

    kind: Literal["lora", "full"] = "lora"
    lora_r: int = Field(8, gt=0)
    lora_alpha: float = 16.0
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: per-family default (nacd.models)


class SourceModelConfig(Section):
    name: str = "smollm2-135m-instruct"  # registry name, hub id, local dir or s3:// dir
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    param_space: ParamSpaceConfig = Field(default_factory=ParamSpaceConfig)


# --------------------------------------------------------------------------- experts
class ExpertsConfig(Section):
    num_experts: int = Field(2, gt=0)
    base_seed: int = 0  # expert i trains with seed base_seed + i
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    optimizer: Literal["sgd", "sgd_momentum", "adamw"] = "sgd"
    lr: float = Field(1e-2, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    micro_batch: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    save_every: int = Field(10, gt=0)  # K: optimizer steps between checkpoints
    save_epoch_end: bool = False
    storage_dtype: Literal["float32", "bfloat16"] = "float32"
    shard_max_bytes: int = Field(256 * 2**20, gt=0)
    deepspeed: str | None = None  # preset name (zero0..zero3) or path to a DeepSpeed JSON
    num_procs: int = Field(1, gt=0)  # processes per expert (torchrun); >1 needs deepspeed
    log_every: int = Field(1, gt=0)  # optimizer steps between loss log lines
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the process's GPU if any

    @model_validator(mode="after")
    def _procs_need_deepspeed(self) -> ExpertsConfig:
        if self.num_procs > 1 and not self.deepspeed:
            raise ValueError("experts.num_procs > 1 needs experts.deepspeed (e.g. zero2)")
        return self


# --------------------------------------------------------------------------- distillation
class DistillConfig(Section):
    prompt_len: int = Field(8, gt=0)  # P learnable embeddings per sample
    learnable_instruction: bool = False
    init: Literal["random_vocab", "seed_tokens", "gaussian"] = "random_vocab"
    init_std: float = Field(0.02, gt=0)  # for init=gaussian
    syn_steps: int = Field(4, gt=0)  # N student steps
    expert_epochs: int = Field(2, gt=0)  # M: checkpoints between start and target
    # start checkpoint min_start <= t < max_start; a late range matches where the expert still learns
    # (DATM, Guo et al. 2024: later segments for larger budgets)
    min_start: int = Field(0, ge=0)
    max_start: int = Field(4, gt=0)
    batch_syn: int = Field(4, gt=0)  # synthetic samples per student step
    iterations: int = Field(50, gt=0)
    lr_embeddings: float = Field(1e-3, gt=0)
    lr_alpha: float = Field(1e-2, gt=0)
    init_alpha: float = Field(1e-2, gt=0)  # student lr = exp(log_alpha), starts here
    max_alpha: float = Field(10.0, gt=0)  # guard against alpha blow-up
    # guard against one diverged unrolled segment: each outer gradient (the embeddings' together,
    # log_alpha's) is scaled to at most this norm before the optimizer step. Unclipped, a norm of
    # 1.9e7 (typical: 0.3-700) filled Adam's second moment and steered 9 of 36 rows by that one
    # gradient for the rest of the run (bench/results/quality-notes.md). None: no clipping.
    max_grad_norm: float | None = Field(None, gt=0)
    beta: float = Field(0.1, ge=0)  # neighbour regulariser weight
    distance: Literal["euclidean", "cosine"] = "euclidean"
    grad_mode: Literal["reverse", "unroll", "first_order"] = "reverse"  # first_order: approximation
    # train the student on the vectors' nearest tokens, step the vectors with that gradient (PEZ):
    # what is learnt is what the projection keeps (nacd.distill.gradients.total_gradients)
    straight_through: bool = False
    optimizer: Literal["adam", "sgd"] = "adam"  # for the embeddings and for log_alpha (own lrs)
    # special/control tokens are never projected to nor pulled towards (nacd.projection)
    exclude_special_tokens: bool = True
    checkpoint_every: int = Field(10, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _a_start_to_draw(self) -> DistillConfig:
        if self.min_start >= self.max_start:
            raise ValueError(f"min_start={self.min_start} leaves no start checkpoint below "
                             f"max_start={self.max_start} (starts are drawn from min_start <= t < max_start)")
        return self


class SeedSelectionConfig(Section):
    """The K = budget real samples the synthetic set is built on (nacd.selection.seeds)."""

    # random: a seeded subset; less: the LESS variant's rows (select_less's output, same budget), so
    # distillation refines the best-selected samples instead of random ones
    method: Literal["random", "less"] = "random"
    seed: int = 0  # for random; equal to selection.seed: the seeds are exactly the random baseline's rows


# --------------------------------------------------------------------------- baselines
LESS_DEFAULT_TARGET_SPLIT = {"mmlu": "dev", "arc_easy": "train"}


class LessConfig(Section):
    """LESS (Xia et al. 2024) as published: warm-up LoRA with AdamW on a random fraction of the
    pool, one checkpoint per epoch, Adam-preconditioned train gradients vs SGD target gradients,
    random projection, cosine, lr-weighted sum over checkpoints, max over target subtasks."""

    warmup_fraction: float = Field(0.05, gt=0, le=1)
    warmup_epochs: int = Field(4, gt=0)
    warmup_lr: float = Field(2e-5, gt=0)  # peak lr; LESS: 2e-5, linear decay, 3 % warm-up
    warmup_schedule: Literal["linear", "constant", "cosine"] = "linear"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # share of optimizer steps with lr ramping up
    weight_decay: float = Field(0.0, ge=0)
    micro_batch: int = Field(4, gt=0)  # examples per forward pass in the warm-up
    grad_accum: int = Field(1, gt=0)  # LESS: 128 examples per optimizer step on 4 GPUs
    proj_dim: int = Field(8192, gt=0)
    proj_type: Literal["rademacher", "gaussian"] = "rademacher"
    proj_batch: int = Field(16, gt=0)  # examples per vmapped gradient pass, projected together
    target_benchmark: Literal["arc_easy", "mmlu"] = "arc_easy"
    # None: mmlu -> "dev" (LESS: the 5 exemplars per subject), arc_easy -> "train"
    target_split: str | None = None
    # per target subtask (seeded sample; MMLU dev has 5 per subject); None = the whole split
    target_examples: int | None = Field(32, gt=0)
    # Target gradients from a split that is also scored leak the evaluation set into selection.
    allow_eval_overlap: bool = False
    seed: int = 0

    def resolved_target_split(self) -> str:
        """``target_split``, or the target benchmark's default when unset."""
        return self.target_split or LESS_DEFAULT_TARGET_SPLIT[self.target_benchmark]


class SelectionConfig(Section):
    seed: int = 0  # random baseline
    less: LessConfig = Field(default_factory=LessConfig)


# --------------------------------------------------------------------------- evaluation
class FinetuneConfig(Section):
    """The fixed recipe every data variant is trained with, so variants differ only in data."""

    epochs: float = Field(3.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    micro_batch: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(256, gt=8)
    param_space: ParamSpaceConfig = Field(default_factory=ParamSpaceConfig)
    seed: int = 0


class BenchmarkConfig(Section):
    name: Literal["arc_easy", "mmlu"] = "arc_easy"
    split: str = "validation"
    shots: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0)


MAX_LOGITS_GIB = 2.0  # the default cap, shared by `nacd evaluate`


class EvaluationConfig(Section):
    targets: list[str] = Field(default_factory=lambda: ["smollm2-135m-instruct", "gemma3-270m"])
    variants: list[Literal["distilled", "random", "less", "full", "none"]] = Field(
        default_factory=lambda: ["distilled", "random", "less", "none"])
    benchmarks: list[BenchmarkConfig] = Field(default_factory=lambda: [BenchmarkConfig()])
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    # Changes to the recipe for one target, e.g. {gemma3-270m: {lr: 2.0e-4}}: a learning rate
    # tuned on one model can wreck another. Every variant of a target still gets the same recipe.
    finetune_per_target: dict[str, dict[str, Any]] = Field(default_factory=dict)
    batch_size: int = Field(8, gt=0)
    # Scoring shrinks the batch below batch_size where its logits (batch x longest input x
    # vocabulary floats) would take more: Gemma 3's 262k vocabulary on MMLU's long prompts.
    max_logits_gib: float = Field(MAX_LOGITS_GIB, gt=0)
    # lm_eval: lm-evaluation-harness's own tasks, as published numbers are scored. direct: the same
    # log-likelihoods by nacd's scorer (tests hold the two equal), which runs the output layer only
    # at scored positions: on 2 CPU cores 1.7-1.8x the harness's speed on Gemma 3 270M (262k
    # vocabulary), 1.3x on SmolLM2 (bench/results/scoring_speed.json).
    method: Literal["lm_eval", "direct"] = "lm_eval"

    @model_validator(mode="after")
    def _per_target_recipes_valid(self) -> EvaluationConfig:
        for target in self.finetune_per_target:
            self.finetune_for(target)
        return self

    def finetune_for(self, target: str) -> FinetuneConfig:
        """The recipe ``target`` is fine-tuned with: ``finetune`` with the target's changes."""
        changes = self.finetune_per_target.get(target)
        if not changes:
            return self.finetune
        try:
            return FinetuneConfig.model_validate(deep_merge(self.finetune.model_dump(), changes))
        except ValidationError as e:
            raise ValueError(format_validation_error(e, f"finetune_per_target.{target}")) from None


# --------------------------------------------------------------------------- the run
class RunConfig(Section):
    name: str = "nacd"
    budget: float = Field(0.05, gt=0)  # <1: fraction of the pool; >=1: number of samples
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    source: SourceModelConfig = Field(default_factory=SourceModelConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    seed_selection: SeedSelectionConfig = Field(default_factory=SeedSelectionConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)


def deep_merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` laid over it, section by section (neither is modified)."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def budget_count(budget: float, pool_size: int) -> int:
    """Samples in a budget: a fraction (<1) of the pool or an absolute count (>=1)."""
    if pool_size <= 0:
        raise ConfigError("budget: the data pool is empty")
    count = round(budget * pool_size) if budget < 1 else int(budget)
    if count < 1:
        raise ConfigError(f"budget: {budget} of a pool of {pool_size} selects no sample")
    if count > pool_size:
        raise ConfigError(f"budget: {count} samples asked but the pool has only {pool_size}")
    return count


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{key}'")
        elif e["type"] == "value_error":  # a section's own check: its message names the key
            lines.append(f"{origin}: '{key}': {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{origin}: '{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_override(item: str, flag: str = "--set") -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML (1e-3, true, [a, b]).
    Errors name ``flag`` (``--set``, ``--param``) and the item."""
    where = f"{flag} {item!r}"
    if "=" not in item:
        raise ConfigError(f"{where}: expected KEY=VALUE, e.g. distill.iterations=20")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"{where}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return key.strip().split("."), value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (1-based line and column)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def apply_overrides(data: dict, overrides: list[str], flag: str = "--set") -> dict:
    """Set each ``a.b.c=value`` in the nested ``data``; a numeric part indexes a list that the
    data already holds (``evaluation.benchmarks.0.limit=20``). Errors name ``flag``."""
    for item in overrides:
        path, value = parse_override(item, flag)
        where = f"{flag} {item!r}"
        node: Any = data
        for part, nxt in zip(path[:-1], path[1:]):
            node = _child(node, part, where, make_list=nxt.isdigit())
        _assign(node, path[-1], value, where)
    return data


def _child(node: Any, part: str, where: str, make_list: bool) -> Any:
    if isinstance(node, list):
        return _list_item(node, part, where)
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{part}' is not inside a section")
    if part not in node:
        if make_list:  # the list lives in the schema defaults, not in this file: spell it out
            raise ConfigError(f"{where}: '{part}' is not set in the config file; "
                              f"set the whole list, e.g. {where.split()[0]} '{part}=[...]'")
        node[part] = {}
    child = node[part]
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{where}: '{part}' is not a section")
    return child


def _list_item(node: list, part: str, where: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: index '{part}' is not in a list of {len(node)}")
    return node[int(part)]


def _assign(node: Any, key: str, value: Any, where: str) -> None:
    if isinstance(node, list):
        _list_item(node, key, where)
        node[int(key)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ConfigError(f"{where}: '{key}' is not inside a section")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    origin = str(path) if path else "<defaults>"
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
