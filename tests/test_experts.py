"""Expert training on a tiny model and real ARC-Easy rows: trajectories, numerics, resume, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nacd import storage
from nacd.config import ConfigError, ExpertsConfig, RunConfig, StorageConfig, dump_config, load_config
from nacd.data.prepare import prepare_data
from nacd.experts import (ExpertError, load_token_rows, make_optimizer, make_plan, step_micro_batches,
                          train_expert)
from nacd.models import ParamSpace, load_model, make_trainable
from nacd.trajectories import open_store
from test_storage import remove_aws_credentials

REPO = Path(__file__).resolve().parents[1]


def tiny_config(shared_data: Path, *overrides: str) -> RunConfig:
    return load_config(None, [
        "source.name=tiny-llama", f"data.data_dir={shared_data}",
        "data.sources=[{name: arc_easy, max_rows: 48}]", "data.max_length=96", "data.overflow=truncate",
        "experts.micro_batch=2", "experts.lr=0.5", *overrides])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_data) -> Path:
    """Real ARC-Easy train rows tokenised by prepare_data (SmolLM2 tokenizer)."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_data(tiny_config(shared_data), out)
    return out


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and kind to a shared CPU
    yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------- plan and batches
def test_plan_save_points_and_epoch_ends():
    cfg = ExpertsConfig(micro_batch=2, grad_accum=3, epochs=2.5, save_every=4, save_epoch_end=True)
    plan = make_plan(cfg, rows=37)
    assert plan.global_batch == 6 and plan.steps_per_epoch == 6 and plan.total_steps == 15
    assert plan.save_steps == (0, 4, 6, 8, 12)


def test_two_ranks_see_the_micro_batches_of_one_rank_with_double_accumulation():
    one = make_plan(ExpertsConfig(micro_batch=2, grad_accum=4, max_steps=9, save_every=3), 37, world_size=1)
    two = make_plan(ExpertsConfig(micro_batch=2, grad_accum=2, max_steps=9, save_every=3), 37, world_size=2)
    assert one.steps_per_epoch == two.steps_per_epoch == 4
    for step in range(9):  # crosses two epoch boundaries (new permutations)
        single = step_micro_batches(one, 5, step)
        split = step_micro_batches(two, 5, step, 0) + step_micro_batches(two, 5, step, 1)
        assert single == split
        assert len({i for mb in single for i in mb}) == 8  # no row twice within a step
    epoch0 = [i for s in range(4) for mb in step_micro_batches(one, 5, s) for i in mb]
    assert len(set(epoch0)) == 32  # an epoch visits distinct rows


# --------------------------------------------------------------------------- training
def test_sgd_trajectory_matches_a_hand_computed_step(dataset, shared_data, tmp_path, one_thread):
    cfg = tiny_config(shared_data, "experts.max_steps=3", "experts.save_every=1", "experts.grad_accum=2",
                      "experts.optimizer=sgd")
    summary = train_expert(cfg, dataset, str(tmp_path / "store"), 1)
    assert summary["steps"] == 3 and summary["checkpoints"] == 4 and summary["seed"] == 1
    traj = open_store(str(tmp_path / "store")).expert("expert-001")
    assert traj.steps == [0, 1, 2, 3]
    assert traj.manifest["data_fingerprint"] == json.loads((dataset / "prepare.json").read_text())["fingerprint"]

    model = make_trainable(load_model("tiny-llama"), cfg.source.param_space, seed=1).train()
    space = ParamSpace.from_model(model, cfg.source.param_space)
    traj.check_matches(space)
    assert torch.equal(traj.read(0), space.get(model))  # step 0 is the seeded LoRA init
    rows = load_token_rows(dataset)
    plan = make_plan(cfg.experts, len(rows))
    for step in range(3):  # theta_{s+1} = theta_s - lr * grad, gradient averaged over micro-batches
        space.set(model, traj.read(step))
        model.zero_grad()
        for idx in step_micro_batches(plan, 1, step):
            batch = rows.collate(idx, model.config.pad_token_id or 0, cfg.data.max_length)
            (model(**batch).loss / 2).backward()
        params = dict(model.named_parameters())
        grad = space.flatten({n: params[n].grad for n in space.names})
        expected = traj.read(step) - 0.5 * grad
        assert torch.allclose(traj.read(step + 1), expected, atol=1e-6, rtol=1e-5)
        assert (traj.read(step + 1) - traj.read(step)).norm() > 1e-4  # it did move


