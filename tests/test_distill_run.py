"""The outer loop and the distill stage: resume, guards, bad input, and a real-model run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import bench_module

from nacd.config import ConfigError, ParamSpaceConfig, RunConfig, load_config
from nacd.distill.losses import Student
from nacd.distill.run import Distiller, DistillError, _fingerprint, distill
from nacd.distill.synthetic import SyntheticSet, SyntheticSetError
from nacd.models import ParamSpace, load_model, load_tokenizer, make_trainable
from nacd.trajectories import TrajectoryWriter, open_store


# --------------------------------------------------------------------------- real data, real experts
def arc_rows(shared_data: Path, n: int, max_tokens: int, tokenizer) -> list[dict]:
    """Tokenised ARC-Easy train rows (prompt masked with -100, loss on the answer), shortest first."""
    rows = []
    with open(shared_data / "arc_easy" / "train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
            prompt, response = f"Question: {r['question']}\nAnswer:", f" {answer}"
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(p_ids) + len(r_ids) <= max_tokens:
                rows.append({"id": r["id"], "prompt": prompt, "response": response, "source": "arc_easy",
                             "input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids,
                             "attention_mask": [1] * (len(p_ids) + len(r_ids))})
            if len(rows) == n:
                return rows
    raise AssertionError("not enough short ARC rows")


def write_dataset(rows: list[dict], root: Path, seed_indices: list[int]) -> tuple[Path, Path]:
    import datasets

    dataset_dir, seeds_dir = root / "dataset", root / "seeds"
    datasets.Dataset.from_list(rows).save_to_disk(str(dataset_dir / "hf"))
    seeds_dir.mkdir(parents=True)
    (seeds_dir / "seeds.json").write_text(json.dumps({"indices": seed_indices, "method": "random", "seed": 0}))
    return dataset_dir, seeds_dir


def trainable(name: str, space_cfg: ParamSpaceConfig):
    model = make_trainable(load_model(name), space_cfg)
    return model, ParamSpace.from_model(model, space_cfg)


def write_experts(name: str, space_cfg: ParamSpaceConfig, rows: list[dict], store: str, *, experts: int = 1,
                  checkpoints: int = 4, steps_per_checkpoint: int = 1, lr: float = 0.05,
                  source_name: str | None = None) -> None:
    """Real SGD on the real rows (one row per step), a checkpoint every few steps, into the store."""
    for e in range(experts):
        torch.manual_seed(e)
        model, space = trainable(name, space_cfg)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        writer = TrajectoryWriter(store, f"expert-{e:03d}", space, source_model=source_name or name)
        writer.append(0, 0.0, lr, space.get(model))
        for c in range(1, checkpoints):
            for s in range(steps_per_checkpoint):
                r = rows[(c * steps_per_checkpoint + s + e) % len(rows)]
                batch = {k: torch.tensor([r[k]]) for k in ("input_ids", "labels", "attention_mask")}
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
            writer.append(c, 0.0, lr, space.get(model))
        writer.commit()


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, shared_data):
    """Real ARC rows tokenised with the tiny models' (SmolLM2) tokenizer, 2 experts of tiny-llama."""
    root = tmp_path_factory.mktemp("tiny_env")
    tok = load_tokenizer("tiny-llama")
    rows = arc_rows(shared_data, 6, 28, tok)
    dataset_dir, seeds_dir = write_dataset(rows, root, [0, 2, 3, 5])
    store = str(root / "store")
    write_experts("tiny-llama", ParamSpaceConfig(), rows, store, experts=2, checkpoints=4, lr=0.5)
    return {"root": root, "rows": rows, "dataset": dataset_dir, "seeds": seeds_dir, "store": store}


def tiny_cfg(**distill) -> RunConfig:
    base = {"prompt_len": 3, "syn_steps": 2, "expert_epochs": 2, "max_start": 2, "batch_syn": 2,
            "iterations": 4, "checkpoint_every": 2, "lr_embeddings": 1e-2, "lr_alpha": 1e-1, "init_alpha": 0.5}
    return load_config(overrides=["source.name=tiny-llama"] + [f"distill.{k}={v}" for k, v in
                                                               {**base, **distill}.items()])


