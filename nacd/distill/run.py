"""The outer loop (trajectory matching) and the ``distill`` stage.

Per iteration: draw an expert and a start checkpoint min_start <= t < max_start, build the minibatch schedule
(N index tensors), compute the gradient of L = L_match + beta * L_reg with the configured mode,
and take one optimizer step on the embeddings (lr_embeddings) and one on log_alpha (lr_alpha).
All randomness comes from one ``torch.Generator`` seeded with ``distill.seed``, so a run is
deterministic for a seed, and its state is part of every checkpoint.

Guards:
- NaN/inf in a loss or gradient stops the run with ``FloatingPointError`` naming the iteration;
  the last checkpoint is intact, nothing of that iteration is applied.
- alpha blow-up: after every step log_alpha is clamped to ``log(max_alpha)`` (a documented clamp,
  not an error: a learning rate that wants to grow past ``max_alpha`` keeps the largest
  allowed value; the history records ``alpha_clamped``).
- gradient spikes: with ``max_grad_norm`` set, each outer gradient is clipped to that norm before
  the step (the history keeps the unclipped norms and records ``grad_clipped``).

Checkpoints (``out_dir/checkpoints/iter-NNNNNN/``, every ``checkpoint_every`` iterations and at
the end) are model-free: learnable tensors, optimizer states, the sampler's RNG state, the
iteration and the loss history, as ``state.safetensors`` + ``state.json``, built in a temp
folder and renamed into place. A restarted run resumes from the newest one and reproduces the
uninterrupted run bit for bit on CPU. A checkpoint made under another configuration (other
seeds, model, parameter space or distill settings other than ``iterations`` and
``checkpoint_every``) is refused with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from nacd import storage
from nacd.atomic import temp_dir_beside
from nacd.config import DistillConfig, RunConfig
from nacd.distill.gradients import MODES, total_gradients
from nacd.distill.losses import Student
from nacd.distill.synthetic import (SyntheticSet, SyntheticSetError, load_tensors,
                                    pad_seeds, save_tensors)
from nacd.models import ParamSpace

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "iter-"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


class DistillError(ValueError):
    """Bad input to distillation, worded for the user."""


class Trajectory(Protocol):
    """What the loop needs of an expert (``nacd.trajectories.ExpertTrajectory`` provides it)."""

    name: str
    manifest: dict

    def __len__(self) -> int: ...

    def read(self, i: int) -> torch.Tensor: ...


# --------------------------------------------------------------------------- validation
def check_experts(experts: Sequence[Trajectory], space: ParamSpace, cfg: DistillConfig,
                  source_name: str | None = None, source_revision: str | None = None) -> None:
    """Every expert has this model's layout and enough checkpoints for every allowed start."""
    if not experts:
        raise DistillError("the trajectory store has no committed expert: run train_experts first")
    for traj in experts:
        manifest = traj.manifest
        if "param_space" not in manifest:
            raise DistillError(f"expert '{traj.name}': manifest has no 'param_space'")
        try:
            space.check_matches(manifest["param_space"], where=f"expert '{traj.name}'")
        except ValueError as e:
            raise DistillError(str(e)) from None
        theirs = manifest["param_space"].get("lora")
        if space.lora and theirs and dict(theirs) != dict(space.lora):
            raise DistillError(f"expert '{traj.name}': LoRA settings {theirs} differ from the model's "
                               f"{dict(space.lora)}")
        src = manifest.get("source_model") or {}
        if source_name is not None and src.get("name") and src["name"] != source_name:
            raise DistillError(f"expert '{traj.name}' was trained on model '{src['name']}', "
                               f"distillation uses '{source_name}'")
        if source_revision and src.get("revision") and src["revision"] != source_revision:
            raise DistillError(f"expert '{traj.name}' was trained on revision '{src['revision']}' of the "
                               f"source model, distillation uses '{source_revision}'")
        last_needed = cfg.max_start - 1 + cfg.expert_epochs
        if last_needed > len(traj) - 1:
            raise DistillError(
                f"expert '{traj.name}' has {len(traj)} checkpoints (0..{len(traj) - 1}) but "
                f"distill.max_start={cfg.max_start} and distill.expert_epochs={cfg.expert_epochs} need "
                f"checkpoint {last_needed} (start up to {cfg.max_start - 1}, target M={cfg.expert_epochs} later)")


