"""Selection baselines: seeds, random subset and LESS, on real data and tiny models."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from nacd.config import (ConfigError, DataConfig, DataSourceConfig, LessConfig, RunConfig,
                         SelectionConfig, SourceModelConfig)
from nacd.selection.common import SelectionError, load_pool
from nacd.pipeline_params import check_no_eval_leak
from nacd.selection.less import (adam_feature, combine_scores, example_grads, load_targets, select_less,
                                 subtask_means, work_dir_for)
from nacd.selection.projection import RandomProjector
from nacd.selection.random import select_random
from nacd.selection.seeds import read_seeds, select_seeds
from nacd.selection.warmup import AdamState, load_checkpoints, warmup_train


def make_cfg(shared_data, **kw) -> RunConfig:
    data = DataConfig(sources=[DataSourceConfig(name="flan_v2_cot", max_rows=24)],
                      data_dir=str(shared_data), max_length=128, overflow="truncate")
    less = LessConfig(warmup_fraction=0.25, warmup_epochs=2, warmup_lr=1e-3, proj_dim=512,
                      target_benchmark="arc_easy", target_examples=2, micro_batch=4)
    base = dict(budget=2, data=data, source=SourceModelConfig(name="tiny-llama"),
                selection=SelectionConfig(less=less))
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, shared_data):
    """24 real FLAN v2 CoT rows, tokenised by prepare_data with SmolLM2's tokenizer."""
    from nacd.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("pool") / "dataset"
    prepare_data(make_cfg(shared_data), out)
    return out


# --------------------------------------------------------------------------- budget, seeds, random
def test_budget_zero_and_above_pool_are_clear_errors(pool_dir, shared_data, tmp_path):
    n = len(load_pool(pool_dir))
    assert n == 24
    with pytest.raises(ValueError, match="budget"):
        make_cfg(shared_data, budget=0)
    for stage in (select_seeds, select_random, select_less):
        with pytest.raises(ConfigError, match=r"25 samples asked but the pool has only 24 \(.*dataset\)"):
            stage(make_cfg(shared_data, budget=25), pool_dir, tmp_path / stage.__name__)
        with pytest.raises(ConfigError, match="selects no sample"):
            stage(make_cfg(shared_data, budget=0.001), pool_dir, tmp_path / stage.__name__)
        assert not (tmp_path / stage.__name__).exists()  # nothing half-written


def test_missing_dataset_names_the_folder(tmp_path, shared_data):
    with pytest.raises(SelectionError, match=str(tmp_path / "nowhere" / "hf")):
        select_random(make_cfg(shared_data), tmp_path / "nowhere", tmp_path / "out")


def test_seeds_respect_budget_and_seed(pool_dir, shared_data, tmp_path):
    pool = load_pool(pool_dir)
    for budget, k in ((0.25, 6), (7, 7)):
        cfg = make_cfg(shared_data, budget=budget)
        summary = select_seeds(cfg, pool_dir, tmp_path / f"s{k}")
        seeds = read_seeds(tmp_path / f"s{k}")
        assert summary["budget"] == seeds["budget"] == len(seeds["indices"]) == k
        assert len(set(seeds["indices"])) == k and all(0 <= i < len(pool) for i in seeds["indices"])
        assert seeds["ids"] == list(pool.select(seeds["indices"])["id"])
        assert seeds["method"] == "random" and seeds["seed"] == 0
    other = make_cfg(shared_data, budget=0.25)
    other.seed_selection.seed = 1
    select_seeds(other, pool_dir, tmp_path / "s1")
    assert read_seeds(tmp_path / "s1")["indices"] != read_seeds(tmp_path / "s6")["indices"]
    select_seeds(make_cfg(shared_data, budget=0.25), pool_dir, tmp_path / "again")
    assert read_seeds(tmp_path / "again") == read_seeds(tmp_path / "s6")


def _variant(out):
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "variant.json").read_text())


