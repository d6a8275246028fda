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


# --------------------------------------------------------------------------- the stage
class ProjectionError(ValueError):
    pass


def _seed_texts(syn, k: int, tokenizer) -> tuple[str, str, str]:
    """(seed id, instruction text, response text): carried in the synthetic set's metadata
    (``meta["seeds"]``, written by ``distill`` from the tokenised dataset's ``prompt`` /
    ``response`` columns), else decoded from the seed's ids and labels."""
    seeds = syn.meta.get("seeds") or []
    if k < len(seeds) and seeds[k].get("prompt") is not None and seeds[k].get("response") is not None:
        return str(seeds[k]["id"]), seeds[k]["prompt"], seeds[k]["response"]
    mask = syn.seed_attention_mask[k] != 0
    ids, labels = syn.seed_input_ids[k][mask], syn.seed_labels[k][mask]
    return (str(seeds[k]["id"]) if k < len(seeds) else str(k), tokenizer.decode(ids[labels == -100].tolist()),
            tokenizer.decode(ids[labels != -100].tolist()))


def project_ids(cfg, synthetic_dir: str | Path, out_dir: str | Path) -> dict:
    """The project_ids stage: the synthetic set as a plain-text variant dataset (``distilled``).

    Row k: ``projected_prompt`` = decode(nearest ids of its P vectors), ``prompt`` =
    projected_prompt + the seed's instruction text (with ``learnable_instruction``: the decoded
    projection of the instruction vectors), ``response`` = the seed's response text,
    ``text`` = prompt + response. The pieces are concatenated without a separator, as the student
    saw them. Decoding then re-tokenising need not give back the same ids (tokenizers merge
    across the boundary); the ids are kept in ``projected_ids``."""
    from nacd.data.variants import META_FILE, check_replaceable, write_variant
    from nacd.distill.synthetic import SyntheticSet
    from nacd.models import input_embedding_matrix, load_model, load_tokenizer

    check_replaceable(out_dir, META_FILE)  # before the nearest-neighbour search, not after
    t0 = time.perf_counter()
    syn = SyntheticSet.from_pretrained(synthetic_dir)
    source = syn.meta.get("source_model") or {}
    name, revision = source.get("name") or cfg.source.name, source.get("revision") or cfg.source.revision
    if name != cfg.source.name:
        raise ProjectionError(f"{synthetic_dir}: the synthetic set was distilled on '{name}', "
                              f"the config's source model is '{cfg.source.name}'")
    distance = syn.meta.get("distance", cfg.distill.distance)
    exclude_special = syn.meta.get("exclude_special_tokens", cfg.distill.exclude_special_tokens)
    # on the CPU, where the learnt vectors are read to: one nearest-row search needs no GPU
    table = input_embedding_matrix(load_model(name, revision=revision, device="cpu"))
    syn.check_hidden_size(table.shape[1], f"source model '{name}'")
    tokenizer = load_tokenizer(name, revision)
    special = [i for i in special_token_ids(tokenizer) if i < table.shape[0]]

    vectors = syn.learnable_vectors().to(table.dtype)
    ids, dists = nearest_rows(vectors, table, distance, exclude_ids=special if exclude_special else None)
    unrestricted, _ = nearest_rows(vectors, table, distance)
    special_set = set(special)
    would_be_special = sum(int(i) in special_set for i in unrestricted.tolist())
    projected_special = sum(int(i) in special_set for i in ids.tolist())

    k, p = syn.num_samples, syn.prompt_len
    prompt_ids, prompt_d = ids[: k * p].view(k, p), dists[: k * p].view(k, p)
    instr_ids, instr_d = ids[k * p:], dists[k * p:]
    # How much of the distillation survives projection: vectors whose nearest token is not the
    # token they started from (known for token inits; the instruction starts as the seed's tokens).
    changed = {"prompt": syn.prompt_tokens_changed(prompt_ids), "prompt_total": k * p}
    if syn.instruction_embeds is not None:
        changed["instruction"] = int((instr_ids != syn.seed_input_ids[syn.instruction_mask]).sum())
        changed["instruction_total"] = int(instr_ids.numel())
    rows, offset = [], 0
    for i in range(k):
        seed_id, seed_prompt, response = _seed_texts(syn, i, tokenizer)
        projected = tokenizer.decode(prompt_ids[i].tolist())
        row = {"id": f"distilled-{i:05d}", "seed_id": seed_id, "seed_prompt": seed_prompt,
               "projected_prompt": projected, "projected_ids": prompt_ids[i].tolist(),
               "nn_distances": [float(x) for x in prompt_d[i]], "response": response}
        instruction_text = seed_prompt
        if syn.instruction_embeds is not None:
            n = int(syn.instruction_mask[i].sum())
            inst = instr_ids[offset:offset + n].tolist()
            row["projected_instruction_ids"] = inst
            row["instruction_nn_distances"] = [float(x) for x in instr_d[offset:offset + n]]
            instruction_text = tokenizer.decode(inst)
            offset += n
        row["prompt"] = projected + instruction_text
        row["text"] = row["prompt"] + response
        rows.append(row)
    summary = {"variant": "distilled", "budget": k, "source_model": {"name": name, "revision": revision},
               "distance": distance, "prompt_len": p, "vectors": int(vectors.shape[0]),
               "learnable_instruction": syn.instruction_embeds is not None,
               "nn_distance_mean": float(dists.mean()), "nn_distance_max": float(dists.max()),
               "tokens_changed_by_distillation": changed,
               "special_tokens": {"excluded_from_search": bool(exclude_special), "special_ids": len(special),
                                  "projected_to_special": projected_special,
                                  "nearest_is_special_without_exclusion": would_be_special},
               "synthetic_dir": str(synthetic_dir), "alpha": float(syn.log_alpha.exp())}
    info = write_variant(rows, out_dir, summary)
    return {**info, "seconds": time.perf_counter() - t0}