# --------------------------------------------------------------------------- state (de)serialisation
def _flatten_optimizer(sd: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, state = {}, {}
    for pid, entry in sd["state"].items():
        state[str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                name = f"{prefix}.{pid}.{key}"
                tensors[name] = value
                state[str(pid)][key] = {"tensor": name}
            else:
                state[str(pid)][key] = value
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {int(pid): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                        for k, v in entry.items()} for pid, entry in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _finite(name: str, value: torch.Tensor | float, iteration: int) -> None:
    t = torch.as_tensor(value)
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"distill iteration {iteration}: {name} is not finite "
                                 f"(NaN/inf); lower distill.lr_embeddings / lr_alpha / init_alpha or "
                                 f"max_alpha. The last checkpoint is intact.")


# --------------------------------------------------------------------------- the loop
class Distiller:
    """Optimises a synthetic set by trajectory matching against ``experts``."""

    def __init__(self, student: Student, syn: SyntheticSet, experts: Sequence[Trajectory], cfg: DistillConfig,
                 *, exclude_ids: Sequence[int] = (), fingerprint: str = "", check: bool = True):
        if cfg.grad_mode not in MODES:
            raise DistillError(f"distill.grad_mode must be one of {sorted(MODES)}, got {cfg.grad_mode!r}")
        try:
            syn.check_hidden_size(student.hidden_size, "source model")
        except SyntheticSetError as e:
            raise DistillError(str(e)) from None
        if check:
            check_experts(experts, student.space, cfg)
        self.student, self.experts, self.cfg = student, list(experts), cfg
        self.exclude_ids = list(exclude_ids)
        self.fingerprint = fingerprint
        dtype = student.table.dtype
        syn = syn.to(student.table.device)  # made (or loaded) on the CPU; the student may be on a GPU
        self.syn = syn
        self.prompt = syn.prompt_embeds.detach().to(dtype).clone().requires_grad_(True)
        self.instruction = (None if syn.instruction_embeds is None
                            else syn.instruction_embeds.detach().to(dtype).clone().requires_grad_(True))
        self.log_alpha = syn.log_alpha.detach().to(dtype).clone().reshape(()).requires_grad_(True)
        emb_params = [self.prompt] + ([self.instruction] if self.instruction is not None else [])
        self.opt_embeddings = self._optimizer(emb_params, cfg.lr_embeddings)
        self.opt_alpha = self._optimizer([self.log_alpha], cfg.lr_alpha)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.iteration = 0
        self.history: list[dict] = []
        with torch.no_grad():
            self.log_alpha.clamp_(max=math.log(cfg.max_alpha))

    def _optimizer(self, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr)

    # ------------------------------------------------------------------ one iteration
    def current(self) -> SyntheticSet:
        s = self.syn
        return SyntheticSet(self.prompt.detach(), s.seed_input_ids, s.seed_labels, s.seed_attention_mask,
                            self.log_alpha.detach(), None if self.instruction is None else self.instruction.detach(),
                            s.meta, s.init_prompt_ids)

    def draw(self) -> tuple[int, int, list[torch.Tensor]]:
        """(expert index, start checkpoint, minibatch schedule) from the loop's generator."""
        cfg, g = self.cfg, self.generator
        e = int(torch.randint(len(self.experts), (1,), generator=g))
        # min_start 0 draws exactly what the loop drew before min_start existed
        t = cfg.min_start + int(torch.randint(cfg.max_start - cfg.min_start, (1,), generator=g))
        k = self.syn.num_samples
        batch = min(cfg.batch_syn, k)
        schedule = [torch.randperm(k, generator=g)[:batch] for _ in range(cfg.syn_steps)]
        return e, t, schedule

    def step(self) -> dict:
        cfg, it = self.cfg, self.iteration
        t0 = time.perf_counter()
        e, t, schedule = self.draw()
        traj = self.experts[e]
        device, dtype = self.student.table.device, self.student.table.dtype
        start, target = (traj.read(t).to(device, dtype), traj.read(t + cfg.expert_epochs).to(device, dtype))
        out = total_gradients(cfg.grad_mode, self.student, start, target, self.current(), schedule,
                              beta=cfg.beta, distance=cfg.distance, table=self.student.table,
                              exclude_ids=self.exclude_ids, straight_through=cfg.straight_through)
        _finite("L_match", out.l_match, it)
        _finite("L_reg", out.l_reg, it)
        _finite("the prompt-embedding gradient", out.grad_prompt, it)
        _finite("the log_alpha gradient", out.grad_log_alpha, it)
        if out.grad_instruction is not None:
            _finite("the instruction-embedding gradient", out.grad_instruction, it)
        self.prompt.grad = out.grad_prompt.to(dtype)
        if self.instruction is not None:
            self.instruction.grad = out.grad_instruction.to(dtype)
        self.log_alpha.grad = out.grad_log_alpha.to(dtype).reshape(())
        norms = {"grad_norm_prompt": float(out.grad_prompt.norm()),
                 "grad_norm_instruction": None if out.grad_instruction is None else float(out.grad_instruction.norm()),
                 "grad_log_alpha": float(out.grad_log_alpha)}  # before clipping, which scales them in place
        clipped = self._clip_gradients()
        self.opt_embeddings.step()
        self.opt_alpha.step()
        self.opt_embeddings.zero_grad(set_to_none=True)
        self.opt_alpha.zero_grad(set_to_none=True)
        limit = math.log(cfg.max_alpha)
        alpha_clamped = bool(self.log_alpha.detach() > limit)
        with torch.no_grad():
            self.log_alpha.clamp_(max=limit)
        _finite("an updated embedding", self.prompt.detach(), it)
        record = {"iteration": it, "expert": traj.name, "start": t, "l_match": out.l_match, "l_reg": out.l_reg,
                  "loss": out.l_match + cfg.beta * out.l_reg, "alpha": float(self.log_alpha.detach().exp()),
                  "alpha_clamped": alpha_clamped, **norms, "grad_clipped": clipped, "exact": out.exact,
                  "prompt_tokens_changed": self.syn.prompt_tokens_changed(out.nearest_ids),
                  "seconds": time.perf_counter() - t0}
        self.history.append(record)
        self.iteration += 1
        return record

    def _clip_gradients(self) -> bool:
        """Scale the embeddings' joint gradient and log_alpha's to at most ``max_grad_norm``; True if either was."""
        limit = self.cfg.max_grad_norm
        if limit is None:
            return False
        groups = [[p for group in opt.param_groups for p in group["params"]]
                  for opt in (self.opt_embeddings, self.opt_alpha)]
        clipped = [float(torch.nn.utils.clip_grad_norm_(params, limit)) > limit for params in groups]
        return any(clipped)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt_root: Path) -> Path:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        final = ckpt_root / f"{CHECKPOINT_PREFIX}{self.iteration:06d}"
        tmp = temp_dir_beside(final)
        try:
            emb_t, emb_meta = _flatten_optimizer(self.opt_embeddings.state_dict(), "opt_embeddings")
            alpha_t, alpha_meta = _flatten_optimizer(self.opt_alpha.state_dict(), "opt_alpha")
            tensors = {"prompt_embeds": self.prompt, "log_alpha": self.log_alpha,
                       "rng": self.generator.get_state(), **emb_t, **alpha_t}
            if self.instruction is not None:
                tensors["instruction_embeds"] = self.instruction
            save_tensors(tmp / STATE_TENSORS, tensors)
            storage.write_json(str(tmp / STATE_JSON), {
                "iteration": self.iteration, "history": self.history, "fingerprint": self.fingerprint,
                "opt_embeddings": emb_meta, "opt_alpha": alpha_meta})
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in ckpt_root.glob(f"{CHECKPOINT_PREFIX}*"):  # keep only the newest
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        meta = json.loads((path / STATE_JSON).read_text())
        if meta.get("fingerprint") != self.fingerprint:
            raise DistillError(f"{path}: this checkpoint was made with another configuration (seeds, model, "
                               f"parameter space or distill settings differ); remove {path.parent} or use "
                               f"another output folder")
        t = load_tensors(path / STATE_TENSORS)
        if t["prompt_embeds"].shape != self.prompt.shape:
            raise DistillError(f"{path}: prompt_embeds {list(t['prompt_embeds'].shape)} but this run has "
                               f"{list(self.prompt.shape)}")
        with torch.no_grad():
            self.prompt.copy_(t["prompt_embeds"])
            self.log_alpha.copy_(t["log_alpha"])
            if self.instruction is not None:
                self.instruction.copy_(t["instruction_embeds"])
        self.opt_embeddings.load_state_dict(_unflatten_optimizer(meta["opt_embeddings"], t))
        self.opt_alpha.load_state_dict(_unflatten_optimizer(meta["opt_alpha"], t))
        self.generator.set_state(t["rng"])
        self.iteration = int(meta["iteration"])
        self.history = list(meta["history"])

    @staticmethod
    def latest_checkpoint(ckpt_root: Path) -> Path | None:
        found = sorted(p for p in ckpt_root.glob(f"{CHECKPOINT_PREFIX}*")
                       if p.is_dir() and (p / STATE_JSON).is_file()) if ckpt_root.is_dir() else []
        return found[-1] if found else None

    # ------------------------------------------------------------------ driver
    def run(self, iterations: int, ckpt_root: Path | None = None, *, progress: bool = True,
            on_iteration: Callable[[dict], None] | None = None) -> list[dict]:
        """Iterate up to ``iterations`` (resuming from the newest checkpoint in ``ckpt_root``)."""
        from tqdm.auto import tqdm

        if ckpt_root is not None:
            latest = self.latest_checkpoint(ckpt_root)
            if latest is not None:
                self.load_checkpoint(latest)
                log.info("resumed from %s (iteration %d)", latest, self.iteration)
        bar = tqdm(total=iterations, initial=min(self.iteration, iterations), disable=not progress,
                   desc="distill", unit="it", dynamic_ncols=True)
        try:
            while self.iteration < iterations:
                rec = self.step()
                bar.update(1)
                bar.set_postfix(L_match=f"{rec['l_match']:.4f}", L_reg=f"{rec['l_reg']:.4f}",
                                alpha=f"{rec['alpha']:.3g}")
                log.debug("iteration %d: %s", rec["iteration"], rec)
                if ckpt_root is not None and (self.iteration % self.cfg.checkpoint_every == 0
                                              or self.iteration == iterations):
                    self.save_checkpoint(ckpt_root)
                if on_iteration is not None:
                    on_iteration(rec)
        finally:
            bar.close()
        return self.history


