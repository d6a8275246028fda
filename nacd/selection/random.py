"""Stage select_random: a seeded random subset of the pool at the run's budget."""
from __future__ import annotations

from pathlib import Path

from nacd.config import RunConfig
from nacd.selection.common import budget_for, load_pool, random_subset, variant_rows


def select_random(cfg: RunConfig, dataset_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the ``random`` variant dataset (data.jsonl, hf/, variant.json) to ``out_dir``."""
    from nacd.data.variants import write_variant

    pool = load_pool(dataset_dir)
    k = budget_for(cfg.budget, len(pool), f"{dataset_dir}")
    seed = cfg.selection.seed
    indices = random_subset(len(pool), k, seed)
    meta = {"variant": "random", "budget": k, "pool_size": len(pool), "seed": seed,
            "method": "uniform without replacement"}
    write_variant(variant_rows(pool, indices), out_dir, meta)
    return {"rows": k, "pool_size": len(pool), "seed": seed}
