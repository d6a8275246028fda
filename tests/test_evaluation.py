"""MC scoring (lm-eval and direct, cross-checked), target fine-tuning and the evaluate stage."""
from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from nacd.config import BenchmarkConfig, EvaluationConfig, FinetuneConfig, RunConfig
from nacd.data.benchmarks import load_benchmark
from nacd.data.formats import mc_to_instruction, render_row
from nacd.data.variants import write_variant
from nacd.evaluation.run import SCORE_KEYS, evaluate, evaluate_model, load_target, score
from nacd.evaluation.scoring import build_requests, continuation_logprobs, fitting_batch_size, score_requests


def _hand_logprob(model, tok, context: str, continuation: str) -> float:
    """One unbatched forward per choice: sum of log p(token) over the continuation's tokens."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


@contextmanager
def _output_layer_inputs(model, record=lambda x: x.shape):
    """``record`` of every input the model's output layer receives, while the block runs."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(record(args[0])))
    try:
        yield seen
    finally:
        hook.remove()


@pytest.mark.parametrize("target", ["tiny-llama", "tiny-gemma3", "tiny-opt"])
def test_direct_scorer_matches_hand_computed_sum(shared_data, target):
    model, tok = load_target(target)
    questions = load_benchmark("arc_easy", "validation", shared_data)[:6]
    requests = build_requests("arc_easy", questions)
    result = score_requests(model, tok, requests, batch_size=4)
    for req, got in zip(requests, result["questions"]):
        hand = [_hand_logprob(model, tok, req.context, c) for c in req.continuations]
        assert got["loglikelihoods"] == pytest.approx(hand, abs=1e-4)
        assert got["pred"] == max(range(len(hand)), key=hand.__getitem__)
        norm = [h / len(c) for h, c in zip(hand, req.continuations)]
        assert got["pred_norm"] == max(range(len(norm)), key=norm.__getitem__)
    assert result["acc"] == sum(q["pred"] == q["answer"] for q in result["questions"]) / 6


def test_batching_does_not_change_loglikelihoods(shared_data):
    model, tok = load_target("tiny-llama")
    reqs = build_requests("mmlu", load_benchmark("mmlu", "dev", shared_data)[:5], 0)
    pairs = [(r.context, c) for r in reqs for c in r.continuations]
    one = continuation_logprobs(model, tok, pairs, batch_size=1)
    assert continuation_logprobs(model, tok, pairs, batch_size=7) == pytest.approx(one, abs=1e-4)


def test_the_output_layer_runs_only_where_a_token_is_scored(shared_data):
    model, tok = load_target("tiny-gemma3")
    reqs = build_requests("mmlu", load_benchmark("mmlu", "dev", shared_data)[:3], 0)
    pairs = [(r.context, c) for r in reqs for c in r.continuations]
    with _output_layer_inputs(model) as seen:
        alone = continuation_logprobs(model, tok, pairs, batch_size=1)
    # MMLU's four letters share one input and are scored at its last position only
    assert [tuple(s[:2]) for s in seen] == [(1, 1)] * 3
    hand = [_hand_logprob(model, tok, c, x) for c, x in pairs]
    assert alone == pytest.approx(hand, abs=1e-4)


def test_a_frozen_model_gets_a_contiguous_input_to_its_output_layer(shared_data):
    # a fine-tuned model is frozen: a sliced, non-contiguous input would take a 5x slower bmm on CPU
    model, tok = load_target("tiny-gemma3")
    for p in model.parameters():
        p.requires_grad_(False)
    reqs = build_requests("arc_easy", load_benchmark("arc_easy", "validation", shared_data)[:3])
    pairs = [(r.context, c) for r in reqs for c in r.continuations]
    with _output_layer_inputs(model, lambda x: x.is_contiguous()) as seen:
        got = continuation_logprobs(model, tok, pairs, batch_size=4)
    head = model.get_output_embeddings()
    assert seen and all(seen) and not head._forward_pre_hooks  # and the scorer's own hook is gone
    assert got == pytest.approx([_hand_logprob(model, tok, c, x) for c, x in pairs], abs=1e-4)


