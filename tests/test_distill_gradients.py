"""The gradient engines: unroll vs finite differences, reverse == unroll, engine == the shared reference."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import MTT_REFERENCE
from nacd.config import ParamSpaceConfig
from nacd.distill.gradients import (first_order_gradients, match_value, reverse_gradients, total_gradients,
                                    unroll_gradients)
from nacd.distill.losses import Student, neighbour_loss
from nacd.distill.synthetic import SyntheticSet, SyntheticSetError
from nacd.models import ParamSpace, build_tiny_model, make_trainable
from nacd.projection import nearest_rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def setup(name: str, kind: str, dtype: torch.dtype, *, steps: int = 3, vocab: int = 512, k: int = 4,
          length: int = 6, prompt_len: int = 3, instruction: bool = False, alpha: float = 0.05):
    """A tiny model, a start point away from LoRA's B=0 (so every Hessian block is non-zero),
    a nearby target, seeds with one padded sample, and a fixed minibatch schedule."""
    model = build_tiny_model(name, vocab_size=vocab)
    cfg = ParamSpaceConfig(kind=kind)
    model = make_trainable(model, cfg)
    space = ParamSpace.from_model(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(dtype)
    student = Student.from_model(model, space)
    g = torch.Generator().manual_seed(1)
    start = space.get(model) + 0.05 * torch.randn(space.numel, generator=g, dtype=dtype)
    target = start + 0.01 * torch.randn(space.numel, generator=g, dtype=dtype)
    ids = torch.randint(0, vocab, (k, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    mask = torch.ones(k, length, dtype=torch.long)
    mask[0, -1] = 0
    labels[0, -1] = -100
    syn = SyntheticSet.init(student.table, ids, labels, mask, prompt_len=prompt_len, init="gaussian",
                            init_std=0.1, init_alpha=alpha, learnable_instruction=instruction, generator=g)
    schedule = [torch.randperm(k, generator=g)[:2] for _ in range(steps)]
    return student, start, target, syn, schedule


def test_unroll_matches_central_finite_differences_float64():
    student, start, target, syn, schedule = setup("tiny-llama", "lora", torch.float64, steps=2,
                                                  instruction=True)
    out = unroll_gradients(student, start, target, syn, schedule)

    def l_match(s: SyntheticSet) -> float:
        return unroll_gradients(student, start, target, s, schedule).l_match

    eps = 1e-5
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # random prompt coordinates
        i = tuple(int(torch.randint(n, (1,), generator=g)) for n in syn.prompt_embeds.shape)
        plus, minus = (SyntheticSet(**{**syn.__dict__, "prompt_embeds": syn.prompt_embeds.clone()})
                       for _ in range(2))
        plus.prompt_embeds[i] += eps
        minus.prompt_embeds[i] -= eps
        fd = (l_match(plus) - l_match(minus)) / (2 * eps)
        assert fd == pytest.approx(float(out.grad_prompt[i]), rel=1e-6, abs=1e-10)
    # an instruction coordinate (learnable instruction position of sample 1)
    pos = int(syn.instruction_mask[1].nonzero()[0])
    plus, minus = (SyntheticSet(**{**syn.__dict__, "instruction_embeds": syn.instruction_embeds.clone()})
                   for _ in range(2))
    plus.instruction_embeds[1, pos, 0] += eps
    minus.instruction_embeds[1, pos, 0] -= eps
    fd = (l_match(plus) - l_match(minus)) / (2 * eps)
    assert fd == pytest.approx(float(out.grad_instruction[1, pos, 0]), rel=1e-6)
    # log_alpha
    plus, minus = (SyntheticSet(**{**syn.__dict__, "log_alpha": syn.log_alpha + d}) for d in (eps, -eps))
    fd = (l_match(plus) - l_match(minus)) / (2 * eps)
    assert fd == pytest.approx(float(out.grad_log_alpha), rel=1e-6)
    assert float(out.grad_log_alpha) != 0.0


@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-gemma3"])
def test_reverse_equals_unroll_float64(name, kind, steps):
    student, start, target, syn, schedule = setup(name, kind, torch.float64, steps=steps,
                                                  instruction=steps == 3)
    u = unroll_gradients(student, start, target, syn, schedule)
    r = reverse_gradients(student, start, target, syn, schedule)
    assert r.l_match == pytest.approx(u.l_match, rel=1e-12)
    assert rel(r.grad_prompt, u.grad_prompt) < 1e-8
    assert rel(r.grad_log_alpha, u.grad_log_alpha) < 1e-8
    if steps == 3:
        assert rel(r.grad_instruction, u.grad_instruction) < 1e-8
        # only instruction positions are learnable: response and padding get no gradient
        assert float(r.grad_instruction[~syn.instruction_mask].abs().max()) == 0.0
    assert r.exact and u.exact and float(u.grad_prompt.norm()) > 0


@pytest.mark.parametrize("name,kind", [("tiny-opt", "lora"), ("tiny-llama", "lora"), ("tiny-gemma3", "lora"),
                                       ("tiny-llama", "full")])
def test_reverse_equals_unroll_float32(name, kind):
    student, start, target, syn, schedule = setup(name, kind, torch.float32, steps=7)
    u = unroll_gradients(student, start, target, syn, schedule)
    r = reverse_gradients(student, start, target, syn, schedule)
    assert rel(r.grad_prompt, u.grad_prompt) < 1e-4
    assert rel(r.grad_log_alpha, u.grad_log_alpha) < 1e-4


def test_match_value_is_the_loss_the_gradient_engines_report():
    student, start, target, syn, schedule = setup("tiny-llama", "lora", torch.float64, steps=3)
    value = match_value(student, start, target, syn, schedule)
    assert value == pytest.approx(reverse_gradients(student, start, target, syn, schedule).l_match, rel=1e-12)
    # it follows the set: another learning rate ends the student elsewhere
    faster = SyntheticSet(**{**syn.__dict__, "log_alpha": syn.log_alpha + 1.0})
    assert abs(match_value(student, start, target, faster, schedule) - value) > 1e-6 * value


def test_first_order_is_an_approximation_close_to_reverse():
    """first_order drops the H_i terms: exact for N=1, labelled inexact, close but not equal after."""
    errors = {}
    for steps in (1, 3, 7):
        student, start, target, syn, schedule = setup("tiny-llama", "lora", torch.float64, steps=steps,
                                                      alpha=1e-2)
        r = reverse_gradients(student, start, target, syn, schedule)
        f = first_order_gradients(student, start, target, syn, schedule)
        assert not f.exact and f.l_match == r.l_match
        errors[steps] = rel(f.grad_prompt, r.grad_prompt)
    assert errors[1] < 1e-12
    assert 1e-3 < errors[3] < 2e-2 < errors[7] < 0.1  # measured: 5.4e-3 and 2.8e-2


def _load_reference():
    spec = importlib.util.spec_from_file_location("mtt_reference", MTT_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("steps", [1, 4])
def test_engine_gradient_equals_shared_reference(steps):
    """Same model (the reference's own LoRA Llama), same inputs, same minibatch schedule."""
    ref = _load_reference()
    model, names = ref.build_model("tiny", "cpu", torch.float32, lora_r=8)
    k, batch, beta = 8, 4, 0.1
    prompt, seed_ids, labels, start, target, log_lr = ref.synthetic_inputs(
        model, names, k, prompt_len=4, seq_len=12, device="cpu", dtype=torch.float32)
    loss = ref.mtt_step(model, names, start, target, prompt, seed_ids, labels, log_lr, steps, batch, beta,
                        torch.Generator().manual_seed(0))
    loss.backward()

    space = ParamSpace(tuple(names), tuple(tuple(start[n].shape) for n in names))
    student = Student.from_model(model, space)
    syn = SyntheticSet(prompt.detach(), seed_ids, labels, torch.ones_like(seed_ids), log_lr.detach())
    g = torch.Generator().manual_seed(0)
    schedule = [torch.randperm(k, generator=g)[:batch] for _ in range(steps)]
    for mode in ("reverse", "unroll"):
        out = total_gradients(mode, student, space.flatten(start), space.flatten(target), syn, schedule,
                              beta=beta, distance="euclidean", table=model.get_input_embeddings().weight)
        assert out.l_match + beta * out.l_reg == pytest.approx(float(loss), rel=1e-5)
        assert rel(out.grad_prompt, prompt.grad) < 1e-4
        assert rel(out.grad_log_alpha, log_lr.grad) < 1e-4


def test_regulariser_chunked_gradient_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, 8, generator=g, dtype=torch.float64)
    x = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    for distance in ("euclidean", "cosine"):
        (ours,) = torch.autograd.grad(neighbour_loss(x, table, distance, vocab_chunk=37), x)
        if distance == "euclidean":
            brute = torch.cdist(x, table).min(dim=1).values.mean()
        else:
            sim = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(table, dim=1).T
            brute = (1 - sim).min(dim=1).values.mean()
        (expected,) = torch.autograd.grad(brute, x)
        assert rel(ours, expected) < 1e-10