def tiny_loop(env, cfg: RunConfig, **syn_overrides) -> Distiller:
    model, space = trainable("tiny-llama", cfg.source.param_space)
    for p in model.parameters():
        p.requires_grad_(False)
    student = Student.from_model(model, space)
    rows = [env["rows"][i] for i in (0, 2, 3, 5)]
    from nacd.distill.synthetic import pad_seeds

    syn = SyntheticSet.init(student.table, *pad_seeds(rows), prompt_len=cfg.distill.prompt_len,
                            init="random_vocab", init_alpha=cfg.distill.init_alpha,
                            generator=torch.Generator().manual_seed(0))
    for k, v in syn_overrides.items():
        setattr(syn, k, v)
    return Distiller(student, syn, open_store(env["store"]).experts(), cfg.distill)


def state_of(loop: Distiller) -> dict:
    return {"prompt": loop.prompt.detach().clone(), "log_alpha": loop.log_alpha.detach().clone(),
            "opt": loop.opt_embeddings.state_dict()["state"][0]["exp_avg_sq"].clone(),
            "rng": loop.generator.get_state(), "history": [dict(h, seconds=0) for h in loop.history]}


# --------------------------------------------------------------------------- resume
def test_resume_after_interruption_is_bit_identical(tiny_env, tmp_path):
    cfg = tiny_cfg(iterations=5)
    straight = tiny_loop(tiny_env, cfg)
    straight.run(5, tmp_path / "a", progress=False)

    def kill_at_3(rec):
        if rec["iteration"] == 3:  # after checkpoint 2 and one more, unsaved, iteration
            raise KeyboardInterrupt

    first = tiny_loop(tiny_env, cfg)
    with pytest.raises(KeyboardInterrupt):
        first.run(5, tmp_path / "b", progress=False, on_iteration=kill_at_3)
    assert Distiller.latest_checkpoint(tmp_path / "b").name == "iter-000004"
    resumed = tiny_loop(tiny_env, cfg)
    resumed.run(5, tmp_path / "b", progress=False)
    a, b = state_of(straight), state_of(resumed)
    assert torch.equal(a["prompt"], b["prompt"]) and torch.equal(a["log_alpha"], b["log_alpha"])
    assert torch.equal(a["opt"], b["opt"]) and torch.equal(a["rng"], b["rng"])
    assert a["history"] == b["history"] and len(a["history"]) == 5
    # the prompts actually moved, and different (expert, start) draws happened
    assert not torch.equal(a["prompt"], tiny_loop(tiny_env, cfg).prompt.detach())
    assert len({(h["expert"], h["start"]) for h in a["history"]}) > 1


def test_starts_are_drawn_from_min_start_up_to_max_start(tiny_env):
    late = tiny_loop(tiny_env, tiny_cfg(min_start=1, max_start=2))
    assert {late.draw()[1] for _ in range(20)} == {1}
    # min_start 0 keeps the draws of the loop before min_start existed: one randint below max_start
    plain = tiny_loop(tiny_env, tiny_cfg())
    g = torch.Generator().manual_seed(tiny_cfg().distill.seed)
    for _ in range(10):
        e, t, schedule = plain.draw()
        assert e == int(torch.randint(2, (1,), generator=g)) and t == int(torch.randint(2, (1,), generator=g))
        for batch in schedule:
            assert torch.equal(batch, torch.randperm(4, generator=g)[:2])


def test_stage_resumes_to_the_same_synthetic_set(tiny_env, tmp_path):
    env = tiny_env
    summary = distill(tiny_cfg(iterations=2), env["dataset"], env["seeds"], env["store"], tmp_path / "x",
                      progress=False)
    assert summary["iterations"] == 2
    distill(tiny_cfg(iterations=4), env["dataset"], env["seeds"], env["store"], tmp_path / "x", progress=False)
    distill(tiny_cfg(iterations=4), env["dataset"], env["seeds"], env["store"], tmp_path / "y", progress=False)
    x, y = SyntheticSet.from_pretrained(tmp_path / "x"), SyntheticSet.from_pretrained(tmp_path / "y")
    for name, tensor in x.tensors().items():
        assert torch.equal(tensor, y.tensors()[name]), name
    assert [h["l_match"] for h in x.meta["history"]] == [h["l_match"] for h in y.meta["history"]]
    assert x.meta["iteration"] == 4 and x.num_samples == 4 and x.prompt_len == 3
    assert [s["id"] for s in x.meta["seeds"]] == [env["rows"][i]["id"] for i in (0, 2, 3, 5)]
    # a changed distill setting refuses the old checkpoints instead of mixing runs
    with pytest.raises(DistillError, match="another configuration"):
        distill(tiny_cfg(iterations=6, beta=0.5), env["dataset"], env["seeds"], env["store"], tmp_path / "x",
                progress=False)