def test_random_is_reproducible_per_seed_and_differs_across_seeds(pool_dir, shared_data, tmp_path):
    import datasets

    cfg = make_cfg(shared_data, budget=0.25)
    select_random(cfg, pool_dir, tmp_path / "a")
    select_random(cfg, pool_dir, tmp_path / "b")
    cfg.selection.seed = 1
    select_random(cfg, pool_dir, tmp_path / "c")
    a, meta = _variant(tmp_path / "a")
    b, _ = _variant(tmp_path / "b")
    c, _ = _variant(tmp_path / "c")
    assert meta["variant"] == "random" and meta["rows"] == meta["budget"] == 6 == len(a)
    assert a == b
    assert [r["id"] for r in a] != [r["id"] for r in c]
    pool_ids = set(load_pool(pool_dir)["id"])
    for r in a:
        assert r["text"] == r["prompt"] + r["response"] and r["id"] in pool_ids
    assert list(datasets.load_from_disk(str(tmp_path / "a" / "hf"))["id"]) == [r["id"] for r in a]


# --------------------------------------------------------------------------- LESS pieces
def test_projection_preserves_inner_products():
    torch.manual_seed(0)
    d, k = 3000, 4096
    # Correlated vectors (shared component), as gradients of similar examples are.
    x = torch.randn(12, d) + 0.8 * torch.randn(1, d)
    proj = RandomProjector(d, k, seed=3)
    y = proj.project(x)
    cos = torch.nn.functional.cosine_similarity
    true = cos(x[:, None], x[None], dim=-1)
    approx = cos(y[:, None], y[None], dim=-1)
    # JL: error ~ 1/sqrt(k) = 0.016; 66 pairs stay well within 6 sigma.
    assert (true - approx).abs().max() < 0.1
    assert (y.norm(dim=1) / x.norm(dim=1) - 1).abs().max() < 0.1
    # Blocked projection == one matmul with the whole matrix; the matrix depends on the seed only.
    uncached = RandomProjector(d, k, seed=3, cache_bytes=0)
    assert uncached.num_blocks > 1
    torch.testing.assert_close(uncached.project(x), x @ proj.matrix(), rtol=1e-4, atol=1e-4)
    assert set(proj.matrix().unique().tolist()) == {-1 / math.sqrt(k), 1 / math.sqrt(k)}
    assert not torch.equal(RandomProjector(d, 16, seed=4).matrix(), RandomProjector(d, 16, seed=3).matrix())


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma3"])
def test_batched_example_gradients_equal_one_backward_per_example(pool_dir, family):
    """The vmapped, right-padded batch against the plain batch-1 backward LESS's features were made
    with before: each row is its own example's gradient, whatever the others' lengths."""
    from nacd.config import ParamSpaceConfig
    from nacd.models import ParamSpace, load_model, make_trainable

    space_cfg = ParamSpaceConfig(kind="lora", lora_r=4)
    model = make_trainable(load_model(family, dtype="float64"), space_cfg).eval()
    space = ParamSpace.from_model(model, space_cfg)
    with torch.no_grad():  # LoRA B starts at zero: move it, so every A gradient is non-zero too
        space.set(model, space.get(model) + 0.05 * torch.randn(space.numel, generator=torch.Generator().manual_seed(0),
                                                                 dtype=torch.float64))
    pool = load_pool(pool_dir)
    examples = [pool[i] for i in (3, 0, 7)]
    assert len({len(e["input_ids"]) for e in examples}) == 3  # padded to the longest
    named = dict(model.named_parameters())
    reference = []
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        reference.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [named[n] for n in space.names])]))
    batched = example_grads(model, space.names, examples)
    assert batched.shape == (3, space.numel) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, torch.stack(reference).float(), rtol=1e-5, atol=1e-8)
    no_response = dict(examples[0], labels=[-100] * len(examples[0]["labels"]), id="row-7")
    with pytest.raises(SelectionError, match="row-7: no response token"):
        example_grads(model, space.names, [examples[1], no_response])


