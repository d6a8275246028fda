"""Stage select_less: LESS (Xia et al. 2024, "Selecting Influential Data for Targeted Instruction
Tuning") on the pool, at the run's budget.

1. Warm-up: LoRA + AdamW on a random ``warmup_fraction`` of the pool, a checkpoint per epoch
   (:mod:`nacd.selection.warmup`).
2. Per checkpoint c, per pool example z: the LoRA gradient turned into the Adam update
   direction the optimizer would take from c (:func:`adam_feature`); per target example: the
   plain gradient. Both projected to ``proj_dim`` (:class:`RandomProjector`), then normalised.
3. ``score(z) = max_s sum_c w_c mean_{v in s} cos(F_c(z), G_c(v))`` with ``w_c`` the mean learning
   rate of epoch c (normalised to sum 1) and ``s`` the target subtasks (MMLU: subjects;
   ARC-Easy: one task). The top ``budget`` examples form the variant.

Target examples (see nacd/selection/README.md): MMLU ``dev`` (5 per subject, as LESS), ARC-Easy a seeded
``target_examples`` from ``train`` by default. A target split that an evaluation benchmark also
scores is refused before the run (:func:`nacd.pipeline_params.check_no_eval_leak`, on the whole
config: this stage is not given the evaluation settings) unless ``selection.less.allow_eval_overlap``
is set: it would leak the evaluation set into selection.

Memory stays flat in the pool size: per-checkpoint train features are streamed through the
projection in batches of ``proj_batch`` and reduced to per-subtask scores at once; only the
(pool x subtasks) score matrix of each checkpoint is kept (and cached for resume).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nacd import storage
from nacd.config import LessConfig, RunConfig
from nacd.data.prepare import prepared_fingerprint
from nacd.models import ParamSpace
from nacd.selection.common import (SelectionError, budget_for, load_pool, random_subset,
                                   variant_rows)
from nacd.selection.projection import RandomProjector
from nacd.data.tokenization import IGNORE_INDEX, tokenize_example
from nacd.selection.warmup import AdamState, Checkpoint, warmup_train

SCORES_FILE = "less_scores.json"


# --------------------------------------------------------------------------- features
def adam_feature(grad: torch.Tensor, adam: AdamState) -> torch.Tensor:
    """The update direction Adam would take from the checkpoint on this one gradient (LESS eq. 2):
    ``m = (b1 m_t + (1-b1) g) / (1 - b1^(t+1))``, ``v = (b2 v_t + (1-b2) g^2) / (1 - b2^(t+1))``,
    ``m / (sqrt(v) + eps)``, where t = optimizer steps taken (so t+1 is the step's bias correction,
    exactly what torch.optim.Adam applies)."""
    g = grad.to(adam.exp_avg)
    t = adam.step + 1
    m = (adam.beta1 * adam.exp_avg + (1 - adam.beta1) * g) / (1 - adam.beta1 ** t)
    v = (adam.beta2 * adam.exp_avg_sq + (1 - adam.beta2) * g * g) / (1 - adam.beta2 ** t)
    return m / (v.sqrt() + adam.eps)


def example_grads(model: nn.Module, names: Sequence[str], examples: Sequence[dict]) -> torch.Tensor:
    """Per-example gradients of each example's mean response-token loss w.r.t. the parameters
    ``names``, flat in that order: (len(examples), numel) float32 on the model's device.

    One vmapped forward and backward for the whole batch (``torch.func``). A batch-1 pass is bound
    by per-operator overhead rather than arithmetic, most of all on a GPU, so b examples cost about
    what one did (bench/less_features.py counts the calls). The batch is right-padded and has no attention
    mask: under causal attention tokens after an example's last one change none of its positions,
    and their labels carry no loss, so each gradient is the unpadded example's."""
    from torch.func import functional_call, grad, vmap

    device = next(model.parameters()).device
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        if not any(t != IGNORE_INDEX for t in ex["labels"][1:]):
            raise SelectionError(f"example {ex.get('id', '?')}: no response token carries a loss")
        ids[i, :len(ex["input_ids"])] = torch.tensor(ex["input_ids"])
        labels[i, :len(ex["labels"])] = torch.tensor(ex["labels"])
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}

    def loss(p: dict[str, torch.Tensor], one_ids: torch.Tensor, one_labels: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, args=(), kwargs={"input_ids": one_ids[None], "use_cache": False}).logits
        return nn.functional.cross_entropy(logits[0, :-1].float(), one_labels[1:], ignore_index=IGNORE_INDEX)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, ids.to(device), labels.to(device))
    return torch.cat([grads[n].reshape(len(examples), -1) for n in names], dim=1).float()