# --------------------------------------------------------------------------- guards
def test_nan_is_reported_with_its_iteration(tiny_env, tmp_path):
    cfg = tiny_cfg()
    loop = tiny_loop(tiny_env, cfg)
    loop.run(1, tmp_path, progress=False)
    with torch.no_grad():
        loop.prompt[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="iteration 1"):
        loop.run(2, None, progress=False)
    assert Distiller.latest_checkpoint(tmp_path).name == "iter-000001"


def test_alpha_is_clamped_to_max_alpha(tiny_env):
    cfg = tiny_cfg(max_alpha=0.2, lr_alpha=5.0)
    loop = tiny_loop(tiny_env, cfg)  # init_alpha 0.5 > max_alpha: clamped from the start
    assert float(loop.log_alpha.exp()) == pytest.approx(0.2)
    loop.run(3, None, progress=False)
    assert all(h["alpha"] <= 0.2 * (1 + 1e-6) for h in loop.history)


def test_max_grad_norm_scales_the_step_and_keeps_its_direction(tiny_env):
    """With SGD the step is lr x gradient, so a clipped iteration moves the embeddings by the unclipped
    step x (limit / norm) and log_alpha by lr x limit at most; the history keeps the unclipped norms."""
    free = tiny_loop(tiny_env, tiny_cfg(optimizer="sgd"))
    start_prompt, start_alpha = free.prompt.detach().clone(), free.log_alpha.detach().clone()
    free.run(1, None, progress=False)
    raw, raw_alpha = free.history[0]["grad_norm_prompt"], abs(free.history[0]["grad_log_alpha"])
    limit = min(raw, raw_alpha) / 4
    clipped = tiny_loop(tiny_env, tiny_cfg(optimizer="sgd", max_grad_norm=limit))
    assert torch.equal(clipped.prompt.detach(), start_prompt)
    clipped.run(1, None, progress=False)
    h = clipped.history[0]
    assert h["grad_clipped"] and not free.history[0]["grad_clipped"]
    assert h["grad_norm_prompt"] == raw and h["l_match"] == free.history[0]["l_match"]
    step_free, step_clipped = free.prompt.detach() - start_prompt, clipped.prompt.detach() - start_prompt
    torch.testing.assert_close(step_clipped, step_free * (limit / raw), rtol=1e-4, atol=1e-8)  # float32 p - lr g
    assert float(step_clipped.norm()) == pytest.approx(1e-2 * limit, rel=1e-4)  # lr_embeddings 1e-2
    alpha_step = float(clipped.log_alpha.detach() - start_alpha)
    assert abs(alpha_step) == pytest.approx(1e-1 * limit, rel=1e-4)  # lr_alpha 1e-1, |gradient| at the limit
    # a limit above both norms leaves the run as it was
    loose = tiny_loop(tiny_env, tiny_cfg(optimizer="sgd", max_grad_norm=2 * max(raw, raw_alpha)))
    loose.run(1, None, progress=False)
    assert not loose.history[0]["grad_clipped"] and torch.equal(loose.prompt.detach(), free.prompt.detach())
    # checkpoints of an unclipped run are not resumed with clipping (nor the other way round)
    experts = open_store(tiny_env["store"]).experts()
    assert _fingerprint(tiny_cfg(), [0], experts) != _fingerprint(tiny_cfg(max_grad_norm=limit), [0], experts)


def test_large_beta_pulls_embeddings_onto_vocabulary_rows(tiny_env):
    """With beta dominating, the learnable vectors converge to rows of E; projecting them and
    re-embedding reproduces them."""
    from nacd.projection import nearest_rows

    cfg = tiny_cfg(beta=100.0, lr_embeddings=5e-3, syn_steps=1, init="gaussian")
    loop = tiny_loop(tiny_env, cfg, prompt_embeds=torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(0))
                     * 0.05)
    table = loop.student.table
    _, before = nearest_rows(loop.prompt.detach().reshape(-1, 32), table)
    loop.run(40, None, progress=False)
    x = loop.prompt.detach().reshape(-1, 32)
    ids, after = nearest_rows(x, table)
    spacing = torch.cdist(table[ids], table).topk(2, largest=False).values[:, 1]  # to the next row
    # Adam keeps hovering within ~lr of the row, several times closer than any other row
    assert bool((after < 0.1 * before).all())
    assert bool((after < 0.2 * spacing).all())
    # re-embedding the projected ids gives exactly those rows, which project to the same ids
    assert float(torch.linalg.vector_norm(table[ids] - x, dim=1).max()) == pytest.approx(float(after.max()))
    assert torch.equal(nearest_rows(table[ids], table)[0], ids)


