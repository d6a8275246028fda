"""ID projection: every learnable vector becomes the id of its nearest input-embedding row.

The distance is the regulariser's (``euclidean``: ||x - E_v||_2; ``cosine``: 1 - cos(x, E_v)),
so the regulariser pulls each vector towards exactly the token it will be projected to.

The search is batched over queries and over the vocabulary: at most ``query_chunk`` x
``vocab_chunk`` distances exist at once, so Gemma 3's 262k x 640 table on a CPU never
materialises a K*P x V matrix. Per chunk the candidate minimum comes from the expanded form
(|x|^2 - 2 x.E + |E|^2, one matmul); the winner's distance is then recomputed directly, so the
reported distance is exact (no cancellation error) and identical to the regulariser's value.

Special / control tokens (``<|im_start|>``, ``<|endoftext|>``, Gemma's ``<unusedNN>`` ...) are
excluded from the search by default (``distill.exclude_special_tokens``): decoding them writes
chat-control markup into a plain-text dataset, and target tokenizers re-tokenise them
differently. The regulariser uses the same exclusion, so training pulls towards the rows the
projection can return. The stage reports how many vectors would have projected to a special
token without the exclusion.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

DISTANCES = ("euclidean", "cosine")
_EPS = 1e-8


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def pairwise_distance(x: torch.Tensor, rows: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between matched pairs x[i], rows[i] (differentiable in x)."""
    _check_distance(distance)
    if distance == "euclidean":
        # vector_norm's backward is 0 at x == row (a subgradient), never NaN.
        return torch.linalg.vector_norm(x - rows, dim=-1)
    return 1.0 - F.cosine_similarity(x, rows, dim=-1, eps=_EPS)


@torch.no_grad()
def nearest_rows(x: torch.Tensor, table: torch.Tensor, distance: str = "euclidean", *,
                 exclude_ids: Sequence[int] | torch.Tensor | None = None,
                 vocab_chunk: int = 16384, query_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x`` (n x d): (index of the nearest row of ``table`` (V x d), its distance).

    ``exclude_ids`` are never returned. Computed in float32 (float64 if either input is
    float64) whatever the storage dtype."""
    _check_distance(distance)
    if x.dim() != 2 or table.dim() != 2 or x.shape[1] != table.shape[1]:
        raise ValueError(f"nearest_rows: x is {list(x.shape)}, table is {list(table.shape)}; "
                         f"both must be 2-D with the same hidden size")
    work = torch.float64 if torch.float64 in (x.dtype, table.dtype) else torch.float32
    vocab = table.shape[0]
    allowed = torch.ones(vocab, dtype=torch.bool, device=table.device)
    if exclude_ids is not None and len(exclude_ids):
        allowed[torch.as_tensor(exclude_ids, dtype=torch.long, device=table.device)] = False
    if not bool(allowed.any()):
        raise ValueError("nearest_rows: every vocabulary row is excluded")
    best_ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for q0 in range(0, x.shape[0], query_chunk):
        q = x[q0:q0 + query_chunk].to(work)
        q_score = (q * q).sum(1, keepdim=True) if distance == "euclidean" else None
        if distance == "cosine":
            q = q / q.norm(dim=1, keepdim=True).clamp_min(_EPS)
        best = torch.full((q.shape[0],), float("inf"), dtype=work, device=x.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=x.device)
        for v0 in range(0, vocab, vocab_chunk):
            e = table[v0:v0 + vocab_chunk].to(work)
            if distance == "euclidean":
                score = q_score - 2.0 * (q @ e.T) + (e * e).sum(1)[None, :]  # squared distance
            else:
                score = 1.0 - q @ (e / e.norm(dim=1, keepdim=True).clamp_min(_EPS)).T
            score = score.masked_fill(~allowed[v0:v0 + vocab_chunk][None, :], float("inf"))
            val, idx = score.min(dim=1)
            better = val < best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + v0, arg)
        best_ids[q0:q0 + query_chunk] = arg
    dist = pairwise_distance(x.to(work), table[best_ids].to(work), distance)
    return best_ids, dist


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer marks special: bos/eos/pad/unk, additional specials, and every added
    token flagged ``special`` (chat-control markers, Gemma's unused slots)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return sorted(i for i in ids if i is not None and i >= 0)