def projected_features(model: nn.Module, names: Sequence[str], examples: Sequence[dict],
                       projector: RandomProjector, batch: int,
                       transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterable[torch.Tensor]:
    """Yield (b, proj_dim) unit-norm features, ``batch`` examples at a time (the last may be short)."""
    for start in range(0, len(examples), batch):
        g = example_grads(model, names, [examples[i] for i in range(start, min(start + batch, len(examples)))])
        yield torch.nn.functional.normalize(projector.project(transform(g) if transform else g), dim=1).cpu()


def subtask_means(train: torch.Tensor, target: torch.Tensor, groups: Sequence[slice]) -> torch.Tensor:
    """(n, k) x (V, k) unit features -> (n, S): mean cosine over each subtask's target rows."""
    sims = train @ target.T
    return torch.stack([sims[:, g].mean(dim=1) for g in groups], dim=1)


def combine_scores(per_checkpoint: Sequence[torch.Tensor], lrs: Sequence[float]) -> torch.Tensor:
    """LESS's final score: lr-weighted sum over checkpoints (weights normalised), max over subtasks."""
    if len(per_checkpoint) != len(lrs) or not lrs:
        raise ValueError(f"{len(per_checkpoint)} score matrices for {len(lrs)} checkpoint weights")
    total = sum(lrs)
    if total <= 0:
        raise ValueError(f"checkpoint learning rates sum to {total}: no weight to combine with")
    combined = sum(w / total * s for w, s in zip(lrs, per_checkpoint))
    return combined.max(dim=1).values


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class TargetSet:
    benchmark: str
    split: str
    names: list[str]  # subtasks in order
    examples: list[dict]  # tokenised, grouped by subtask, in ``names`` order
    groups: list[slice]  # rows of ``examples`` per subtask

    def describe(self) -> dict:
        return {"benchmark": self.benchmark, "split": self.split,
                "subtasks": {n: [e["id"] for e in self.examples[g]] for n, g in zip(self.names, self.groups)}}


def load_targets(cfg: RunConfig, tokenizer) -> TargetSet:
    """The target examples: benchmark questions as instruction data in the pool's own template."""
    from nacd.data.benchmarks import load_benchmark
    from nacd.data.formats import mc_to_instruction, render_prompt

    lcfg = cfg.selection.less
    split = lcfg.resolved_target_split()
    questions = load_benchmark(lcfg.target_benchmark, split, cfg.data.data_dir)
    by_task: dict[str, list] = {}
    for q in questions:
        by_task.setdefault(q.subject or lcfg.target_benchmark, []).append(q)
    names, examples, groups = sorted(by_task), [], []
    rng = np.random.default_rng(lcfg.seed)
    for name in names:
        qs = by_task[name]
        if lcfg.target_examples is not None and len(qs) > lcfg.target_examples:
            qs = [qs[i] for i in sorted(rng.choice(len(qs), lcfg.target_examples, replace=False))]
        start = len(examples)
        for q in qs:
            ex = mc_to_instruction(q)
            # Tokenised as prepare_data tokenises the pool (same template, same token layout). A
            # target longer than max_length loses the start of its prompt, not its answer: the
            # question's end, the choices and the answer label are what its gradient is about.
            tok = tokenize_example(tokenizer, render_prompt(ex, cfg.data.template, tokenizer),
                                   ex.response, 2**62, "drop")
            ids, labels = tok.input_ids[-cfg.data.max_length:], tok.labels[-cfg.data.max_length:]
            examples.append({"input_ids": ids, "labels": labels, "id": q.id})
        groups.append(slice(start, len(examples)))
    return TargetSet(lcfg.target_benchmark, split, names, examples, groups)


# --------------------------------------------------------------------------- scoring
def checkpoint_scores(model: nn.Module, space: ParamSpace, ckpt: Checkpoint, pool: Sequence[dict],
                      targets: TargetSet, lcfg: LessConfig) -> torch.Tensor:
    """(pool, subtasks) mean cosine of Adam train features to SGD target features at ``ckpt``."""
    space.set(model, ckpt.params.to(next(model.parameters()).dtype))
    device = next(model.parameters()).device
    adam = AdamState(ckpt.adam.exp_avg.to(device), ckpt.adam.exp_avg_sq.to(device), ckpt.adam.step,
                     ckpt.adam.beta1, ckpt.adam.beta2, ckpt.adam.eps)
    projector = RandomProjector(space.numel, lcfg.proj_dim, seed=lcfg.seed, kind=lcfg.proj_type,
                                device=device)
    model.eval()  # no dropout in the features
    target = torch.cat(list(projected_features(model, space.names, targets.examples, projector, lcfg.proj_batch)))
    parts = [subtask_means(f, target, targets.groups) for f in projected_features(
        model, space.names, pool, projector, lcfg.proj_batch, transform=lambda g: adam_feature(g, adam))]
    return torch.cat(parts)


def _pool_fingerprint(dataset_dir: Path, pool) -> str:
    if (fingerprint := prepared_fingerprint(dataset_dir)) is not None:
        return str(fingerprint)
    return hashlib.sha256(json.dumps(list(pool["id"])).encode()).hexdigest()


def work_dir_for(out_dir: str | Path) -> Path:
    """Warm-up checkpoints and per-checkpoint scores live beside the output (the output folder is
    replaced atomically when the variant is written), so a crashed run resumes from them."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.less-work"


def _prepare_work(work: Path, key: str, log) -> None:
    stamp = work / "key.json"
    if work.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
        log(f"LESS: {work} holds work for another config or pool; starting afresh")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        storage.write_json(str(stamp), {"key": key})


def _cached_scores(path: Path, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    from safetensors.torch import load_file, save

    if path.is_file():
        return load_file(str(path))["scores"]
    scores = compute()
    storage.write_bytes(str(path), save({"scores": scores.contiguous()}))
    return scores


def select_less(cfg: RunConfig, dataset_dir: str | Path, out_dir: str | Path, *, log=print) -> dict:
    """Write the ``less`` variant dataset plus ``less_scores.json`` (one score per pool row)."""
    from nacd.data.variants import atomic_dir, check_replaceable, write_variant
    from nacd.models import load_model, load_tokenizer, make_trainable

    check_replaceable(out_dir, SCORES_FILE)  # before minutes of warm-up, not after
    t0 = time.time()
    dataset_dir = Path(dataset_dir)
    lcfg = cfg.selection.less
    pool_ds = load_pool(dataset_dir)
    for col in ("input_ids", "labels"):
        if col not in pool_ds.column_names:
            raise SelectionError(f"{dataset_dir / 'hf'}: column '{col}' missing (LESS needs the tokenised pool)")
    n = len(pool_ds)
    k = budget_for(cfg.budget, n, str(dataset_dir))
    tokenizer = load_tokenizer(cfg.source.name, cfg.source.revision)
    targets = load_targets(cfg, tokenizer)
    pool = [{"input_ids": r["input_ids"], "labels": r["labels"], "id": r["id"]}
            for r in pool_ds.select_columns(["input_ids", "labels", "id"])]

    key = hashlib.sha256(json.dumps({
        "less": lcfg.model_dump(mode="json"), "source": cfg.source.model_dump(mode="json"),
        "template": cfg.data.template, "max_length": cfg.data.max_length,
        "pool": _pool_fingerprint(dataset_dir, pool_ds), "targets": targets.describe()},
        sort_keys=True).encode()).hexdigest()
    work = work_dir_for(out_dir)
    _prepare_work(work, key, log)

    model = load_model(cfg.source.name, dtype=cfg.source.dtype, revision=cfg.source.revision,
                       device="cuda" if torch.cuda.is_available() else "cpu")
    model = make_trainable(model, cfg.source.param_space, seed=lcfg.seed)
    space = ParamSpace.from_model(model, cfg.source.param_space)
    n_warm = max(1, round(lcfg.warmup_fraction * n))
    warm_idx = random_subset(n, n_warm, lcfg.seed)
    ckpts = warmup_train(model, space, [pool[i] for i in warm_idx], lcfg, work / "warmup",
                         pad_id=tokenizer.pad_token_id or 0, log=log)
    t_warm = time.time() - t0

    per_ckpt = []
    for c in ckpts:
        per_ckpt.append(_cached_scores(work / f"scores-epoch-{c.epoch:03d}.safetensors",
                                       lambda c=c: checkpoint_scores(model, space, c, pool, targets, lcfg)))
        log(f"LESS: features and scores of epoch {c.epoch} done ({time.time() - t0:.0f}s)")
    lrs = [c.mean_lr for c in ckpts]
    scores = combine_scores(per_ckpt, lrs)
    # Highest score first; ties go to the earlier pool row (stable sort), so the result is deterministic.
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    top = order[:k]

    rows = variant_rows(pool_ds, top, {"less_score": [float(scores[i]) for i in top],
                                       "less_rank": list(range(1, k + 1))})
    total_lr = sum(lrs)
    report = {
        "method": "less", "ids": list(pool_ds["id"]), "scores": [float(s) for s in scores],
        "selected": top, "budget": k, "pool_size": n,
        "checkpoints": [{"epoch": c.epoch, "step": c.step, "mean_lr": c.mean_lr, "weight": c.mean_lr / total_lr}
                        for c in ckpts],
        "warmup_indices": warm_idx, "proj_dim": lcfg.proj_dim, "proj_type": lcfg.proj_type,
        "param_numel": space.numel, "target": targets.describe(),
    }
    meta = {"variant": "less", "budget": k, "pool_size": n, "seed": lcfg.seed,
            "target_benchmark": targets.benchmark, "target_split": targets.split,
            "target_examples": len(targets.examples), "warmup_examples": n_warm,
            "checkpoints": len(ckpts), "proj_dim": lcfg.proj_dim}
    # The variant folder and less_scores.json appear together: both are written inside one temp
    # folder that replaces out_dir in a single rename.
    with atomic_dir(out_dir, SCORES_FILE) as tmp:
        write_variant(rows, tmp, meta)
        storage.write_json(str(tmp / SCORES_FILE), report)
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": k, "pool_size": n, "warmup_examples": n_warm, "checkpoints": len(ckpts),
            "target_examples": len(targets.examples), "warmup_s": round(t_warm, 1),
            "total_s": round(time.time() - t0, 1)}