def test_direct_batches_keep_their_logits_under_the_cap(shared_data):
    model, tok = load_target("tiny-llama")
    reqs = build_requests("arc_easy", load_benchmark("arc_easy", "validation", shared_data)[:12])
    pairs = [(r.context, c) for r in reqs for c in r.continuations]
    row_gib = model.config.vocab_size * 4 / 2**30  # float32 logits of one position
    with _output_layer_inputs(model) as kept:
        capped = continuation_logprobs(model, tok, pairs, batch_size=8, max_logits_gib=40 * row_gib)
    # a batch keeps at most 40 positions' logits, unless one input alone needs more
    assert all(b * n <= 40 or b == 1 for b, n, _ in kept) and max(b for b, _, _ in kept) > 1
    assert capped == pytest.approx(continuation_logprobs(model, tok, pairs, batch_size=8), abs=1e-4)


def test_the_batch_shrinks_until_its_logits_fit_the_cap(shared_data):
    model, tok = load_target("tiny-llama")
    reqs = build_requests("arc_easy", load_benchmark("arc_easy", "validation", shared_data)[:12])
    longest = max(len(tok(r.context + c)["input_ids"]) for r in reqs for c in r.continuations)
    row_gib = longest * model.config.vocab_size * 4 / 2**30  # float32 logits of one input
    assert fitting_batch_size(model, tok, reqs, 8, 3.5 * row_gib) == 3
    assert fitting_batch_size(model, tok, reqs, 2, 3.5 * row_gib) == 2  # batch_size stays the ceiling
    assert fitting_batch_size(model, tok, reqs, 8, 0.5 * row_gib) == 1  # one input is never split
    wide = score(model, tok, "arc_easy", "validation", shared_data, limit=12, batch_size=8)
    narrow = score(model, tok, "arc_easy", "validation", shared_data, limit=12, batch_size=8,
                   max_logits_gib=3.5 * row_gib)
    assert wide["batch_size"] == 8 and narrow["batch_size"] == 3
    for a, b in zip(wide["_questions"], narrow["_questions"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3)


def test_mmlu_lm_eval_matches_direct_per_subject(shared_data):
    model, tok = load_target("tiny-llama")
    via_harness = score(model, tok, "mmlu", "val", shared_data, limit=1, batch_size=16)
    direct = score(model, tok, "mmlu", "val", shared_data, limit=1, batch_size=16, method="direct")
    assert via_harness["n"] == direct["n"] == 57 and len(via_harness["subjects"]) == 57
    assert via_harness["acc"] == direct["acc"] and via_harness["acc_macro"] == direct["acc_macro"]
    for a, b in zip(via_harness["_questions"], direct["_questions"]):
        assert a["id"] == b["id"] and a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3)


@pytest.mark.slow
def test_smollm2_arc_lm_eval_equals_direct(shared_data, tmp_path):
    out = tmp_path / "arc.json"
    harness = evaluate_model("smollm2-135m-instruct", None, "arc_easy", "validation", shared_data,
                             limit=12, batch_size=16, json_out=out)
    direct = evaluate_model("smollm2-135m-instruct", None, "arc_easy", "validation", shared_data,
                            limit=12, batch_size=16, method="direct")
    assert harness["n"] == direct["n"] == 12
    assert harness["acc"] == direct["acc"] and harness["acc_norm"] == direct["acc_norm"]
    assert harness["acc"] > 0.25  # 4 of 12: a real instruct model beats chance (0.25) on ARC-Easy
    saved = json.loads(out.read_text())
    assert saved["acc"] == harness["acc"] and len(saved["questions"]) == 12


def _variant(shared_data, tmp_path, n=24):
    rows = [render_row(mc_to_instruction(q)) for q in load_benchmark("arc_easy", "train", shared_data)[:n]]
    write_variant(rows, tmp_path / "variant", {"variant": "random", "budget": n})
    return tmp_path / "variant"


