"""ID projection: chunked search == brute force; the stage writes a readable distilled variant."""
from __future__ import annotations

import json

import pytest
import torch

from nacd.config import load_config
from nacd.data.variants import read_variant, read_variant_meta
from nacd.distill.synthetic import SyntheticSet
from nacd.models import input_embedding_matrix, load_model, load_tokenizer
from nacd.projection import ProjectionError, nearest_rows, project_ids, special_token_ids


def brute(x: torch.Tensor, table: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "euclidean":
        d = ((x[:, None, :] - table[None, :, :]) ** 2).sum(-1).sqrt()
    else:
        d = 1 - torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(table, dim=1).T
    return d


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_search_equals_brute_force_argmin(distance, dtype):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2000, 24, generator=g, dtype=torch.float64)
    x = torch.randn(70, 24, generator=g, dtype=torch.float64) * 0.5
    d = brute(x, table, distance)
    ids, dist = nearest_rows(x.to(dtype), table.to(dtype), distance, vocab_chunk=333, query_chunk=16)
    assert torch.equal(ids, d.argmin(dim=1))
    assert torch.allclose(dist.double(), d.min(dim=1).values, rtol=1e-5, atol=1e-6)
    # excluded rows are never returned; the next-nearest is
    banned = d.argmin(dim=1).unique()
    ids2, _ = nearest_rows(x.to(dtype), table.to(dtype), distance, exclude_ids=banned, vocab_chunk=333)
    d[:, banned] = float("inf")
    assert torch.equal(ids2, d.argmin(dim=1))


def test_large_vocabulary_is_searched_in_chunks_with_exact_distances():
    """A Gemma-sized 262k x 64 table: no K*P x V matrix, same answer as a direct check."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(262144, 64, generator=g)
    picks = torch.randint(262144, (40,), generator=g)
    x = table[picks] + 1e-3 * torch.randn(40, 64, generator=g)
    ids, dist = nearest_rows(x, table, "euclidean")
    assert torch.equal(ids, picks)
    assert torch.allclose(dist, (x - table[picks]).norm(dim=1), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    """A tiny-llama synthetic set whose prompt vectors sit next to known token rows, one of them
    a special token (<|im_start|>), with real seed text in its metadata."""
    tok = load_tokenizer("tiny-llama")
    table = input_embedding_matrix(load_model("tiny-llama"))
    words = tok(" the cat sat on a mat", add_special_tokens=False)["input_ids"][:4]
    special = tok.convert_tokens_to_ids("<|im_start|>")
    prompt_ids = torch.tensor([words, [words[0], special, words[2], words[3]]])
    noise = 1e-4 * torch.randn(2, 4, table.shape[1], generator=torch.Generator().manual_seed(0))
    seed_ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 0]])
    labels = torch.tensor([[-100, -100, 12, 13], [-100, 21, 22, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    meta = {"source_model": {"name": "tiny-llama", "revision": None}, "distance": "euclidean",
            "exclude_special_tokens": True,
            "seeds": [{"id": "arc-1", "prompt": "Question: Why?\nAnswer:", "response": " Because."},
                      {"id": "arc-2", "prompt": "Question: How?\nAnswer:", "response": " Slowly."}]}
    syn = SyntheticSet(table[prompt_ids] + noise, seed_ids, labels, mask, torch.tensor(-2.0), meta=meta,
                       init_prompt_ids=prompt_ids)
    path = tmp_path_factory.mktemp("syn")
    syn.save_pretrained(path)
    return {"path": path, "words": words, "special": special, "tok": tok}


def test_project_ids_writes_the_distilled_variant(tiny_synthetic, tmp_path):
    t = tiny_synthetic
    summary = project_ids(load_config(overrides=["source.name=tiny-llama"]), t["path"], tmp_path / "v")
    rows = read_variant(tmp_path / "v")
    meta = read_variant_meta(tmp_path / "v")
    assert meta["variant"] == "distilled" and meta["rows"] == 2 == summary["rows"]
    assert (tmp_path / "v" / "hf").is_dir()
    r0, r1 = rows
    assert r0["projected_ids"] == t["words"]
    assert r0["projected_prompt"] == t["tok"].decode(t["words"])
    assert r0["prompt"] == r0["projected_prompt"] + "Question: Why?\nAnswer:"
    assert r0["response"] == " Because." and r0["text"] == r0["prompt"] + r0["response"]
    assert r0["seed_id"] == "arc-1" and r0["seed_prompt"] == "Question: Why?\nAnswer:"
    assert max(r0["nn_distances"]) < 1e-2 and len(r0["nn_distances"]) == 4
    # the vector next to <|im_start|> is not projected to it (special ids are excluded) ...
    assert t["special"] not in r1["projected_ids"]
    assert r1["projected_ids"][0] == t["words"][0] and r1["projected_ids"][2:] == t["words"][2:]
    assert r1["nn_distances"][1] > 10 * max(r0["nn_distances"])
    # ... and the report says so
    sp = meta["special_tokens"]
    assert sp["excluded_from_search"] and sp["projected_to_special"] == 0
    assert sp["nearest_is_special_without_exclusion"] == 1
    # only the vector that started on <|im_start|> lands on another token
    assert meta["tokens_changed_by_distillation"] == {"prompt": 1, "prompt_total": 8}
    assert t["special"] in special_token_ids(t["tok"])
    assert json.loads((tmp_path / "v" / "data.jsonl").read_text().splitlines()[0])["id"] == "distilled-00000"


def test_project_ids_refuses_another_source_model(tiny_synthetic, tmp_path):
    with pytest.raises(ProjectionError, match="distilled on 'tiny-llama'"):
        project_ids(load_config(overrides=["source.name=tiny-opt"]), tiny_synthetic["path"], tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_learnable_instruction_is_projected_and_decoded(tmp_path):
    tok = load_tokenizer("tiny-llama")
    table = input_embedding_matrix(load_model("tiny-llama"))
    ids = torch.tensor([tok("Name a planet: Mars", add_special_tokens=False)["input_ids"]])
    n_prompt = len(tok("Name a planet:", add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    labels[:, :n_prompt] = -100
    syn = SyntheticSet.init(table, ids, labels, torch.ones_like(ids), prompt_len=2, init="seed_tokens",
                            learnable_instruction=True,
                            meta={"source_model": {"name": "tiny-llama"}, "distance": "cosine"})
    syn.save_pretrained(tmp_path / "syn")
    project_ids(load_config(overrides=["source.name=tiny-llama"]), tmp_path / "syn", tmp_path / "v")
    (row,) = read_variant(tmp_path / "v")
    assert row["projected_ids"] == ids[0, :2].tolist()  # seed_tokens init: the seed's first tokens
    assert row["projected_instruction_ids"] == ids[0, :n_prompt].tolist()
    assert row["prompt"] == tok.decode(ids[0, :2].tolist()) + tok.decode(ids[0, :n_prompt].tolist())
    assert row["response"] == tok.decode(ids[0, n_prompt:].tolist())
    # undistilled, every vector projects back to the token it started from
    assert read_variant_meta(tmp_path / "v")["tokens_changed_by_distillation"] == {
        "prompt": 0, "prompt_total": 2, "instruction": 0, "instruction_total": n_prompt}