def test_regulariser_is_zero_on_vocabulary_rows():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 16, generator=g, dtype=torch.float64)
    x = table[torch.randint(1000, (25,), generator=g)].clone().requires_grad_(True)
    for distance in ("euclidean", "cosine"):
        reg = neighbour_loss(x, table, distance, vocab_chunk=128)
        assert abs(float(reg)) < 1e-12
        (grad,) = torch.autograd.grad(reg, x)
        assert torch.isfinite(grad).all()
    assert float(neighbour_loss(x + 0.1, table, "euclidean")) > 0.01


def test_straight_through_trains_on_the_nearest_tokens():
    """The student sees the projection of the vectors: L_match and its gradient are those of the
    projected set, applied to the continuous vectors; the regulariser stays at the vectors."""
    student, start, target, syn, schedule = setup("tiny-llama", "lora", torch.float64, instruction=True)
    table = student.table
    ids, _ = nearest_rows(syn.learnable_vectors(), table)
    projected = syn.with_learnable_vectors(table[ids])
    assert torch.equal(projected.learnable_vectors(), table[ids])
    for mode in ("reverse", "unroll"):
        st = total_gradients(mode, student, start, target, syn, schedule, beta=0.0, straight_through=True)
        on_projected = total_gradients(mode, student, start, target, projected, schedule, beta=0.0)
        plain = total_gradients(mode, student, start, target, syn, schedule, beta=0.0)
        assert st.l_match == pytest.approx(on_projected.l_match, rel=1e-12)
        assert rel(st.grad_prompt, on_projected.grad_prompt) < 1e-12
        assert rel(st.grad_instruction, on_projected.grad_instruction) < 1e-12
        assert rel(st.grad_log_alpha, on_projected.grad_log_alpha) < 1e-12
        assert torch.equal(st.nearest_ids, ids)
        # gaussian vectors are far from every token: the two objectives really differ
        assert abs(st.l_match - plain.l_match) > 1e-6 * plain.l_match
        assert st.l_reg == pytest.approx(plain.l_reg) and st.l_reg > 0.01
        assert on_projected.l_reg == pytest.approx(0.0, abs=1e-12)
    # the regulariser's gradient is added at the continuous vectors, not at the tokens
    with_beta = total_gradients("reverse", student, start, target, syn, schedule, beta=0.5, straight_through=True)
    x = syn.prompt_embeds.detach().clone().requires_grad_(True)
    n = syn.num_samples * syn.prompt_len
    reg = torch.linalg.vector_norm(x.reshape(n, -1) - table[ids[:n]], dim=-1).sum() / len(ids)
    (g_reg,) = torch.autograd.grad(0.5 * reg, x)
    st = total_gradients("reverse", student, start, target, syn, schedule, beta=0.0, straight_through=True)
    assert rel(with_beta.grad_prompt - st.grad_prompt, g_reg) < 1e-10


def test_straight_through_equals_plain_on_token_vectors():
    student, start, target, syn, schedule = setup("tiny-llama", "lora", torch.float64)
    ids, _ = nearest_rows(syn.learnable_vectors(), student.table)
    on_tokens = syn.with_learnable_vectors(student.table[ids])
    st = total_gradients("reverse", student, start, target, on_tokens, schedule, beta=0.1, straight_through=True)
    plain = total_gradients("reverse", student, start, target, on_tokens, schedule, beta=0.1)
    assert st.l_match == plain.l_match
    assert torch.equal(st.grad_prompt, plain.grad_prompt)


def test_with_learnable_vectors_checks_the_count():
    _, _, _, syn, _ = setup("tiny-llama", "lora", torch.float64, instruction=True)
    v = syn.learnable_vectors()
    with pytest.raises(SyntheticSetError, match="vectors"):
        syn.with_learnable_vectors(v[:-1])
