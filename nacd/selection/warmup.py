"""LESS warm-up: LoRA training with AdamW on a small random part of the pool, one checkpoint
(trainable parameters + Adam moments + the epoch's mean learning rate) per epoch.

Checkpoints are folders ``epoch-NNN/`` (``state.safetensors`` + ``state.json``) renamed into
place when complete, so a crashed warm-up resumes from its last finished epoch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from nacd.atomic import temp_dir_beside
from nacd.config import LessConfig
from nacd.data.tokenization import collate
from nacd.models import ParamSpace

# AdamW moments as torch (and LESS, and HF Trainer) use them by default.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class AdamState:
    """Adam moments of the trainable parameters, flat in ParamSpace order, after ``step`` updates."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    beta1: float = ADAM_BETAS[0]
    beta2: float = ADAM_BETAS[1]
    eps: float = ADAM_EPS


@dataclass(frozen=True)
class Checkpoint:
    epoch: int
    step: int  # optimizer steps taken so far
    mean_lr: float  # the epoch's mean learning rate: LESS's checkpoint weight
    params: torch.Tensor  # trainable parameters, flat
    adam: AdamState


def lr_at(step: int, total: int, peak: float, schedule: str, warmup_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): a linear ramp over the first
    ``ceil(warmup_ratio * total)`` steps, then HF's constant/linear/cosine decay. Unlike HF's ramp
    (lr 0 at step 0) the ramp starts at peak/(warm+1): a warm-up of a single step must still move."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return peak * (step + 1) / (warm + 1)
    if schedule == "constant":
        return peak
    progress = (step - warm) / max(1, total - warm)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def trainable_params(model: nn.Module, space: ParamSpace) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in space.names]


def _save(ckpt: Checkpoint, lrs: list[float], root: Path) -> None:
    from safetensors.torch import save_file

    final = root / f"epoch-{ckpt.epoch:03d}"
    tmp = temp_dir_beside(final)
    try:
        save_file({"params": ckpt.params.contiguous(), "exp_avg": ckpt.adam.exp_avg.contiguous(),
                   "exp_avg_sq": ckpt.adam.exp_avg_sq.contiguous()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(
            {"epoch": ckpt.epoch, "step": ckpt.step, "mean_lr": ckpt.mean_lr, "lrs": lrs,
             "beta1": ckpt.adam.beta1, "beta2": ckpt.adam.beta2, "eps": ckpt.adam.eps}, indent=1))
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path) -> Checkpoint:
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    t = load_file(str(folder / "state.safetensors"))
    adam = AdamState(t["exp_avg"], t["exp_avg_sq"], int(meta["step"]), meta["beta1"], meta["beta2"], meta["eps"])
    return Checkpoint(int(meta["epoch"]), int(meta["step"]), float(meta["mean_lr"]), t["params"], adam)


def load_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete epoch checkpoints in ``root``, in epoch order (temp folders are ignored)."""
    if not root.is_dir():
        return []
    return [load_checkpoint(d) for d in sorted(root.glob("epoch-[0-9][0-9][0-9]"))
            if (d / "state.json").is_file()]


def _restore(opt: torch.optim.Optimizer, params: list[nn.Parameter], space: ParamSpace,
             ckpt: Checkpoint) -> None:
    avg, avg_sq = space.unflatten(ckpt.adam.exp_avg), space.unflatten(ckpt.adam.exp_avg_sq)
    with torch.no_grad():
        for name, p, value in zip(space.names, params, space.unflatten(ckpt.params).values()):
            p.copy_(value)
            opt.state[p] = {"step": torch.tensor(float(ckpt.step)),
                            "exp_avg": avg[name].clone().to(p), "exp_avg_sq": avg_sq[name].clone().to(p)}


def _adam_state(opt: torch.optim.Optimizer, params: list[nn.Parameter], step: int) -> AdamState:
    def flat(key: str) -> torch.Tensor:
        return torch.cat([opt.state[p][key].detach().reshape(-1).float().cpu() if p in opt.state
                          else torch.zeros(p.numel()) for p in params])

    return AdamState(flat("exp_avg"), flat("exp_avg_sq"), step)


def warmup_train(model: nn.Module, space: ParamSpace, examples: Sequence[dict], lcfg: LessConfig,
                 ckpt_dir: str | Path, *, pad_id: int = 0, log=print) -> list[Checkpoint]:
    """Train, or resume, the LESS warm-up; returns one checkpoint per epoch.

    Epoch e visits ``examples`` in a permutation seeded by (lcfg.seed, e), so a resumed run
    sees the same batches as an uninterrupted one."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    done = load_checkpoints(root)
    params = trainable_params(model, space)
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lcfg.warmup_lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            weight_decay=lcfg.weight_decay)
    per_step = lcfg.micro_batch * lcfg.grad_accum
    steps_per_epoch = math.ceil(len(examples) / per_step)
    total = steps_per_epoch * lcfg.warmup_epochs
    step = 0
    if done:
        _restore(opt, params, space, done[-1])
        step = done[-1].step
        log(f"LESS warm-up: resuming after epoch {done[-1].epoch} (step {step})")
    model.train()
    for epoch in range(len(done) + 1, lcfg.warmup_epochs + 1):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(
            lcfg.seed * 10_007 + epoch)).tolist()
        lrs = []
        for s in range(steps_per_epoch):
            lr = lr_at(step, total, lcfg.warmup_lr, lcfg.warmup_schedule, lcfg.warmup_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            chunk = order[s * per_step:(s + 1) * per_step]
            opt.zero_grad(set_to_none=True)
            for m in range(0, len(chunk), lcfg.micro_batch):
                batch = collate([examples[i] for i in chunk[m:m + lcfg.micro_batch]], pad_id)
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                (loss * len(chunk[m:m + lcfg.micro_batch]) / len(chunk)).backward()
            opt.step()
            lrs.append(lr)
            step += 1
        ckpt = Checkpoint(epoch, step, sum(lrs) / len(lrs), space.get(model).float().cpu(),
                          _adam_state(opt, params, step))
        _save(ckpt, lrs, root)
        done.append(ckpt)
        log(f"LESS warm-up: epoch {epoch}/{lcfg.warmup_epochs} done, last loss {loss.item():.4f}, "
            f"mean lr {ckpt.mean_lr:.3g}")
    model.eval()
    return done[:lcfg.warmup_epochs]
