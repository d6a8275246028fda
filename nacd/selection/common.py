"""Shared pieces of the selection stages: reading the tokenised pool, the budget, seeded subsets,
and variant rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nacd.config import ConfigError, budget_count

VARIANT_FIELDS = ("prompt", "response", "id")


class SelectionError(ValueError):
    """Bad input to a selection stage, worded for the user (names the file or field)."""


def load_pool(dataset_dir: str | Path):
    """The tokenised dataset of ``prepare_data`` (``<dataset_dir>/hf``)."""
    import datasets

    hf_dir = Path(dataset_dir) / "hf"
    if not hf_dir.is_dir():
        raise SelectionError(f"{hf_dir}: no tokenised dataset here (prepare_data writes "
                             f"<dataset_dir>/hf with datasets.save_to_disk)")
    pool = datasets.load_from_disk(str(hf_dir))
    missing = [c for c in VARIANT_FIELDS if c not in pool.column_names]
    if missing:
        raise SelectionError(f"{hf_dir}: column(s) {missing} missing; "
                             f"the dataset has {pool.column_names}")
    return pool


def budget_for(budget: float, pool_size: int, where: str) -> int:
    """``budget_count`` with the dataset named in the message."""
    try:
        return budget_count(budget, pool_size)
    except ConfigError as e:
        raise ConfigError(f"{e} ({where})") from None


def random_subset(pool_size: int, k: int, seed: int) -> list[int]:
    """k distinct pool indices, a function of (pool_size, k, seed) only, sorted ascending.

    Sorted, so the variant keeps the pool's order and two runs compare row by row."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(pool_size, size=k, replace=False))


def variant_rows(pool, indices: list[int], extra: dict[str, list] | None = None) -> list[dict]:
    """Rows of the variant dataset: prompt, response, text = prompt + response, id, source."""
    sub = pool.select(indices)
    cols = {c: list(sub[c]) for c in VARIANT_FIELDS}
    sources = list(sub["source"]) if "source" in sub.column_names else [None] * len(indices)
    rows = []
    for j, index in enumerate(indices):
        row = {"prompt": cols["prompt"][j], "response": cols["response"][j],
               "text": cols["prompt"][j] + cols["response"][j], "id": cols["id"][j],
               "source": sources[j], "pool_index": int(index)}
        for name, values in (extra or {}).items():
            row[name] = values[j]
        rows.append(row)
    return rows

