"""Fine-tune a target model on a variant dataset with the fixed recipe (``cfg.evaluation.finetune``).

Every variant trains the same way, so variants differ only in their data: the target's own
tokenizer, ``prompt`` masked and ``response`` + EOS with loss, examples longer than
``max_length`` truncated from the right (dropped when no response token survives), AdamW at a
constant learning rate, ``epochs`` passes in a seeded order, LoRA (default) or full parameters.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, Iterator, Sequence

import torch

from nacd.config import FinetuneConfig
from nacd.data.tokenization import collate, ensure_pad_token, tokenize_example
from nacd.models import make_trainable


def tokenize_variant(rows: Sequence[dict], tokenizer: Any, max_length: int) -> tuple[list[dict], dict]:
    counts = {"kept": 0, "truncated": 0, "dropped": 0}
    out = []
    for row in rows:
        tok = tokenize_example(tokenizer, row["prompt"], row["response"], max_length, "truncate")
        counts[tok.status] += 1
        if tok.status != "dropped":
            out.append({"input_ids": tok.input_ids, "labels": tok.labels})
    if not out:
        raise ValueError(f"fine-tuning: every variant row is longer than max_length={max_length} "
                         f"in its prompt alone; counts {counts}")
    return out, counts


def seeded_batches(n: int, micro_batch: int, seed: int) -> Iterator[list[int]]:
    """Endless micro-batches of indices into ``n`` examples: each epoch in a fresh seeded order,
    a batch that crosses an epoch boundary takes the next epoch's first indices."""
    rng, order = random.Random(seed), []
    while True:
        if len(order) < micro_batch:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order.extend(epoch)
        yield order[:micro_batch]
        del order[:micro_batch]


def finetune(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], cfg: FinetuneConfig) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` (made trainable here) on ``rows``; returns the model and a JSON-able summary."""
    start = time.time()
    ensure_pad_token(tokenizer)
    data, counts = tokenize_variant(rows, tokenizer, cfg.max_length)
    torch.manual_seed(cfg.seed)
    model = make_trainable(model, cfg.param_space, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device  # batches are collated on the CPU
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_step = cfg.micro_batch * cfg.grad_accum
    steps = max(1, math.ceil(cfg.epochs * len(data) / per_step))
    batches = seeded_batches(len(data), cfg.micro_batch, cfg.seed)
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = collate([data[i] for i in next(batches)], tokenizer.pad_token_id)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        losses.append(step_loss)
    model.eval()
    summary = {"steps": steps, "examples": len(data), "counts": counts, "loss_first": losses[0],
               "loss_last": losses[-1], "trainable_params": sum(p.numel() for p in params),
               "train_s": round(time.time() - start, 2), **cfg.model_dump(mode="json")}
    return model, summary


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model for scoring: LoRA weights folded into the base (exact in float32)."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model