def test_adam_feature_equals_hand_computation_and_torch_adam_step():
    g = torch.tensor([0.5, -2.0, 1e-3])
    m = torch.tensor([0.1, 0.2, -0.3])
    v = torch.tensor([0.04, 0.01, 0.09])
    state = AdamState(m, v, step=3)  # betas 0.9 / 0.999, eps 1e-8; this update is step 4
    expected = []
    for gi, mi, vi in zip(g.tolist(), m.tolist(), v.tolist()):
        m_hat = (0.9 * mi + 0.1 * gi) / (1 - 0.9 ** 4)
        v_hat = (0.999 * vi + 0.001 * gi * gi) / (1 - 0.999 ** 4)
        expected.append(m_hat / (math.sqrt(v_hat) + 1e-8))
    torch.testing.assert_close(adam_feature(g, state), torch.tensor(expected))
    # The same thing as the real optimizer's update direction (lr = 1): what LESS means by it.
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=1.0)
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": m.double().clone(), "exp_avg_sq": v.double().clone()}
    p.grad = g.double()
    opt.step()
    torch.testing.assert_close(-p.detach().float(), adam_feature(g, state))


def test_scores_average_subtasks_weight_checkpoints_by_lr_and_take_the_max():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    target = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=1)
    groups = [slice(0, 2), slice(2, 3)]
    s = subtask_means(train, target, groups)
    assert s.shape == (3, 2)
    assert s[0, 0] == pytest.approx((1 + 1 / math.sqrt(1.04)) / 2) and s[0, 1] == pytest.approx(0.0)
    other = torch.tensor([[0.0, 0.5], [0.2, 0.1], [0.3, 0.3]])
    # lrs 3e-4 and 1e-4 -> weights 0.75 / 0.25, then max over the two subtasks
    combined = combine_scores([s, other], [3e-4, 1e-4])
    torch.testing.assert_close(combined, (0.75 * s + 0.25 * other).max(dim=1).values)
    with pytest.raises(ValueError, match="checkpoint"):
        combine_scores([s], [1e-4, 2e-4])


def test_warmup_resumes_to_the_same_state(pool_dir, shared_data, tmp_path):
    from nacd.models import ParamSpace, load_model, make_trainable

    cfg = make_cfg(shared_data)
    cfg.selection.less.micro_batch = 2
    # Real token sequences, cut to 24 tokens (loss on the last 16) to keep the test fast.
    ids = load_pool(pool_dir).select(range(4))["input_ids"]
    rows = [{"input_ids": list(x[:24]), "labels": [-100] * 8 + list(x[8:24])} for x in ids]

    base = load_model("tiny-llama")

    def fresh():  # the same starting point for each run, built once
        model = make_trainable(copy.deepcopy(base), cfg.source.param_space, seed=0)
        return model, ParamSpace.from_model(model, cfg.source.param_space)

    model, space = fresh()
    full = warmup_train(model, space, rows, cfg.selection.less, tmp_path / "full", log=lambda *_: None)
    assert [c.epoch for c in full] == [1, 2] and full[1].step == 4 and full[1].adam.step == 4
    # linear schedule, 4 steps, ceil(0.03 * 4) = 1 ramp step: lrs 0.5e-3, 1e-3, 2/3e-3, 1/3e-3
    assert full[0].mean_lr == pytest.approx(0.75e-3) and full[1].mean_lr == pytest.approx(0.5e-3)
    assert not torch.equal(full[0].params, full[1].params)

    one = cfg.selection.less.model_copy(update={"warmup_epochs": 1})
    model, space = fresh()
    warmup_train(model, space, rows, one, tmp_path / "resumed", log=lambda *_: None)
    (tmp_path / "resumed" / ".epoch-002.tmp-crashed").mkdir()  # a half-written checkpoint
    model, space = fresh()
    resumed = warmup_train(model, space, rows, cfg.selection.less, tmp_path / "resumed", log=lambda *_: None)
    assert len(load_checkpoints(tmp_path / "resumed")) == 2
    torch.testing.assert_close(resumed[1].params, full[1].params)
    torch.testing.assert_close(resumed[1].adam.exp_avg_sq, full[1].adam.exp_avg_sq)