# --------------------------------------------------------------------------- the stage
def _read_seeds(seeds_dir: str | Path) -> list[int]:
    path = Path(seeds_dir) / "seeds.json"
    if not path.is_file():
        raise DistillError(f"{path}: not found (run select_seeds first)")
    try:
        indices = json.loads(path.read_text())["indices"]
    except (ValueError, KeyError, TypeError) as e:
        raise DistillError(f"{path}: expected {{\"indices\": [...]}} ({e})") from None
    if not isinstance(indices, list) or not indices:
        raise DistillError(f"{path}: 'indices' is empty: the synthetic set needs at least one seed sample")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise DistillError(f"{path}: 'indices' must be integers")
    return indices


def _read_seed_rows(dataset_dir: str | Path, indices: list[int]) -> list[dict]:
    import datasets

    hf = Path(dataset_dir) / "hf"
    if not hf.is_dir():
        raise DistillError(f"{dataset_dir}: no tokenised dataset (hf/ missing); run prepare_data first")
    ds = datasets.load_from_disk(str(hf))
    missing = [c for c in ("input_ids", "labels", "attention_mask") if c not in ds.column_names]
    if missing:
        raise DistillError(f"{hf}: columns {missing} missing (has {ds.column_names})")
    bad = [i for i in indices if not 0 <= i < len(ds)]
    if bad:
        raise DistillError(f"seeds.json: indices {bad[:5]} out of range for a dataset of {len(ds)} rows")
    rows = [dict(ds[int(i)], index=int(i)) for i in indices]
    for r in rows:
        if not any(lab != -100 for lab in r["labels"]):
            raise DistillError(f"{hf}: seed row {r['index']} has no response token (all labels -100)")
    return rows


