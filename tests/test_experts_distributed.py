"""Multi-process DeepSpeed on CPU (gloo, 2 processes via torchrun) against the single-process loop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nacd.data.prepare import prepare_data
from nacd.experts import deepspeed_config, launch_train_expert, train_expert
from nacd.trajectories import open_store
from test_experts import tiny_config


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


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_matches_single_process(dataset, shared_data, tmp_path, stage):
    common = ["experts.max_steps=4", "experts.save_every=2", "experts.optimizer=sgd_momentum",
              "experts.schedule=linear"]
    # 2 processes x micro-batch 2 x accumulation 1 == 1 process x micro-batch 2 x accumulation 2
    ds_cfg = tiny_config(shared_data, *common, f"experts.deepspeed=zero{stage}", "experts.num_procs=2")
    single_cfg = tiny_config(shared_data, *common, "experts.grad_accum=2")
    ds_summary = launch_train_expert(ds_cfg, dataset, str(tmp_path / "ds"), 0)
    assert ds_summary["world_size"] == 2 and ds_summary["checkpoints"] == 3

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_summary = train_expert(single_cfg, dataset, str(tmp_path / "single"), 0)
    finally:
        torch.set_num_threads(saved)
    assert ds_summary["tokens"] == single_summary["tokens"]  # the same rows were trained on

    ds = open_store(str(tmp_path / "ds")).expert(0)
    single = open_store(str(tmp_path / "single")).expert(0)
    assert ds.steps == single.steps == [0, 2, 4]
    assert ds.manifest["extra"]["deepspeed"] == f"zero{stage}"
    for i in range(len(ds)):
        torch.testing.assert_close(ds.read(i), single.read(i), rtol=1e-5, atol=1e-6)
    assert (ds.read(2) - ds.read(0)).norm() > 1e-3  # training moved the parameters
    assert abs(ds_summary["final_loss"] - single_summary["final_loss"]) < 1e-4