def test_targets_leak_check_and_mmlu_subtasks(shared_data):
    from nacd.models import load_tokenizer

    cfg = make_cfg(shared_data)
    check_no_eval_leak(cfg)  # ARC-Easy target from train, evaluation on validation: fine
    cfg.selection.less.target_split = "validation"
    with pytest.raises(ConfigError, match=r"evaluation.benchmarks\[0\]"):
        check_no_eval_leak(cfg)
    cfg.selection.less.allow_eval_overlap = True
    check_no_eval_leak(cfg)
    # LESS's rows unused (no less variant, random seeds): nothing leaks; used as seeds: refused
    cfg.selection.less.allow_eval_overlap = False
    cfg.evaluation.variants = ["distilled", "random"]
    check_no_eval_leak(cfg)
    cfg.seed_selection.method = "less"
    with pytest.raises(ConfigError, match=r"evaluation.benchmarks\[0\]"):
        check_no_eval_leak(cfg)

    mmlu = make_cfg(shared_data)
    mmlu.selection.less.target_benchmark = "mmlu"
    mmlu.selection.less.target_examples = None
    targets = load_targets(mmlu, load_tokenizer("tiny-llama"))
    assert targets.split == "dev" and len(targets.names) == 57
    assert [g.stop - g.start for g in targets.groups] == [5] * 57  # 5 dev exemplars per subject
    assert all(len(e["input_ids"]) <= 128 for e in targets.examples)


# --------------------------------------------------------------------------- LESS end to end
@pytest.fixture(scope="module")
def planted(pool_dir, shared_data, tmp_path_factory):
    """Pool: the 24 real FLAN CoT rows + the 2 target ARC-Easy questions planted as training rows;
    LESS run once on it. Returns (cfg, pool folder, LESS output folder, planted ids).

    Unrelated rows are FLAN CoT (multi-token rationales): on a random tiny model, gradients of a
    one-word answer (some Dolly rows) look like those of a single-letter MC answer, which would
    make the test about the tiny model rather than about LESS."""
    import datasets

    from nacd.data.benchmarks import load_benchmark
    from nacd.data.formats import mc_to_instruction
    from nacd.data.prepare import tokenize_rows
    from nacd.models import load_tokenizer

    cfg = make_cfg(shared_data)
    tok = load_tokenizer("tiny-llama")
    targets = load_targets(cfg, tok)
    ids = [e["id"] for e in targets.examples]
    questions = {q.id: q for q in load_benchmark("arc_easy", "train", shared_data)}
    arc_rows, _ = tokenize_rows([mc_to_instruction(questions[i]) for i in ids], tok, cfg.data)
    for r, e in zip(arc_rows, targets.examples):  # the planted rows really duplicate the targets
        assert r["input_ids"] == e["input_ids"] and r["labels"] == e["labels"]
    base = load_pool(pool_dir)
    merged = datasets.concatenate_datasets([base, datasets.Dataset.from_list(arc_rows).cast(base.features)])
    root = tmp_path_factory.mktemp("planted")
    merged.shuffle(seed=0).save_to_disk(str(root / "pool" / "hf"))
    select_less(cfg, root / "pool", root / "less", log=lambda *_: None)
    return cfg, root / "pool", root / "less", ids