def _fingerprint(cfg: RunConfig, indices: list[int], experts: Sequence[Trajectory]) -> str:
    # an unset option (None) is the same run as one made before that option existed
    d = {k: v for k, v in cfg.distill.model_dump(mode="json").items() if v is not None}
    for volatile in ("iterations", "checkpoint_every"):
        d.pop(volatile)
    blob = json.dumps({"distill": d, "source": cfg.source.model_dump(mode="json"), "seeds": indices,
                       "experts": [(x.name, len(x)) for x in experts]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def source_student(cfg: RunConfig) -> tuple[Student, Any, list[int]]:
    """The frozen source model as a ``Student`` in ``cfg.source``'s parameter space, its tokenizer,
    and the token ids the set is never projected to nor pulled towards (``distill.exclude_special_tokens``)."""
    from nacd.models import load_model, load_tokenizer, make_trainable
    from nacd.projection import special_token_ids

    model = load_model(cfg.source.name, dtype=cfg.source.dtype, revision=cfg.source.revision)
    model = make_trainable(model, cfg.source.param_space)
    space = ParamSpace.from_model(model, cfg.source.param_space)
    for p in model.parameters():  # the student's parameters come from the flat vectors
        p.requires_grad_(False)
    student = Student.from_model(model, space)
    tokenizer = load_tokenizer(cfg.source.name, cfg.source.revision)
    exclude = special_token_ids(tokenizer) if cfg.distill.exclude_special_tokens else []
    return student, tokenizer, [i for i in exclude if i < student.table.shape[0]]


def distill(cfg: RunConfig, dataset_dir: str | Path, seeds_dir: str | Path, store_uri: str,
            out_dir: str | Path, *, progress: bool = True) -> dict:
    """The distill stage: synthetic set in ``out_dir`` (``synthetic.safetensors`` + ``synthetic.json``),
    resume state in ``out_dir/checkpoints/``. Every input is validated before anything is written."""
    from nacd.trajectories import open_store

    d = cfg.distill
    indices = _read_seeds(seeds_dir)
    rows = _read_seed_rows(dataset_dir, indices)
    student, tokenizer, exclude = source_student(cfg)
    experts = open_store(store_uri, cfg.storage).experts()
    check_experts(experts, student.space, d, cfg.source.name, cfg.source.revision)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, labels, mask = pad_seeds(rows, pad_id)
    seed_rows = [{"index": r["index"], "id": str(r.get("id", r["index"])), "prompt": r.get("prompt"),
                  "response": r.get("response")} for r in rows]
    meta = {"source_model": {"name": cfg.source.name, "revision": cfg.source.revision},
            "param_space": student.space.describe(), "distance": d.distance, "beta": d.beta,
            "grad_mode": d.grad_mode, "straight_through": d.straight_through,
            "exclude_special_tokens": d.exclude_special_tokens,
            "seeds": seed_rows, "seeds_dir": str(seeds_dir), "dataset_dir": str(dataset_dir)}
    syn = SyntheticSet.init(student.table, ids, labels, mask, prompt_len=d.prompt_len, init=d.init,
                            init_std=d.init_std, init_alpha=d.init_alpha,
                            learnable_instruction=d.learnable_instruction,
                            generator=torch.Generator().manual_seed(d.seed), exclude_ids=exclude, meta=meta)
    fingerprint = _fingerprint(cfg, indices, experts)
    loop = Distiller(student, syn, experts, d, exclude_ids=exclude, fingerprint=fingerprint, check=False)
    out = Path(out_dir)
    t0 = time.perf_counter()
    history = loop.run(d.iterations, out / "checkpoints", progress=progress)
    result = loop.current()
    result.meta = dict(meta, iteration=loop.iteration, history=history, fingerprint=fingerprint)
    result.save_pretrained(out)
    last = history[-1]
    return {"iterations": loop.iteration, "samples": result.num_samples, "prompt_len": result.prompt_len,
            "l_match_first": history[0]["l_match"], "l_match_last": last["l_match"],
            "l_reg_last": last["l_reg"], "alpha": last["alpha"], "grad_mode": d.grad_mode,
            "seconds": time.perf_counter() - t0, "out_dir": str(out)}
