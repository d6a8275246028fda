"""Stage ``train_experts``: train the source model E times and record its trainable parameters.

``train_expert(cfg, dataset_dir, store_uri, expert_index)`` trains expert ``i`` with seed
``cfg.experts.base_seed + i`` (LoRA init and data order) and writes checkpoints at step 0 and
every ``save_every`` optimizer steps (plus epoch ends when asked) into the trajectory store.

Batching is defined once for any number of processes: optimizer step ``s`` consumes the global
batch ``perm(epoch)[pos*G:(pos+1)*G]`` with ``G = micro_batch * grad_accum * world_size``, cut
into ``world_size * grad_accum`` micro-batches; rank ``r`` takes micro-batches
``r*grad_accum .. (r+1)*grad_accum-1``. Hence a 2-process DeepSpeed run and a 1-process run with
twice the accumulation see the same micro-batches and follow the same trajectory (to rounding).
The permutation depends only on (seed, epoch), so the data order needs no saved state.

With ``cfg.experts.deepspeed`` the model runs under the DeepSpeed engine (ZeRO stage 0-3
presets in ``nacd/resources/deepspeed``); checkpoints gather the full trainable parameters on all
ranks (ZeRO-3: ``GatheredParameters``) and rank 0 writes. ``launch_train_expert`` starts
``torchrun --nproc_per_node=num_procs -m nacd.experts ...`` when ``num_procs > 1``.

Resume (single process): at each checkpoint the trainable parameters, optimizer, scheduler,
RNG state and the trajectory writer's state go, as one object written atomically, to
``<store>/experts/expert-NNN/_resume/state.pt`` (tensors only, loaded with
``weights_only=True``). A restarted expert continues from there and ends with the same
trajectory, bitwise on CPU. A finished expert is reused: re-running returns its summary.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any


import torch

from nacd import storage as sio
from nacd.config import ExpertsConfig, RunConfig, StorageConfig, dump_config, load_config
from nacd.data.prepare import prepared_fingerprint
from nacd.models import ParamSpace, load_model, make_trainable
from nacd.trajectories import (MANIFEST, TrajectoryError, TrajectoryWriter, WriterState, expert_name,
                               expert_uri, open_store)

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
RESUME_STATE = "_resume/state.pt"


class ExpertError(ValueError):
    """A problem with the expert-training inputs, worded for the user."""


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """How many optimizer steps, which micro-batches, and where checkpoints fall."""

    rows: int
    world_size: int
    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    save_steps: tuple[int, ...]

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def make_plan(cfg: ExpertsConfig, rows: int, world_size: int = 1) -> Plan:
    if rows == 0:
        raise ExpertError("train_experts: the dataset is empty (0 rows): nothing to train on")
    global_batch = cfg.micro_batch * cfg.grad_accum * world_size
    steps_per_epoch = rows // global_batch
    if steps_per_epoch == 0:
        raise ExpertError(f"train_experts: one optimizer step needs {global_batch} rows "
                          f"(experts.micro_batch={cfg.micro_batch} x experts.grad_accum={cfg.grad_accum} "
                          f"x {world_size} processes) but the dataset has only {rows}")
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.save_every > total:
        raise ExpertError(f"train_experts: experts.save_every={cfg.save_every} is larger than the run "
                          f"({total} optimizer steps): the trajectory would hold only step 0")
    saves = {s for s in range(0, total + 1, cfg.save_every)}
    if cfg.save_epoch_end:
        saves |= {s for s in range(steps_per_epoch, total + 1, steps_per_epoch)}
    return Plan(rows, world_size, cfg.micro_batch, cfg.grad_accum, steps_per_epoch, total, tuple(sorted(saves)))


def epoch_permutation(rows: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(rows, generator=g)


def step_micro_batches(plan: Plan, seed: int, step: int, rank: int = 0) -> list[list[int]]:
    """Row indices of this rank's micro-batches for optimizer step ``step`` (0-based)."""
    epoch, pos = divmod(step, plan.steps_per_epoch)
    batch = epoch_permutation(plan.rows, seed, epoch)[pos * plan.global_batch:(pos + 1) * plan.global_batch]
    chunks = batch.view(plan.world_size * plan.grad_accum, plan.micro_batch).tolist()
    return chunks[rank * plan.grad_accum:(rank + 1) * plan.grad_accum]


