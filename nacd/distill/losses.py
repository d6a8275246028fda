"""The student's loss, the matching loss and the neighbour regulariser.

The student is functional: its trainable parameters are one flat vector ``theta`` in
``ParamSpace`` layout, unflattened into named views and fed to
``torch.func.functional_call``; the model module itself holds only the frozen weights. This is
what lets the gradient engines differentiate through the student's updates.

Convention (same as ``shared/bench/mtt_reference.py``): input = [P prompt vectors | seed
embeddings], logits[:, P-1:-1] predict seed tokens 0..L-1, cross-entropy with
``ignore_index=-100`` (response tokens only), mean over the non-ignored tokens of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from nacd.models import ParamSpace, embed_scale, input_embedding_matrix
from nacd.projection import nearest_rows, pairwise_distance

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class Student:
    """A frozen model plus the parameter space the student's flat vector lives in."""

    model: nn.Module
    space: ParamSpace
    table: torch.Tensor  # input_embedding_matrix(model): frozen, scaled rows (V x d)
    embed_name: str | None  # the input-embedding weight's name when it is trainable (full space)
    scale: float

    @classmethod
    def from_model(cls, model: nn.Module, space: ParamSpace) -> Student:
        """Puts ``model`` in eval mode: dropout would make the student stochastic, and the
        engines' recomputed steps must reproduce the forward pass exactly."""
        model.eval()
        weight = model.get_input_embeddings().weight
        name = next((n for n, p in model.named_parameters() if p is weight), None)
        return cls(model, space, input_embedding_matrix(model), name if name in space.names else None,
                   embed_scale(model))

    @property
    def hidden_size(self) -> int:
        return self.table.shape[1]

    def seed_embeddings(self, params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """What the model would see for ``ids`` at parameters ``params``: with a trainable
        embedding (full space) the student's current table, else the frozen one."""
        if self.embed_name is None:
            return self.table[ids]
        emb = F.embedding(ids, params[self.embed_name])
        return emb * self.scale if self.scale != 1.0 else emb

    def loss(self, theta: torch.Tensor, prompt: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor, instruction: torch.Tensor | None = None,
             instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss on the response tokens of one minibatch (B x P x d prompts).

        Two exact shortcuts: trailing columns that are padding in every row are dropped (right
        padding never influences a real position under causal attention), and the LM head runs
        only from the first position that predicts a response token (``logits_to_keep``), so a
        long instruction costs no vocabulary-sized logits."""
        width = int(attention_mask.sum(dim=1).max())
        ids, labels, attention_mask = ids[:, :width], labels[:, :width], attention_mask[:, :width]
        if instruction is not None:
            instruction, instruction_mask = instruction[:, :width], instruction_mask[:, :width]
        params = self.space.unflatten(theta)
        seed = self.seed_embeddings(params, ids)
        if instruction is not None:
            seed = torch.where(instruction_mask[..., None], instruction, seed)
        x = torch.cat([prompt, seed], dim=1)
        ones = torch.ones(prompt.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        first = int((labels != -100).int().argmax(dim=1).min())  # first response token in the batch
        keep = x.shape[1] - (prompt.shape[1] - 1 + first)  # positions P-1+first .. end
        with KeepFloat64() if x.dtype == torch.float64 else _nothing():
            logits = functional_call(self.model, params, args=(), kwargs={
                "inputs_embeds": x, "attention_mask": mask, "use_cache": False, "logits_to_keep": keep}).logits
        pred = logits[:, :-1]  # predicts seed tokens first..L-1
        if pred.dtype in _LOW_PRECISION:  # the softmax in float32, as the reference does
            pred = pred.float()
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels[:, first:].reshape(-1), ignore_index=-100)


class KeepFloat64(TorchFunctionMode):
    """Keep a float64 forward in float64.

    transformers computes RMSNorm and the eager softmax "in float32" (``.to(torch.float32)``,
    ``.float()``, ``softmax(dtype=torch.float32)``): an upcast for bf16, but a silent downcast
    for a float64 model, which caps every float64 gradient check at float32 rounding (~1e-7).
    Inside this mode those casts leave float64 tensors in float64. Only float64 tensors are
    touched, so float32/bf16 runs are unaffected (the student only enters the mode in float64)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dtype == torch.float64:
            if func is torch.Tensor.float:
                return first
            if func is torch.Tensor.to:
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def match_loss(theta_n: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2."""
    den = match_denominator(start, target)
    return ((theta_n - target) ** 2).sum() / den


def match_denominator(start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    den = ((start.detach() - target.detach()) ** 2).sum()
    if not bool(den > 0):
        raise ValueError("the expert did not move between the start and target checkpoints "
                         "(||theta*_t - theta*_{t+M}|| = 0): L_match is undefined")
    return den


def neighbour_loss(x: torch.Tensor, table: torch.Tensor, distance: str = "euclidean", *,
                   exclude_ids: Sequence[int] | torch.Tensor | None = None,
                   vocab_chunk: int = 16384, ids: torch.Tensor | None = None) -> torch.Tensor:
    """mean_p min_v dist(x_p, E_v) over the rows of ``x`` (n x d), differentiable in ``x``.

    The argmin is found chunk by chunk without a graph (``nearest_rows``); the distance to the
    winning row is then recomputed with autograd. The gradient of a min is the gradient of the
    active branch, so this is the exact gradient (ties have measure zero) with memory O(n x chunk)."""
    if ids is None:  # callers that already searched (total_gradients) pass the winners
        ids, _ = nearest_rows(x.detach(), table, distance, exclude_ids=exclude_ids, vocab_chunk=vocab_chunk)
    return pairwise_distance(x, table[ids].to(x.dtype), distance).mean()
