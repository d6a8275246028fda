"""Two LoRA experts of the real smollm2-135m-instruct on real ARC-Easy rows, stored in S3."""
from __future__ import annotations

import pytest
import torch

from nacd.config import load_config
from nacd.data.prepare import prepare_data
from nacd.experts import train_experts
from nacd.models import ParamSpace, load_model, make_trainable
from nacd.trajectories import open_store


@pytest.mark.slow
def test_two_smollm2_lora_experts_land_in_s3_and_load_back(shared_data, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    cfg = load_config(None, [
        f"data.data_dir={shared_data}", "data.sources=[{name: arc_easy, max_rows: 12}]",
        "data.max_length=96", "data.overflow=truncate", "experts.num_experts=2",
        "experts.micro_batch=2", "experts.max_steps=2", "experts.save_every=1", "experts.lr=1e-3",
        "experts.optimizer=adamw", f"storage.endpoint_url={endpoint}"])
    assert cfg.source.name == "smollm2-135m-instruct"
    prepare_data(cfg, tmp_path / "data")
    root = f"s3://{bucket}/smollm2"
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summaries = train_experts(cfg, tmp_path / "data", root)
    finally:
        torch.set_num_threads(saved)
    assert [s["expert"] for s in summaries] == ["expert-000", "expert-001"]
    assert all(s["final_loss"] < 10 for s in summaries)  # a pretrained model, not a random one

    store = open_store(root, cfg.storage)
    experts = store.experts()
    assert [e.name for e in experts] == ["expert-000", "expert-001"]
    model = make_trainable(load_model(cfg.source.name), cfg.source.param_space, seed=123)
    space = ParamSpace.from_model(model, cfg.source.param_space)
    # q_proj and v_proj LoRA A/B in each of the 30 layers
    assert len(space.names) == 4 * model.config.num_hidden_layers
    for e in experts:
        e.check_matches(space)
        assert e.steps == [0, 1, 2] and e.manifest["source_model"]["name"] == "smollm2-135m-instruct"
    # different seeds: different LoRA init and data order
    assert not torch.equal(experts[0].read(0), experts[1].read(0))
    last = experts[1].read(2)
    space.set(model, last)
    assert torch.equal(space.get(model), last)
    # the loaded adapters change the model's output (LoRA B was trained away from zero)
    ids = torch.tensor([[1, 504, 3458, 314, 260]])
    with torch.no_grad():
        with_adapters = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (with_adapters - base).abs().max() > 1e-6