def test_less_ranks_planted_duplicates_of_the_targets_first(planted):
    cfg, pool, out, ids = planted
    rows, meta = _variant(out)
    assert meta["rows"] == len(rows) == 2 and meta["variant"] == "less" and meta["budget"] == 2
    assert sorted(r["id"] for r in rows) == sorted(ids)
    scores = json.loads((out / "less_scores.json").read_text())
    assert len(scores["scores"]) == 26 and scores["ids"] == list(load_pool(pool)["id"])
    by_id = dict(zip(scores["ids"], scores["scores"]))
    others = [v for i, v in by_id.items() if i not in ids]
    # Measured over data/LESS seeds 0-3: margin 0.07-0.18 (planted ~0.15-0.23, others <= 0.09).
    assert min(by_id[i] for i in ids) > max(others) + 0.03
    assert [c["epoch"] for c in scores["checkpoints"]] == [1, 2]
    assert sum(c["weight"] for c in scores["checkpoints"]) == pytest.approx(1.0)
    assert scores["target"]["subtasks"] == {"arc_easy": ids}
    assert [r["less_rank"] for r in rows] == [1, 2]
    assert rows[0]["less_score"] >= rows[1]["less_score"]
    assert not work_dir_for(out).exists()


def test_less_resumes_after_a_crash_with_the_same_result(planted, tmp_path, monkeypatch):
    import nacd.selection.less as less

    cfg, pool, reference, _ = planted
    real = less.checkpoint_scores
    calls = []

    def crash_at_epoch_2(model, space, ckpt, *args):
        calls.append(ckpt.epoch)
        if ckpt.epoch == 2 and calls.count(2) == 1:
            raise RuntimeError("simulated crash")
        return real(model, space, ckpt, *args)

    monkeypatch.setattr(less, "checkpoint_scores", crash_at_epoch_2)
    out = tmp_path / "less"
    with pytest.raises(RuntimeError, match="simulated crash"):
        select_less(cfg, pool, out, log=lambda *_: None)
    assert not out.exists()  # no half-written variant
    work = work_dir_for(out)
    assert (work / "scores-epoch-001.safetensors").is_file()
    assert len(load_checkpoints(work / "warmup")) == 2

    messages = []
    select_less(cfg, pool, out, log=messages.append)
    assert calls == [1, 2, 2]  # epoch 1's scores came from the cache
    assert not any("warm-up: epoch" in m for m in messages)  # no warm-up step was redone
    got = json.loads((out / "less_scores.json").read_text())
    want = json.loads((reference / "less_scores.json").read_text())
    assert got["selected"] == want["selected"]
    assert got["scores"] == pytest.approx(want["scores"], abs=1e-6)


def test_less_seeds_are_the_less_variants_rows(planted, tmp_path):
    cfg, pool, less_out, ids = planted
    cfg = cfg.model_copy(deep=True)
    cfg.seed_selection.method = "less"
    with pytest.raises(SelectionError, match="needs the select_less output folder"):
        select_seeds(cfg, pool, tmp_path / "no-less")
    assert not (tmp_path / "no-less").exists()
    select_seeds(cfg, pool, tmp_path / "seeds", less_dir=less_out)
    seeds = read_seeds(tmp_path / "seeds")
    pool_ids = list(load_pool(pool)["id"])
    assert seeds["method"] == "less" and seeds["budget"] == 2
    assert seeds["indices"] == sorted(pool_ids.index(i) for i in ids)  # the planted rows LESS ranked first
    assert sorted(seeds["ids"]) == sorted(ids)
    # a LESS variant made at another budget, or from another pool, is refused by file and line
    with pytest.raises(SelectionError, match=r"data.jsonl: 2 rows, but the budget is 3 of 26"):
        select_seeds(cfg.model_copy(update={"budget": 3}), pool, tmp_path / "k3", less_dir=less_out)
    foreign = tmp_path / "foreign"
    foreign_rows = [json.loads(line) for line in (less_out / "data.jsonl").read_text().splitlines()]
    foreign_rows[1]["id"] = "not-in-the-pool"
    from nacd.data.variants import write_variant
    write_variant(foreign_rows, foreign, {"variant": "less"})
    with pytest.raises(SelectionError, match=r"data.jsonl:2: id 'not-in-the-pool' is not in the pool"):
        select_seeds(cfg, pool, tmp_path / "bad", less_dir=foreign)
    assert not (tmp_path / "k3").exists() and not (tmp_path / "bad").exists()