def test_straight_through_moves_tokens_and_reports_them(tiny_env):
    """Token-initialised vectors: the first iteration is the plain one (the vectors are tokens);
    with a large step the nearest tokens change and the history counts them."""
    from nacd.projection import nearest_rows

    plain = tiny_loop(tiny_env, tiny_cfg(lr_embeddings=0.5))
    plain.run(1, None, progress=False)
    loop = tiny_loop(tiny_env, tiny_cfg(lr_embeddings=0.5, straight_through=True))
    loop.run(1, None, progress=False)
    assert loop.history[0]["l_match"] == plain.history[0]["l_match"]
    assert loop.history[0]["prompt_tokens_changed"] == 0
    loop.run(6, None, progress=False)
    changed = [h["prompt_tokens_changed"] for h in loop.history]
    assert max(changed) > 0
    ids, _ = nearest_rows(loop.prompt.detach().reshape(-1, 32), loop.student.table, exclude_ids=loop.exclude_ids)
    assert int((ids != loop.syn.init_prompt_ids.reshape(-1)).sum()) > 0


def test_to_moves_every_tensor_the_synthetic_set_holds(monkeypatch):
    """A GPU run moves the set with ``to``; a tensor it skipped would stay on the CPU and fail
    there only (CI has no GPU), so every tensor field, optional ones set, must go through ``.to``."""
    from dataclasses import fields

    ids = torch.tensor([[5, 6, 7]])
    syn = SyntheticSet(torch.randn(1, 2, 4), ids, torch.tensor([[-100, 6, 7]]), torch.ones_like(ids),
                       torch.tensor(-2.0), instruction_embeds=torch.randn(1, 3, 4),
                       init_prompt_ids=torch.tensor([[1, 2]]))
    tensor_fields = {f.name for f in fields(SyntheticSet) if "Tensor" in str(f.type)}
    assert all(isinstance(getattr(syn, name), torch.Tensor) for name in tensor_fields)
    moved: set[int] = set()
    real_to = torch.Tensor.to

    def spy(tensor, *args, **kwargs):
        moved.add(id(tensor))
        return real_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    out = syn.to("cpu")
    assert {name for name in tensor_fields if id(getattr(syn, name)) not in moved} == set()
    assert torch.equal(out.instruction_embeds, syn.instruction_embeds) and out.meta is syn.meta