def _run_cfg(shared_data, **ft) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"data_dir": str(shared_data)},
        "evaluation": {"benchmarks": [BenchmarkConfig(name="arc_easy", split="validation", limit=12).model_dump(),
                                      BenchmarkConfig(name="mmlu", split="val", limit=1).model_dump()],
                       "finetune": FinetuneConfig(epochs=1, lr=3e-2, micro_batch=4, max_length=128, **ft).model_dump(),
                       "batch_size": 16}})


def test_evaluate_finetunes_and_writes_scores(shared_data, tmp_path):
    cfg = _run_cfg(shared_data)
    variant = _variant(shared_data, tmp_path)
    base = evaluate(cfg, "tiny-llama", "none", None, tmp_path / "none")
    tuned = evaluate(cfg, "tiny-llama", "random", variant, tmp_path / "random")
    saved = json.loads((tmp_path / "random" / "scores.json").read_text())
    assert saved == tuned and len(saved) == 2
    for row in saved:
        assert set(SCORE_KEYS) <= set(row)
    assert saved[1]["benchmark"] == "mmlu" and len(saved[1]["subjects"]) == 57
    assert base[0]["finetune"] == {"trained": False}
    # evaluation.method=direct scores the same log-likelihoods by nacd's scorer
    direct_cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"method": "direct"})})
    direct = evaluate(direct_cfg, "tiny-llama", "none", None, tmp_path / "none-direct")
    for a, b in zip(base, direct):
        assert (a["method"], b["method"]) == ("lm_eval", "direct") and a["acc"] == b["acc"]
        assert a["gold_loglik"] == pytest.approx(b["gold_loglik"], abs=1e-4)
    info = tuned[0]["finetune"]
    assert info["trained"] and info["steps"] == 6 and info["loss_last"] < info["loss_first"]
    assert (tmp_path / "random" / "adapter" / "adapter_config.json").is_file()
    assert tuned[0]["gold_loglik"] != pytest.approx(base[0]["gold_loglik"], abs=1e-3)
    # same inputs: reused, not retrained
    mtime = (tmp_path / "random" / "scores.json").stat().st_mtime_ns
    assert evaluate(cfg, "tiny-llama", "random", variant, tmp_path / "random") == tuned
    assert (tmp_path / "random" / "scores.json").stat().st_mtime_ns == mtime
    # the saved adapter reproduces the fine-tuned scores through `nacd evaluate`
    again = evaluate_model("tiny-llama", tmp_path / "random" / "adapter", "arc_easy", "validation",
                           shared_data, limit=12, batch_size=16)
    assert again["gold_loglik"] == pytest.approx(tuned[0]["gold_loglik"], abs=1e-4)


@pytest.mark.parametrize("target", ["tiny-opt", "tiny-gemma3"])
def test_finetune_other_architectures(shared_data, tmp_path, target):
    cfg = _run_cfg(shared_data)
    cfg.evaluation.benchmarks = [BenchmarkConfig(name="arc_easy", split="validation", limit=4)]
    rows = evaluate(cfg, target, "random", _variant(shared_data, tmp_path, 8), tmp_path / "out")
    assert rows[0]["finetune"]["steps"] == 2 and rows[0]["n"] == 4


def test_evaluate_bad_input(shared_data, tmp_path):
    cfg = _run_cfg(shared_data)
    with pytest.raises(ValueError, match="variant 'random' needs a variant dataset folder"):
        evaluate(cfg, "tiny-llama", "random", None, tmp_path / "x")
    with pytest.raises(ValueError, match="not a complete variant dataset"):
        evaluate(cfg, "tiny-llama", "random", tmp_path, tmp_path / "x")
    with pytest.raises(ValueError, match="Input should be 'arc_easy' or 'mmlu'"):
        EvaluationConfig.model_validate({"benchmarks": [{"name": "hellaswag"}]})
    model, tok = load_target("tiny-llama")
    with pytest.raises(ValueError, match="has no split 'test2'"):
        score(model, tok, "arc_easy", "test2", shared_data)
    assert not (tmp_path / "x").exists()