# --------------------------------------------------------------------------- data
@dataclass
class TokenRows:
    input_ids: list[list[int]]
    labels: list[list[int]]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, idx: list[int], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
        ids = [self.input_ids[i][:max_length] for i in idx]
        labs = [self.labels[i][:max_length] for i in idx]
        width = max(len(x) for x in ids)
        out = torch.full((len(idx), width), pad_id, dtype=torch.long)
        lab = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for k, (x, y) in enumerate(zip(ids, labs)):
            out[k, :len(x)] = torch.tensor(x)
            lab[k, :len(y)] = torch.tensor(y)
            mask[k, :len(x)] = 1
        return {"input_ids": out, "labels": lab, "attention_mask": mask}


def load_token_rows(dataset_dir: str | Path, storage: StorageConfig | None = None) -> TokenRows:
    """The tokenised dataset (``<dir>/hf`` + ``prepare.json``); s3:// folders are fetched first."""
    if not sio.is_s3(dataset_dir):
        return _read_token_rows(Path(dataset_dir))
    with tempfile.TemporaryDirectory(prefix="nacd-dataset-") as tmp:
        sio.download_prefix(str(dataset_dir), Path(tmp), storage)
        return _read_token_rows(Path(tmp))  # rows are in memory: the copy can go


def _read_token_rows(folder: Path) -> TokenRows:
    import datasets

    hf = folder / "hf"
    if not hf.is_dir():
        raise ExpertError(f"{hf}: no tokenised dataset here (expected prepare_data output with hf/)")
    state = hf / "state.json"
    if state.is_file() and not json.loads(state.read_text()).get("_data_files", [None]):
        # datasets cannot load a saved 0-row dataset (IndexError inside concat_tables)
        raise ExpertError(f"train_experts: the dataset is empty (0 rows in {hf}): nothing to train on")
    ds = datasets.load_from_disk(str(hf))
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise ExpertError(f"{hf}: dataset lacks column(s) {sorted(missing)}")
    ids, labels = list(ds["input_ids"]), list(ds["labels"])
    for k, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y) or not x:
            raise ExpertError(f"{hf}: row {k}: input_ids and labels differ in length or are empty")
    fingerprint = prepared_fingerprint(folder)
    if fingerprint is None:
        h = hashlib.sha256()
        for x, y in zip(ids, labels):
            h.update(json.dumps([x, y]).encode())
        fingerprint = h.hexdigest()
    return TokenRows(ids, labels, fingerprint)


# --------------------------------------------------------------------------- optimisation
def make_optimizer(params: list[torch.nn.Parameter], cfg: ExpertsConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ExpertError(f"experts.optimizer: unknown optimizer {cfg.optimizer!r} (use sgd, sgd_momentum, adamw)")


def lr_factor(step: int, cfg: ExpertsConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - done)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    return 1.0


def make_scheduler(opt: torch.optim.Optimizer, cfg: ExpertsConfig, total: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total))


