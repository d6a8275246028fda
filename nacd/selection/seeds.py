"""Stage select_seeds: the K = budget real samples the synthetic set is built on."""
from __future__ import annotations

from pathlib import Path

from nacd import storage
from nacd.config import RunConfig
from nacd.selection.common import budget_for, load_pool, random_subset

SEEDS_FILE = "seeds.json"


def select_seeds(cfg: RunConfig, dataset_dir: str | Path, out_dir: str | Path) -> dict:
    """Write ``<out_dir>/seeds.json`` ``{"indices", "ids", "method", "seed", "budget", "pool_size"}``.

    ``indices`` are rows of the tokenised dataset, ascending. With the same seed as
    ``selection.seed`` they are exactly the random baseline's rows, so distilled vs random
    compares the same real samples with and without distillation."""
    pool = load_pool(dataset_dir)
    k = budget_for(cfg.budget, len(pool), f"{dataset_dir}")
    sel = cfg.seed_selection
    if sel.method != "random":  # the schema admits only "random" today; guard future values
        raise ValueError(f"seed_selection.method: unknown method {sel.method!r}")
    indices = random_subset(len(pool), k, sel.seed)
    ids = list(pool.select(indices)["id"])
    result = {"indices": indices, "ids": ids, "method": sel.method, "seed": sel.seed,
              "budget": k, "pool_size": len(pool)}
    storage.write_json(str(Path(out_dir) / SEEDS_FILE), result)
    return {"budget": k, "pool_size": len(pool), "method": sel.method, "seed": sel.seed}


def read_seeds(seeds_dir: str | Path) -> dict:
    """The seeds.json of ``select_seeds``, checked for the fields ``distill`` relies on."""
    import json

    path = Path(seeds_dir) / SEEDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no seeds here (run select_seeds first)")
    data = json.loads(path.read_text())
    for key in ("indices", "method", "seed", "budget"):
        if key not in data:
            raise ValueError(f"{path}: field '{key}' missing")
    if len(data["indices"]) != data["budget"]:
        raise ValueError(f"{path}: {len(data['indices'])} indices but budget {data['budget']}")
    return data