def test_match_eval_scores_a_distill_stage_output_on_fixed_draws(tiny_env, tmp_path):
    """bench/match_eval.py on a finished straight-through distillation: the initial tokens at the
    initial and the learnt alpha, the learnt vectors and their projection, each on the same draws."""
    from nacd.distill.gradients import match_value
    from nacd.distill.run import source_student
    from nacd.projection import nearest_rows

    match_eval = bench_module("match_eval.py", "match_eval_scoring")
    env, cfg = tiny_env, tiny_cfg(iterations=6, lr_embeddings=0.5, straight_through=True)
    distill(cfg, env["dataset"], env["seeds"], env["store"], tmp_path / "synthetic", progress=False)
    student, _, exclude = source_student(cfg)
    rows = match_eval.score_run(cfg, student, exclude, tmp_path, env["store"], "", 0, 1, 7)

    learnt = SyntheticSet.from_pretrained(tmp_path / "synthetic")
    assert [r["set"] for r in rows] == list(match_eval.SETS)
    fixed = match_eval.draws(2, range(2), learnt.num_samples, 2, 2, 1, 7)  # 2 experts x starts 0, 1
    assert all([(d["expert"], d["start"]) for d in r["draws"]] == [(e, t) for e, t, _ in fixed] for r in rows)
    assert rows[0]["alpha"] == pytest.approx(0.5) and rows[0]["alpha"] != pytest.approx(rows[1]["alpha"])
    assert all(r["alpha"] == pytest.approx(float(learnt.log_alpha.exp())) for r in rows[1:])
    # the projection is the text the stage writes: its tokens, recomputed here, at the learnt alpha
    ids, _ = nearest_rows(learnt.prompt_embeds.reshape(-1, learnt.hidden_size), student.table, exclude_ids=exclude)
    changed = int((ids != learnt.init_prompt_ids.reshape(-1)).sum())
    assert changed > 0 and rows[3]["tokens_changed"] == changed
    experts = open_store(env["store"]).experts()
    text = learnt.with_learnable_vectors(student.table[ids])
    e, t, schedule = fixed[-1]
    expected = match_value(student, experts[e].read(t), experts[e].read(t + 2), text, schedule)
    assert rows[3]["draws"][-1]["l_match"] == pytest.approx(expected, rel=1e-6)
    assert rows[3]["l_match_mean"] != pytest.approx(rows[1]["l_match_mean"])  # other tokens, other loss
    # the paired counts compare each draw with the same draw of the initial sets
    for r in rows:
        assert r["better_than_initial"] == sum(
            x["l_match"] < i["l_match"] for x, i in zip(r["draws"], rows[0]["draws"]))
        assert r["better_than_initial_alpha"] == sum(
            x["l_match"] < i["l_match"] for x, i in zip(r["draws"], rows[1]["draws"]))
    assert rows[0]["better_than_initial"] == 0 and rows[1]["better_than_initial_alpha"] == 0


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_written(tiny_env, tmp_path):
    env = tiny_env
    out = tmp_path / "out"

    def refused(cfg, seeds=env["seeds"], store=env["store"], match=""):
        with pytest.raises((DistillError, ValueError), match=match):
            distill(cfg, env["dataset"], seeds, store, out, progress=False)
        assert not out.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "seeds.json").write_text(json.dumps({"indices": []}))
    refused(tiny_cfg(), seeds=empty, match="empty")
    refused(tiny_cfg(max_start=3), match=r"has 4 checkpoints .* need checkpoint 4")
    with pytest.raises(ConfigError, match=r"'distill': min_start=2 leaves no start checkpoint below max_start=2"):
        tiny_cfg(min_start=2)  # refused by the config, before any stage
    refused(tiny_cfg(), store=str(tmp_path / "no-store"), match="no committed expert")
    # experts of another parameter space (LoRA r=4) and of another model
    other = str(tmp_path / "other")
    write_experts("tiny-llama", ParamSpaceConfig(lora_r=4), env["rows"], other, checkpoints=4)
    refused(tiny_cfg(), store=other, match="shape")
    renamed = str(tmp_path / "renamed")
    write_experts("tiny-llama", ParamSpaceConfig(), env["rows"], renamed, checkpoints=4, source_name="gemma3-270m")
    refused(tiny_cfg(), store=renamed, match="trained on model 'gemma3-270m'")
    # P = 0 and M <= 0 never get past the config; the library refuses them too
    with pytest.raises(ConfigError, match="distill.prompt_len"):
        load_config(overrides=["distill.prompt_len=0"])
    with pytest.raises(ConfigError, match="distill.expert_epochs"):
        load_config(overrides=["distill.expert_epochs=0"])
    with pytest.raises(SyntheticSetError, match="prompt_len must be > 0"):
        SyntheticSet.init(torch.zeros(10, 4), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                          torch.ones(1, 3, dtype=torch.long), prompt_len=0)
    # a synthetic set of another hidden size
    with pytest.raises(DistillError, match="hidden size 16 .* has 32"):
        tiny_loop(env, tiny_cfg(), prompt_embeds=torch.zeros(4, 3, 16))


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_short_distillation_on_smollm2_lowers_l_match(tmp_path, shared_data):
    """Real SmolLM2-135M-Instruct, real ARC-Easy seeds, real SGD experts: L_match goes down.

    K = batch_syn and one expert with max_start = 1 make every iteration see the same (start,
    target, samples), so the recorded L_match values are comparable across iterations."""
    name = "smollm2-135m-instruct"
    tok = load_tokenizer(name)
    rows = arc_rows(shared_data, 3, 20, tok)
    dataset_dir, seeds_dir = write_dataset(rows, tmp_path, [0, 1])
    store = str(tmp_path / "store")
    write_experts(name, ParamSpaceConfig(), rows, store, checkpoints=2, steps_per_checkpoint=2, lr=0.05)
    cfg = load_config(overrides=[f"source.name={name}", "distill.prompt_len=2", "distill.syn_steps=1",
                                 "distill.expert_epochs=1", "distill.max_start=1", "distill.batch_syn=2",
                                 "distill.iterations=3", "distill.lr_embeddings=1e-3", "distill.lr_alpha=0.5",
                                 "distill.init_alpha=0.01", "distill.beta=0.01"])
    summary = distill(cfg, dataset_dir, seeds_dir, store, tmp_path / "syn", progress=False)
    history = SyntheticSet.from_pretrained(tmp_path / "syn").meta["history"]
    assert all(math.isfinite(h["l_match"]) for h in history)
    assert history[-1]["l_match"] < 0.9 * history[0]["l_match"], [h["l_match"] for h in history]
    assert summary["l_match_last"] == history[-1]["l_match"]
