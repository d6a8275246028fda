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
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path


import torch

from nacd import storage as sio
from nacd.config import ExpertsConfig, RunConfig, dump_config, load_config
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


def load_token_rows(dataset_dir: str | Path) -> TokenRows:
    """The tokenised dataset (``<dir>/hf`` + ``prepare.json``); s3:// folders are fetched first."""
    import datasets

    src = str(dataset_dir)
    if sio.is_s3(src):
        local = Path(tempfile.mkdtemp(prefix="nacd-dataset-"))
        sio.download_prefix(src, local)
        src = str(local)
    hf = Path(src) / "hf"
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
    ids, labels = ds["input_ids"], ds["labels"]
    for k, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y) or not x:
            raise ExpertError(f"{hf}: row {k}: input_ids and labels differ in length or are empty")
    prep = Path(src) / "prepare.json"
    if prep.is_file():
        fingerprint = json.loads(prep.read_text())["fingerprint"]
    else:
        h = hashlib.sha256()
        for x, y in zip(ids, labels):
            h.update(json.dumps([x, y]).encode())
        fingerprint = h.hexdigest()
    return TokenRows(list(ids), list(labels), fingerprint)


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
        preset = resources.files("nacd.resources.deepspeed") / f"{name}.json"
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
    payload = {"experts": cfg.experts.model_dump(mode="json", exclude={"num_procs", "log_every"}),
               "source": cfg.source.model_dump(mode="json"), "data": data_fingerprint,
               "expert_index": expert_index, "world_size": world}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_resume(uri: str, cfg_storage, *, step: int, model, space: ParamSpace, opt, sched,
                writer: TrajectoryWriter, run_fp: str, loss_sum: float, tokens: int) -> None:
    state = {"step": step, "run_fingerprint": run_fp,
             "trainable": space.get(model).clone(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "writer": json.dumps(writer.state.to_json()), "pending": writer.state.pending_tensors(),
             "loss_sum": loss_sum, "tokens": tokens}
    buf = io.BytesIO()
    torch.save(state, buf)
    sio.write_bytes(sio.join(uri, RESUME_STATE), buf.getvalue(), cfg_storage)


def load_resume(uri: str, cfg_storage, run_fp: str) -> dict | None:
    target = sio.join(uri, RESUME_STATE)
    if not sio.exists(target, cfg_storage):
        return None
    state = torch.load(io.BytesIO(sio.read_bytes(target, cfg_storage).to_pybytes()), weights_only=True)
    if state.get("run_fingerprint") != run_fp:
        log.warning("%s: resume state is from another configuration; starting over", target)
        return None
    return state


# --------------------------------------------------------------------------- the stage
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


def train_expert(cfg: RunConfig, dataset_dir: str | Path, store_uri: str, expert_index: int) -> dict:
    """Train expert ``expert_index`` and commit its trajectory; returns a JSON-able summary."""
    ecfg = cfg.experts
    dist = init_distributed(ecfg)
    name = expert_name(expert_index)
    uri = expert_uri(store_uri, name)
    seed = ecfg.base_seed + expert_index
    rows = load_token_rows(dataset_dir)
    plan = make_plan(ecfg, len(rows), dist.world_size)
    run_fp = _run_fingerprint(cfg, rows.fingerprint, expert_index, dist.world_size)
    if dist.is_main:
        sio.check_bucket(store_uri, cfg.storage)  # fail before any training on a missing bucket
    done = _committed_summary(store_uri, name, cfg, run_fp)
    if done is not None:
        log.info("%s: already committed with this configuration, reusing it", uri)
        return done

    torch.manual_seed(seed)
    model = load_model(cfg.source.name, dtype=cfg.source.dtype, revision=cfg.source.revision)
    model = make_trainable(model, cfg.source.param_space, seed=seed)
    model.train()
    space = ParamSpace.from_model(model, cfg.source.param_space)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, ecfg)
    sched = make_scheduler(opt, ecfg, plan.total_steps)
    pad_id = _pad_id(model)

    writer = None
    start, loss_sum, tokens, resumed_from = 0, 0.0, 0, None
    resume = load_resume(uri, cfg.storage, run_fp) if dist.world_size == 1 else None
    writer_state = None
    if resume is not None:
        space.set(model, resume["trainable"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        writer_state = WriterState.from_json(json.loads(resume["writer"]), resume["pending"])
        start = resumed_from = int(resume["step"])
        loss_sum, tokens = float(resume["loss_sum"]), int(resume["tokens"])
        log.info("%s: resuming from step %d", uri, start)
    if dist.is_main:
        writer = TrajectoryWriter(
            store_uri, name, space, storage=cfg.storage, storage_dtype=ecfg.storage_dtype,
            shard_max_bytes=ecfg.shard_max_bytes, source_model=cfg.source.name,
            source_revision=cfg.source.revision, optimizer=optimizer_meta(ecfg), seed=seed,
            data_fingerprint=rows.fingerprint, state=writer_state)

    engine, zero_stage = None, 0
    if ecfg.deepspeed:
        import deepspeed

        ds_conf = deepspeed_config(ecfg, dist.world_size)
        zero_stage = int(ds_conf.get("zero_optimization", {}).get("stage", 0))
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                     model_parameters=params, config=ds_conf)

    def checkpoint(step: int) -> None:
        vec = gather_trainable(model, space, zero_stage)  # collective: every rank calls it
        if writer is not None and step in plan.save_steps:
            if not (resume is not None and step == start):  # the resumed step is already recorded
                writer.append(step, step / plan.steps_per_epoch, opt.param_groups[0]["lr"], vec)
            if dist.world_size == 1:
                save_resume(uri, cfg.storage, step=step, model=model, space=space, opt=opt, sched=sched,
                            writer=writer, run_fp=run_fp, loss_sum=loss_sum, tokens=tokens)

    t0 = time.time()
    checkpoint(start)
    bar = _progress(plan.total_steps, start, dist.is_main, name)
    last_loss = float("nan")
    for step in range(start, plan.total_steps):
        step_loss, step_tokens = 0.0, 0
        for idx in step_micro_batches(plan, seed, step, dist.rank):
            batch = rows.collate(idx, pad_id, cfg.data.max_length)
            step_tokens += int(batch["attention_mask"].sum())
            if engine is not None:
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()  # applies the optimizer only at the accumulation boundary
            else:
                loss = model(**batch).loss
                (loss / plan.grad_accum).backward()
            step_loss += float(loss.detach()) / plan.grad_accum
        if engine is None:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        last_loss, step_tokens = _reduce_step(step_loss, step_tokens, dist)
        tokens += step_tokens
        loss_sum += last_loss
        if dist.is_main and ((step + 1) % ecfg.log_every == 0 or step + 1 == plan.total_steps):
            log.info("%s step %d/%d loss %.5f lr %.4g", name, step + 1, plan.total_steps, last_loss,
                     opt.param_groups[0]["lr"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if step + 1 in plan.save_steps:
            checkpoint(step + 1)
    if bar is not None:
        bar.close()
    wall = time.time() - t0
    summary = {"expert": name, "uri": uri, "seed": seed, "steps": plan.total_steps,
               "checkpoints": len(plan.save_steps), "final_loss": last_loss,
               "mean_loss": loss_sum / max(1, plan.total_steps), "tokens": tokens,
               "tokens_per_s": tokens / wall if wall > 0 else None, "wall_s": round(wall, 3),
               "world_size": dist.world_size, "resumed_from": resumed_from, "reused": False}
    if writer is not None:
        writer.meta["extra"] = {"run_fingerprint": run_fp, "plan": asdict(plan), "summary": summary,
                                "deepspeed": ecfg.deepspeed, "world_size": dist.world_size}
        writer.commit()
        sio.delete_prefix(sio.join(uri, "_resume"), cfg.storage)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return summary


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