def optimizer_meta(cfg: ExpertsConfig) -> dict:
    return {"name": cfg.optimizer, "lr": cfg.lr, "momentum": cfg.momentum if cfg.optimizer == "sgd_momentum" else 0.0,
            "weight_decay": cfg.weight_decay, "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps,
            "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum}


# --------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: ExpertsConfig) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not cfg.deepspeed:
        raise ExpertError("train_experts: launched on several processes but experts.deepspeed is not set")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def deepspeed_config(cfg: ExpertsConfig, world_size: int) -> dict:
    """A preset (``zero0``..``zero3``) or a JSON file, with batch sizes from the experts config."""
    name = cfg.deepspeed
    if name is None:
        raise ExpertError("experts.deepspeed is not set")
    if Path(name).is_file():
        try:
            conf = json.loads(Path(name).read_text())
        except ValueError as e:
            raise ExpertError(f"{name}: DeepSpeed config is not valid JSON: {e}") from None
    else:
        preset = resources.files("nacd") / "resources" / "deepspeed" / f"{name}.json"
        if not preset.is_file():
            raise ExpertError(f"experts.deepspeed: {name!r} is neither a preset (zero0..zero3) nor a JSON file")
        conf = json.loads(preset.read_text())
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    conf.update(train_micro_batch_size_per_gpu=cfg.micro_batch, gradient_accumulation_steps=cfg.grad_accum,
                train_batch_size=cfg.micro_batch * cfg.grad_accum * world_size)
    return conf


def gather_trainable(model: torch.nn.Module, space: ParamSpace, zero_stage: int) -> torch.Tensor:
    """The full flat trainable vector on every rank (collective under ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in space.names], modifier_rank=None):
            return space.get(model).clone().float()
    return space.get(model).clone().float()


# --------------------------------------------------------------------------- resume state
def _run_fingerprint(cfg: RunConfig, data_fingerprint: str, expert_index: int, world: int) -> str:
    payload = {"experts": cfg.experts.model_dump(mode="json", exclude={"num_procs", "log_every", "device"}),
               "source": cfg.source.model_dump(mode="json"), "data": data_fingerprint,
               "max_length": cfg.data.max_length,  # batches are cut to it at collate time
               "expert_index": expert_index, "world_size": world}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_obj(data) -> Any:
    return torch.load(io.BytesIO(memoryview(data)), weights_only=True, map_location="cpu")


def load_resume(uri: str, cfg_storage, run_fp: str) -> dict | None:
    """The last committed resume state of this expert, or None (none, or another configuration)."""
    target = sio.join(uri, RESUME_STATE)
    if not sio.exists(target, cfg_storage):
        return None
    state = _torch_obj(sio.read_bytes(target, cfg_storage))
    if state.get("run_fingerprint") != run_fp:
        log.warning("%s: resume state is from another configuration; starting over", target)
        return None
    return state


def _ds_stage_dir(uri: str) -> Path:
    """Where DeepSpeed writes/reads its resume checkpoint: the store folder itself when local,
    else a node-local staging folder shared by the ranks of this pod."""
    if not sio.is_s3(uri):
        return Path(sio.parse_uri(sio.join(uri, "_resume", "deepspeed")).path)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"nacd-ds-resume-{digest}"


@dataclass
class ExpertRun:
    """One expert's training state and the operations on it (train a step, checkpoint, resume)."""

    cfg: RunConfig
    dist: Dist
    name: str
    uri: str
    seed: int
    rows: TokenRows
    plan: Plan
    run_fp: str
    device: torch.device
    model: Any
    space: ParamSpace
    opt: Any
    sched: Any
    engine: Any = None
    zero_stage: int = 0
    writer: TrajectoryWriter | None = None
    step: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    resumed_from: int | None = None

    # ---- resume
    def restore(self, state: dict) -> WriterState:
        if self.engine is None:
            self.space.set(self.model, state["trainable"].to(self.device))
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
        else:
            self._ds_load(state["ds_tag"])
        self.step = self.resumed_from = int(state["step"])
        self.loss_sum, self.tokens = float(state["loss_sum"]), int(state["tokens"])
        log.info("%s: resuming from step %d", self.uri, self.step)
        return WriterState.from_json(json.loads(state["writer"]), state["pending"])

    def _ds_load(self, tag: str) -> None:
        local = _ds_stage_dir(self.uri)
        if sio.is_s3(self.uri) and self.dist.is_main:
            shutil.rmtree(local / tag, ignore_errors=True)
            sio.download_prefix(sio.join(self.uri, "_resume", "deepspeed", tag), local / tag, self.cfg.storage)
        torch.distributed.barrier()
        path, _ = self.engine.load_checkpoint(str(local), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=False)
        if path is None:
            raise ExpertError(f"{self.uri}: DeepSpeed resume checkpoint {tag} could not be loaded")
        torch.set_rng_state(_torch_obj((local / tag / f"rng-rank{self.dist.rank}.pt").read_bytes()))

    def save_resume(self) -> None:
        """Called by every rank at a checkpoint step; the state object is written last."""
        state = {"step": self.step, "run_fingerprint": self.run_fp, "loss_sum": self.loss_sum,
                 "tokens": self.tokens}
        if self.engine is None:
            state.update(trainable=self.space.get(self.model).cpu().clone(), optimizer=self.opt.state_dict(),
                         scheduler=self.sched.state_dict(), torch_rng=torch.get_rng_state())
        else:
            state["ds_tag"] = self._ds_save()
        if self.writer is not None:
            state.update(writer=json.dumps(self.writer.state.to_json()), pending=self.writer.state.pending_tensors())
            sio.write_bytes(sio.join(self.uri, RESUME_STATE), _torch_bytes(state), self.cfg.storage)
            if self.engine is not None:
                self._ds_prune(keep=state["ds_tag"])
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def _ds_save(self) -> str:
        tag = f"step-{self.step:08d}"
        local = _ds_stage_dir(self.uri)
        # collective; each rank writes its partition; frozen base weights are not state
        self.engine.save_checkpoint(str(local), tag=tag, exclude_frozen_parameters=True)
        (local / tag / f"rng-rank{self.dist.rank}.pt").write_bytes(_torch_bytes(torch.get_rng_state()))
        torch.distributed.barrier()
        if sio.is_s3(self.uri) and self.dist.is_main:
            sio.upload_folder(local / tag, sio.join(self.uri, "_resume", "deepspeed", tag), self.cfg.storage)
        return tag

    def _ds_prune(self, keep: str) -> None:
        """Older DeepSpeed resume checkpoints go once a newer state names another one."""
        base = sio.join(self.uri, "_resume", "deepspeed")
        for entry in sio.list_names(base, self.cfg.storage):
            if entry.startswith("step-") and entry != keep:
                sio.delete_prefix(sio.join(base, entry), self.cfg.storage)
        if sio.is_s3(self.uri):
            for old in _ds_stage_dir(self.uri).glob("step-*"):
                if old.name != keep:
                    shutil.rmtree(old, ignore_errors=True)

    # ---- training
    def checkpoint(self) -> None:
        if self.step not in self.plan.save_steps:
            return
        vec = gather_trainable(self.model, self.space, self.zero_stage)  # collective
        if self.writer is not None and self.step != self.resumed_from:  # a resumed step is recorded
            self.writer.append(self.step, self.step / self.plan.steps_per_epoch, self.opt.param_groups[0]["lr"], vec)
        if self.step != self.resumed_from:
            self.save_resume()

    def train_step(self) -> float:
        """One optimizer step over this rank's micro-batches; returns the mean loss over ranks."""
        step_loss, step_tokens = 0.0, 0
        pad_id, max_length = _pad_id(self.model), self.cfg.data.max_length
        for idx in step_micro_batches(self.plan, self.seed, self.step, self.dist.rank):
            batch = {k: v.to(self.device) for k, v in self.rows.collate(idx, pad_id, max_length).items()}
            step_tokens += int(batch["attention_mask"].sum())
            if self.engine is not None:
                loss = self.engine(**batch).loss
                self.engine.backward(loss)
                self.engine.step()  # applies the optimizer only at the accumulation boundary
            else:
                loss = self.model(**batch).loss
                (loss / self.plan.grad_accum).backward()
            step_loss += float(loss.detach()) / self.plan.grad_accum
        if self.engine is None:
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        loss, step_tokens = _reduce_step(step_loss, step_tokens, self.dist)
        self.step += 1
        self.tokens += step_tokens
        self.loss_sum += loss
        return loss


def _committed_summary(store_uri: str, name: str, cfg: RunConfig, run_fp: str) -> dict | None:
    """The summary of an already finished, identical expert (steps are safe to run twice)."""
    if not sio.exists(sio.join(expert_uri(store_uri, name), MANIFEST), cfg.storage):
        return None
    try:
        traj = open_store(store_uri, cfg.storage).expert(name)
    except TrajectoryError:
        return None
    if traj.manifest.get("extra", {}).get("run_fingerprint") != run_fp:
        return None
    return {**traj.manifest["extra"].get("summary", {}), "reused": True}


def _build_run(cfg: RunConfig, dist: Dist, store_uri: str, expert_index: int, rows: TokenRows,
               plan: Plan, run_fp: str) -> ExpertRun:
    ecfg = cfg.experts
    seed = ecfg.base_seed + expert_index
    torch.manual_seed(seed)
    device = training_device(ecfg, dist)
    model = load_model(cfg.source.name, dtype=cfg.source.dtype, revision=cfg.source.revision, device=device)
    model = make_trainable(model, cfg.source.param_space, seed=seed).train()
    space = ParamSpace.from_model(model, cfg.source.param_space)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, ecfg)
    sched = make_scheduler(opt, ecfg, plan.total_steps)
    engine, zero_stage = None, 0
    if ecfg.deepspeed:
        import deepspeed

        ds_conf = deepspeed_config(ecfg, dist.world_size)
        zero_stage = int(ds_conf.get("zero_optimization", {}).get("stage", 0))
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                     model_parameters=params, config=ds_conf)
    name = expert_name(expert_index)
    return ExpertRun(cfg, dist, name, expert_uri(store_uri, name), seed, rows, plan, run_fp, device,
                     model, space, opt, sched, engine, zero_stage)


