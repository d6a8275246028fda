"""Multi-process DeepSpeed on CPU (gloo, 2 processes via torchrun) against the single-process loop."""
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

from nacd.config import dump_config
from nacd.data.prepare import prepare_data
from nacd.experts import deepspeed_config, launch_train_expert, train_expert
from nacd.trajectories import open_store
from test_experts import REPO, tiny_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_data(tiny_config(shared_data), out)
    return out


def test_presets_ship_and_get_batch_sizes(shared_data):
    for stage in range(4):
        cfg = tiny_config(shared_data, f"experts.deepspeed=zero{stage}", "experts.num_procs=2",
                          "experts.grad_accum=3").experts
        conf = deepspeed_config(cfg, world_size=2)
        assert conf["zero_optimization"]["stage"] == stage
        assert (conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"],
                conf["train_batch_size"]) == (2, 3, 12)
        assert not any(k.startswith("_") for k in conf)


def _single_process(cfg, dataset: Path, store: Path) -> dict:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_expert(cfg, dataset, str(store), 0)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.slow
def test_two_process_deepspeed_zero2_matches_single_process(dataset, shared_data, tmp_path):
    stage = 2
    common = ["experts.max_steps=4", "experts.save_every=2", "experts.optimizer=sgd_momentum",
              "experts.schedule=linear"]
    # 2 processes x micro-batch 2 x accumulation 1 == 1 process x micro-batch 2 x accumulation 2
    ds_cfg = tiny_config(shared_data, *common, f"experts.deepspeed=zero{stage}", "experts.num_procs=2")
    single_cfg = tiny_config(shared_data, *common, "experts.grad_accum=2")
    ds_summary = launch_train_expert(ds_cfg, dataset, str(tmp_path / "ds"), 0)
    assert ds_summary["world_size"] == 2 and ds_summary["checkpoints"] == 3

    single_summary = _single_process(single_cfg, dataset, tmp_path / "single")
    assert ds_summary["tokens"] == single_summary["tokens"]  # the same rows were trained on

    ds = open_store(str(tmp_path / "ds")).expert(0)
    single = open_store(str(tmp_path / "single")).expert(0)
    assert ds.steps == single.steps == [0, 2, 4]
    assert ds.manifest["extra"]["deepspeed"] == f"zero{stage}"
    for i in range(len(ds)):
        torch.testing.assert_close(ds.read(i), single.read(i), rtol=1e-5, atol=1e-6)
    assert (ds.read(2) - ds.read(0)).norm() > 1e-3  # training moved the parameters
    assert abs(ds_summary["final_loss"] - single_summary["final_loss"]) < 1e-4


def _torchrun(cfg_path: Path, dataset: Path, store: Path) -> subprocess.Popen:
    """torchrun with the one-expert module entry; output is read line by line by the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "-m", "nacd.experts", "--config", str(cfg_path),
           "--dataset", str(dataset), "--out", str(store), "--expert-index", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every worker, as a pod kill would (torchrun starts its workers in
    sessions of their own, so a process-group kill would miss them)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_killed_zero3_job_resumes_and_matches_single_process(dataset, shared_data, tmp_path):
    common = ["experts.max_steps=8", "experts.save_every=2", "experts.optimizer=sgd_momentum",
              "experts.schedule=linear"]
    ds_cfg = tiny_config(shared_data, *common, "experts.deepspeed=zero3", "experts.num_procs=2")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(ds_cfg))
    store = tmp_path / "ds"

    job = _torchrun(cfg_path, dataset, store)
    deadline = time.monotonic() + 300
    for line in job.stdout:  # kill the whole job between checkpoints 2 and 4
        if "step 3/8" in line:
            _kill_tree(job.pid)
            break
        assert time.monotonic() < deadline, "the DeepSpeed job never reached step 3"
    job.wait()
    assert open_store(str(store)).experts() == []
    resume_dir = store / "experts/expert-000/_resume"
    assert (resume_dir / "state.pt").is_file() and (resume_dir / "deepspeed/step-00000002").is_dir()

    job = _torchrun(cfg_path, dataset, store)
    out = job.communicate(timeout=300)[0]
    assert job.returncode == 0, out[-3000:]
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["resumed_from"] == 2 and summary["world_size"] == 2, out[-6000:]
    assert not resume_dir.exists()

    single = _single_process(tiny_config(shared_data, *common, "experts.grad_accum=2"), dataset, tmp_path / "one")
    a, b = open_store(str(store)).expert(0), open_store(str(tmp_path / "one")).expert(0)
    assert a.steps == b.steps == [0, 2, 4, 6, 8]
    for i in range(len(a)):
        torch.testing.assert_close(a.read(i), b.read(i), rtol=1e-5, atol=1e-6)
    assert abs(summary["final_loss"] - single["final_loss"]) < 1e-4