def test_expert_from_and_into_s3_is_reused_on_a_second_run(dataset, shared_data, s3_bucket, one_thread):
    endpoint, bucket = s3_bucket
    cfg = tiny_config(shared_data, "experts.max_steps=4", "experts.save_every=2",
                      "experts.optimizer=adamw", "experts.schedule=cosine", "experts.storage_dtype=bfloat16",
                      f"storage.endpoint_url={endpoint}")
    root = f"s3://{bucket}/run"
    storage.upload_folder(dataset, f"s3://{bucket}/data", cfg.storage)  # the dataset comes from S3 too
    first = train_expert(cfg, f"s3://{bucket}/data", root, 0)
    assert first["reused"] is False and first["final_loss"] < 20
    store = open_store(root, cfg.storage)
    traj = store.expert("expert-000")
    assert traj.steps == [0, 2, 4] and traj.manifest["dtype"] == "bfloat16"
    assert traj.manifest["optimizer"]["name"] == "adamw"
    # resume state is removed once the trajectory is committed
    assert "_resume" not in storage.list_names(traj.uri, cfg.storage)
    second = train_expert(cfg, dataset, root, 0)  # same rows (same fingerprint) from disk
    assert second["reused"] is True and second["final_loss"] == first["final_loss"]


# --------------------------------------------------------------------------- resume after kill -9
def _run_expert(cfg_path: Path, dataset: Path, store: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nacd.experts", "--config", str(cfg_path), "--dataset",
                             str(dataset), "--out", str(store), "--expert-index", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_expert_resumes_to_the_same_trajectory(dataset, shared_data, tmp_path):
    # momentum, warmup + cosine schedule and LoRA dropout: optimizer, scheduler and RNG state all matter
    cfg = tiny_config(shared_data, "experts.max_steps=16", "experts.save_every=4",
                      "experts.optimizer=sgd_momentum", "experts.schedule=cosine", "experts.warmup_steps=3",
                      "source.param_space.lora_dropout=0.1", "experts.shard_max_bytes=20000")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(cfg))

    killed_store = tmp_path / "killed"
    proc = _run_expert(cfg_path, dataset, killed_store)
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # kill between checkpoints 4 and 8
        if "step 6/16" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "expert never reached step 6"
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert open_store(str(killed_store)).experts() == []  # no manifest: nothing a reader accepts
    assert (killed_store / "experts/expert-000/_resume/state.pt").is_file()

    resumed = _run_expert(cfg_path, dataset, killed_store)
    out = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["resumed_from"] == 4

    # the uninterrupted run in this process, on one thread like the subprocesses
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_expert(cfg, dataset, str(tmp_path / "straight"), 0)
    finally:
        torch.set_num_threads(saved)

    a = open_store(str(killed_store)).expert(0)
    b = open_store(str(tmp_path / "straight")).expert(0)
    assert a.steps == b.steps == [0, 4, 8, 12, 16]
    assert len(a.manifest["shards"]) > 1  # the resumed writer continued a multi-shard trajectory
    for i in range(len(a)):
        assert torch.equal(a.read(i), b.read(i)), f"checkpoint {i} differs after resume"
    assert a.manifest["shards"] == b.manifest["shards"]  # byte-identical shards
    assert not (killed_store / "experts/expert-000/_resume").exists()


# --------------------------------------------------------------------------- bad input
def _nothing_committed(root: Path) -> None:
    assert not root.exists() or open_store(str(root)).experts() == []


def test_empty_dataset(tmp_path, shared_data):
    import datasets

    feats = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                               "labels": datasets.Sequence(datasets.Value("int64"))})
    datasets.Dataset.from_dict({"input_ids": [], "labels": []}, features=feats).save_to_disk(str(tmp_path / "d/hf"))
    with pytest.raises(ExpertError, match="dataset is empty"):
        train_expert(tiny_config(shared_data), tmp_path / "d", str(tmp_path / "store"), 0)
    _nothing_committed(tmp_path / "store")