def train_expert(cfg: RunConfig, dataset_dir: str | Path, store_uri: str, expert_index: int) -> dict:
    """Train expert ``expert_index`` and commit its trajectory; returns a JSON-able summary."""
    ecfg = cfg.experts
    dist = init_distributed(ecfg)
    name = expert_name(expert_index)
    rows = load_token_rows(dataset_dir, cfg.storage)
    plan = make_plan(ecfg, len(rows), dist.world_size)
    run_fp = _run_fingerprint(cfg, rows.fingerprint, expert_index, dist.world_size)
    sio.check_bucket(store_uri, cfg.storage)  # fail before any training on a missing bucket
    done = _committed_summary(store_uri, name, cfg, run_fp)
    if done is not None:
        log.info("%s: already committed with this configuration, reusing it", expert_uri(store_uri, name))
        return done

    run = _build_run(cfg, dist, store_uri, expert_index, rows, plan, run_fp)
    resume = load_resume(run.uri, cfg.storage, run_fp)
    writer_state = run.restore(resume) if resume is not None else None
    if dist.is_main:
        run.writer = TrajectoryWriter(
            store_uri, name, run.space, storage=cfg.storage, storage_dtype=ecfg.storage_dtype,
            shard_max_bytes=ecfg.shard_max_bytes, source_model=cfg.source.name,
            source_revision=cfg.source.revision, optimizer=optimizer_meta(ecfg), seed=run.seed,
            data_fingerprint=rows.fingerprint, state=writer_state)

    t0 = time.time()
    run.checkpoint()
    bar = _progress(plan.total_steps, run.step, dist.is_main, name)
    last_loss = float("nan")
    while run.step < plan.total_steps:
        last_loss = run.train_step()
        if dist.is_main and (run.step % ecfg.log_every == 0 or run.step == plan.total_steps):
            log.info("%s step %d/%d loss %.5f lr %.4g", name, run.step, plan.total_steps, last_loss,
                     run.opt.param_groups[0]["lr"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
        run.checkpoint()
    if bar is not None:
        bar.close()
    wall = time.time() - t0
    summary = {"expert": name, "uri": run.uri, "seed": run.seed, "steps": plan.total_steps,
               "checkpoints": len(plan.save_steps), "final_loss": last_loss,
               "mean_loss": run.loss_sum / max(1, plan.total_steps), "tokens": run.tokens,
               "tokens_per_s": run.tokens / wall if wall > 0 else None, "wall_s": round(wall, 3),
               "world_size": dist.world_size, "resumed_from": run.resumed_from, "reused": False}
    if run.writer is not None:
        run.writer.meta["extra"] = {"run_fingerprint": run_fp, "plan": asdict(plan), "summary": summary,
                                    "deepspeed": ecfg.deepspeed, "world_size": dist.world_size}
        run.writer.commit()
        sio.delete_prefix(sio.join(run.uri, "_resume"), cfg.storage)
        if run.engine is not None and sio.is_s3(run.uri):
            shutil.rmtree(_ds_stage_dir(run.uri), ignore_errors=True)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return summary


def training_device(cfg: ExpertsConfig, dist: Dist) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ExpertError("experts.device=cuda but no CUDA device is visible")
    torch.cuda.set_device(dist.local_rank)
    return torch.device("cuda", dist.local_rank)


def _pad_id(model) -> int:
    conf = model.config
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(conf, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _reduce_step(loss: float, tokens: int, dist: Dist) -> tuple[float, int]:
    """Mean loss and total tokens of one optimizer step over all ranks (for logs and summary)."""
    if dist.world_size == 1:
        return loss, tokens
    t = torch.tensor([loss, tokens], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t[0]) / dist.world_size, int(t[1])


def _progress(total: int, start: int, main: bool, name: str):
    if not main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=name, unit="step", disable=None)


# --------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_train_expert(cfg: RunConfig, dataset_dir: str | Path, store_uri: str, expert_index: int,
                        *, env: dict | None = None) -> dict:
    """One process: call ``train_expert``. Several: ``torchrun --nproc_per_node=num_procs``."""
    if cfg.experts.num_procs == 1:
        return train_expert(cfg, dataset_dir, store_uri, expert_index)
    with tempfile.TemporaryDirectory(prefix="nacd-expert-") as tmp:
        conf, summary = Path(tmp) / "run.yaml", Path(tmp) / "summary.json"
        conf.write_text(dump_config(cfg))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.experts.num_procs}",
               "--nnodes=1", f"--master_port={_free_port()}", "-m", "nacd.experts",
               "--config", str(conf), "--dataset", str(dataset_dir), "--out", store_uri,
               "--expert-index", str(expert_index), "--summary-json", str(summary)]
        log.info("launching: %s", " ".join(cmd))
        proc = subprocess.run(cmd, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"{expert_name(expert_index)}: torchrun exited with status {proc.returncode}")
        return json.loads(summary.read_text())


def train_experts(cfg: RunConfig, dataset_dir: str | Path, store_uri: str,
                  expert_index: int | None = None) -> list[dict]:
    """CLI entry (``nacd step train-experts``): one expert, or all ``num_experts`` in turn."""
    indices = [expert_index] if expert_index is not None else list(range(cfg.experts.num_experts))
    for i in indices:
        if not 0 <= i < cfg.experts.num_experts:
            raise ExpertError(f"--expert-index {i}: out of range 0..{cfg.experts.num_experts - 1}")
    return [launch_train_expert(cfg, dataset_dir, store_uri, i) for i in indices]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nacd.experts", description="Train one expert (launcher entry).")
    p.add_argument("--config", default=None)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--expert-index", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--summary-json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.set)
    summary = train_expert(cfg, args.dataset, args.out, args.expert_index)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(summary)
        if args.summary_json:
            Path(args.summary_json).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
