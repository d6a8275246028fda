"""Prompt/response -> ``input_ids``/``labels``/``attention_mask`` with the prompt masked to -100.

Shared by ``prepare_data`` (source tokenizer) and target fine-tuning (each target's own tokenizer),
so every model sees its data tokenised the same way.

Token layout: ``tokenizer(prompt)`` with the tokenizer's own special tokens (Gemma's BOS, none for
SmolLM2), then ``tokenizer(response, add_special_tokens=False)``, then EOS, which carries loss so
the model learns to stop. Prompt and response are tokenised separately so the label boundary is
exact; the plain template ends the prompt with a newline, so no token straddles the boundary.

Max-length policy: ``drop`` skips a longer example; ``truncate`` cuts the sequence from the right
to ``max_length`` tokens and still drops it when no response token survives (an example with
nothing to learn). Callers count both outcomes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

IGNORE_INDEX = -100
Overflow = Literal["truncate", "drop"]


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    status: Literal["kept", "truncated", "dropped"]

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)


def ensure_pad_token(tokenizer: Any, where: str = "tokenizer") -> Any:
    """Padding needs a pad id; reuse EOS (padded positions are masked, so the choice is inert)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{where} has neither a pad nor an EOS token: set one before training")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_length: int,
                     overflow: Overflow = "drop") -> Tokenized:
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if len(ids) <= max_length:
        return Tokenized(ids, labels, "kept")
    if overflow == "drop" or len(prompt_ids) >= max_length:
        return Tokenized([], [], "dropped")
    return Tokenized(ids[:max_length], labels[:max_length], "truncated")


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of tokenised rows; padded labels are -100."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(seq: list[int], value: int) -> list[int]:
        return list(seq) + [value] * (width - len(seq))

    return {
        "input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
    }