def test_batch_larger_than_dataset_and_k_larger_than_run(dataset, shared_data, tmp_path):
    with pytest.raises(ExpertError, match=r"needs 64 rows .* has only 37"):
        train_expert(tiny_config(shared_data, "experts.micro_batch=64"), dataset, str(tmp_path / "s"), 0)
    with pytest.raises(ExpertError, match=r"save_every=50 is larger than the run \(3 optimizer steps\)"):
        train_expert(tiny_config(shared_data, "experts.max_steps=3", "experts.save_every=50"),
                     dataset, str(tmp_path / "s"), 0)
    _nothing_committed(tmp_path / "s")


def test_unknown_optimizer():
    with pytest.raises(ConfigError, match="experts.optimizer"):
        load_config(None, ["experts.optimizer=adam"])
    bad = ExpertsConfig.model_construct(**{**ExpertsConfig().model_dump(), "optimizer": "adam"})
    with pytest.raises(ExpertError, match="unknown optimizer 'adam'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], bad)


def test_missing_dataset_folder(tmp_path, shared_data):
    with pytest.raises(ExpertError, match="no tokenised dataset here"):
        train_expert(tiny_config(shared_data), tmp_path / "nothing", str(tmp_path / "s"), 0)


def test_s3_problems_fail_before_training(dataset, shared_data, s3_server, monkeypatch, tmp_path):
    unreachable = tiny_config(shared_data, "storage.endpoint_url=http://127.0.0.1:9", "storage.retries=1")
    with pytest.raises(storage.StorageError, match="failed after 2 attempts"):
        train_expert(unreachable, dataset, "s3://some-bucket/run", 0)
    missing_bucket = tiny_config(shared_data, f"storage.endpoint_url={s3_server}")
    with pytest.raises(storage.StorageNotFound, match="bucket does not exist"):
        train_expert(missing_bucket, dataset, "s3://never-created-bucket/run", 0)
    remove_aws_credentials(monkeypatch, tmp_path)
    with pytest.raises(storage.StorageError, match="no S3 credentials"):
        train_expert(missing_bucket, dataset, "s3://some-bucket/run", 0)
    assert StorageConfig().retries == 5  # the default is left alone


def test_expert_checkpoint_loads_as_a_scorable_model(dataset, shared_data, tmp_path, one_thread):
    from nacd.evaluation.run import load_expert_checkpoint
    from nacd.trajectories import TrajectoryError

    cfg = tiny_config(shared_data, "experts.max_steps=2", "experts.save_every=1")
    train_expert(cfg, dataset, str(tmp_path / "store"), 0)
    traj = open_store(str(tmp_path / "store")).expert(0)
    batch = load_token_rows(dataset).collate([0, 1], 0, cfg.data.max_length)
    reference = make_trainable(load_model("tiny-llama"), cfg.source.param_space).eval()
    space = ParamSpace.from_model(reference, cfg.source.param_space)
    with torch.no_grad():
        base_logits = load_model("tiny-llama")(**batch).logits
        for index in (0, 2):
            space.set(reference, traj.read(index))
            model, tokenizer, step = load_expert_checkpoint(cfg, str(tmp_path / "store"), 0, index)
            assert step == index and tokenizer.pad_token_id is not None
            assert not any(n for n, _ in model.named_parameters() if "lora" in n)  # folded in
            logits = model(**batch).logits
            assert torch.allclose(logits, reference(**batch).logits, atol=1e-5)
            # step 0 is the LoRA init (B = 0): the base model; step 2 has moved away from it
            assert torch.allclose(logits, base_logits, atol=1e-5) == (index == 0)
    with pytest.raises(IndexError, match=r"checkpoints 0\.\.2, not 3"):
        load_expert_checkpoint(cfg, str(tmp_path / "store"), 0, 3)
    with pytest.raises(TrajectoryError, match="shape"):
        load_expert_checkpoint(tiny_config(shared_data, "source.param_space.lora_r=4"),
                               str(tmp_path / "store"), 0, 1)
