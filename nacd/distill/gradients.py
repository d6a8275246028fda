"""Gradients of the matching loss w.r.t. the synthetic data and the student learning rate.

The student: theta_0 = expert checkpoint t; for i = 0..N-1
    g_i = grad_theta CE(theta_i; batch_i(X)),   theta_{i+1} = theta_i - alpha * g_i,
alpha = exp(log_alpha); L_match = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2.

Three modes, one function each, all with the same inputs (start/target flat vectors, the
synthetic set, an explicit minibatch schedule: N index tensors) and the same output:

- ``unroll``: plain autograd through all N steps (``create_graph=True``). The reference: memory
  grows linearly with N (every step's graph is alive until the end).
- ``reverse`` (default): exact reverse mode with per-step recomputation. The forward pass keeps
  only theta_0..theta_N. Backward, with the adjoint lambda_N = dL/dtheta_N, for i = N-1..0 it
  rebuilds step i's graph (g_i with ``create_graph``) and takes ONE ``autograd.grad`` of
  <g_i, lambda_{i+1}> w.r.t. (theta_i, X[, instruction]) giving the Hessian-vector product
  H_i lambda_{i+1} and the mixed term; then
      dL/dX       += -alpha * d<g_i, lambda_{i+1}>/dX
      dL/dalpha   += -<g_i, lambda_{i+1}>
      lambda_i     = lambda_{i+1} - alpha * H_i lambda_{i+1}
  and dL/dlog_alpha = alpha * dL/dalpha. Same gradient as ``unroll`` to rounding; one step's
  graph alive at a time, so memory is flat in N (N+1 parameter vectors aside: LoRA-sized).
  Cost: one extra forward+backward per step (the forward pass) on top of unroll's work.
- ``first_order``: APPROXIMATION (TESLA-style, Cui et al. 2023). The parameter path is cut:
  every theta_i is treated as a constant, i.e. lambda_i = lambda_N for all i (the H_i terms are
  dropped). Cheaper per step (no Hessian-vector product w.r.t. theta) but biased. Exact for
  N = 1; measured relative error against ``reverse`` (tiny-llama, LoRA r=8, float64, K=4,
  batch 2, P=3; ``test_first_order_is_an_approximation_close_to_reverse`` checks the range):

      alpha   N   prompt-gradient error   log_alpha-gradient error
      1e-2    3   5.4e-3                  3.0e-3
      1e-2    7   2.8e-2                  1.3e-2
      5e-2    3   4.0e-2                  1.1e-2
      5e-2    7   1.3e-1                  7.7e-2

  It grows with N and alpha (the dropped terms are O(alpha * ||H||) per step). Every result
  from it carries ``exact=False``.

Second-order passes need an attention whose backward is differentiable: load the model with
``attn_implementation="eager"`` (``nacd.models.load_model``'s default); fused SDPA/flash
kernels have no double backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from nacd.distill.losses import Student, match_denominator, match_loss, neighbour_loss
from nacd.distill.synthetic import SyntheticSet
from nacd.projection import nearest_rows

GRAD_MODES = ("reverse", "unroll", "first_order")


@dataclass
class MatchGradients:
    """L_match and its gradients (plus the regulariser's when computed via ``total_gradients``)."""

    l_match: float
    grad_prompt: torch.Tensor  # K x P x d
    grad_instruction: torch.Tensor | None  # K x L x d (non-zero only at instruction positions)
    grad_log_alpha: torch.Tensor  # 0-dim
    exact: bool  # False for the first_order approximation
    l_reg: float = 0.0
    nearest_ids: torch.Tensor | None = None  # each learnable vector's token (set by total_gradients)


class _Inputs:
    """Leaf copies of the learnable tensors and a per-step loss closure."""

    def __init__(self, student: Student, syn: SyntheticSet, requires_grad: bool):
        self.student, self.syn = student, syn
        self.prompt = syn.prompt_embeds.detach().clone().requires_grad_(requires_grad)
        self.instruction = (None if syn.instruction_embeds is None
                            else syn.instruction_embeds.detach().clone().requires_grad_(requires_grad))
        self.instruction_mask = syn.instruction_mask

    def leaves(self) -> list[torch.Tensor]:
        return [self.prompt] + ([self.instruction] if self.instruction is not None else [])

    def loss(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        s = self.syn
        instruction = None if self.instruction is None else self.instruction[idx]
        return self.student.loss(theta, self.prompt[idx], s.seed_input_ids[idx], s.seed_labels[idx],
                                 s.seed_attention_mask[idx], instruction, self.instruction_mask[idx])


def _check(student: Student, start: torch.Tensor, target: torch.Tensor, syn: SyntheticSet,
           schedule: Sequence[torch.Tensor]) -> None:
    if len(schedule) == 0:
        raise ValueError("the minibatch schedule is empty: N (syn_steps) must be > 0")
    if start.shape != (student.space.numel,) or target.shape != start.shape:
        raise ValueError(f"start/target must be flat vectors of {student.space.numel} elements "
                         f"(parameter space), got {list(start.shape)} and {list(target.shape)}")
    syn.check_hidden_size(student.hidden_size)


def _result(l_match: torch.Tensor, grads: Sequence[torch.Tensor | None], leaves: list[torch.Tensor],
            g_log_alpha: torch.Tensor, exact: bool) -> MatchGradients:
    out = [torch.zeros_like(leaf) if g is None else g.detach() for g, leaf in zip(grads, leaves)]
    return MatchGradients(float(l_match.detach()), out[0], out[1] if len(out) > 1 else None,
                          g_log_alpha.detach().reshape(()), exact)


def unroll_gradients(student: Student, start: torch.Tensor, target: torch.Tensor, syn: SyntheticSet,
                     schedule: Sequence[torch.Tensor]) -> MatchGradients:
    """Plain autograd through all N student steps (memory grows with N)."""
    _check(student, start, target, syn, schedule)
    inp = _Inputs(student, syn, requires_grad=True)
    log_alpha = syn.log_alpha.detach().clone().requires_grad_(True)
    alpha = log_alpha.exp()
    theta = start.detach().clone().requires_grad_(True)
    for idx in schedule:
        (g,) = torch.autograd.grad(inp.loss(theta, idx), theta, create_graph=True)
        theta = theta - alpha * g
    loss = ((theta - target) ** 2).sum() / match_denominator(start, target)
    leaves = inp.leaves()
    grads = torch.autograd.grad(loss, leaves + [log_alpha], allow_unused=True)
    return _result(loss, grads[:-1], leaves, grads[-1], exact=True)


def _forward_path(inp: _Inputs, start: torch.Tensor, alpha: torch.Tensor,
                  schedule: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """theta_0..theta_N without keeping any graph."""
    thetas = [start.detach().clone()]
    for idx in schedule:
        theta = thetas[-1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(inp.loss(theta, idx), theta)
        with torch.no_grad():
            thetas.append(thetas[-1] - alpha * g)
    return thetas


def _adjoint_pass(student: Student, start: torch.Tensor, target: torch.Tensor, syn: SyntheticSet,
                  schedule: Sequence[torch.Tensor], carry_hessian: bool) -> MatchGradients:
    inp = _Inputs(student, syn, requires_grad=False)
    alpha = syn.log_alpha.detach().exp()
    thetas = _forward_path(inp, start, alpha, schedule)
    den = match_denominator(start, target)
    with torch.no_grad():
        l_match = ((thetas[-1] - target) ** 2).sum() / den
        lam = 2.0 * (thetas[-1] - target) / den  # lambda_N = dL/dtheta_N
    for leaf in inp.leaves():
        leaf.requires_grad_(True)
    leaves = inp.leaves()
    acc = [torch.zeros_like(leaf) for leaf in leaves]
    d_alpha = torch.zeros((), dtype=lam.dtype, device=lam.device)
    for i in reversed(range(len(schedule))):
        theta = thetas[i].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(inp.loss(theta, schedule[i]), theta, create_graph=True)
        dot = (g * lam).sum()  # <g_i, lambda_{i+1}>
        wrt = ([theta] if carry_hessian else []) + leaves
        parts = torch.autograd.grad(dot, wrt, allow_unused=True)
        with torch.no_grad():
            for a, p in zip(acc, parts[1:] if carry_hessian else parts):
                if p is not None:
                    a.sub_(alpha * p)
            d_alpha -= dot.detach()
            if carry_hessian:
                lam = lam - alpha * parts[0]  # lambda_i = lambda_{i+1} - alpha * H_i lambda_{i+1}
        del g, dot, parts
    return _result(l_match, acc, leaves, alpha * d_alpha, exact=carry_hessian)


def reverse_gradients(student: Student, start: torch.Tensor, target: torch.Tensor, syn: SyntheticSet,
                      schedule: Sequence[torch.Tensor]) -> MatchGradients:
    """Exact gradient by reverse mode with per-step recomputation (memory flat in N)."""
    _check(student, start, target, syn, schedule)
    return _adjoint_pass(student, start, target, syn, schedule, carry_hessian=True)


def first_order_gradients(student: Student, start: torch.Tensor, target: torch.Tensor, syn: SyntheticSet,
                          schedule: Sequence[torch.Tensor]) -> MatchGradients:
    """APPROXIMATION (TESLA-style): the theta path is cut, Hessian terms dropped; ``exact=False``.
    See the module docstring for its measured error against ``reverse``."""
    _check(student, start, target, syn, schedule)
    return _adjoint_pass(student, start, target, syn, schedule, carry_hessian=False)


def match_value(student: Student, start: torch.Tensor, target: torch.Tensor, syn: SyntheticSet,
                schedule: Sequence[torch.Tensor]) -> float:
    """L_match alone, no gradient with respect to the set: to score a set on fixed draws
    (``bench/match_eval.py``). One forward and backward per student step."""
    _check(student, start, target, syn, schedule)
    thetas = _forward_path(_Inputs(student, syn, requires_grad=False), start, syn.log_alpha.detach().exp(),
                           schedule)
    return float(match_loss(thetas[-1], start, target))


MODES: dict[str, Callable[..., MatchGradients]] = {
    "reverse": reverse_gradients, "unroll": unroll_gradients, "first_order": first_order_gradients}


def total_gradients(mode: str, student: Student, start: torch.Tensor, target: torch.Tensor,
                    syn: SyntheticSet, schedule: Sequence[torch.Tensor], *, beta: float = 0.0,
                    distance: str = "euclidean", table: torch.Tensor | None = None,
                    exclude_ids: Sequence[int] | None = None, straight_through: bool = False) -> MatchGradients:
    """Gradients of L = L_match + beta * L_reg, L_reg over every learnable vector.

    ``straight_through`` (PEZ, Wen et al. 2023): the student trains on the nearest token rows of
    the learnable vectors, i.e. on exactly the text the projection will write, and L_match's
    gradient at those rows is applied to the continuous vectors. Vectors then drift until their
    nearest token changes, and every L_match in the history is the projected text's own loss.
    The regulariser is always taken at the continuous vectors. ``table`` defaults to the
    student's input-embedding matrix."""
    if mode not in MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {mode!r}")
    table = student.table if table is None else table
    ids, _ = nearest_rows(syn.learnable_vectors().detach(), table, distance, exclude_ids=exclude_ids)
    forward = syn.with_learnable_vectors(table[ids]) if straight_through else syn
    out = MODES[mode](student, start, target, forward, schedule)
    out.nearest_ids = ids
    leaves = [syn.prompt_embeds.detach().clone().requires_grad_(True)]
    mask = syn.instruction_mask
    if syn.instruction_embeds is not None:
        leaves.append(syn.instruction_embeds.detach().clone().requires_grad_(True))
    vectors = torch.cat([leaves[0].reshape(-1, leaves[0].shape[-1])] +
                        ([leaves[1][mask]] if len(leaves) > 1 else []))
    reg = neighbour_loss(vectors, table, distance, ids=ids)
    out.l_reg = float(reg.detach())
    if beta:
        grads = torch.autograd.grad(beta * reg, leaves)
        out.grad_prompt = out.grad_prompt + grads[0]
        if len(grads) > 1:
            out.grad_instruction = out.grad_instruction + grads[1]
    return out
