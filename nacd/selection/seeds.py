"""Stage select_seeds: the K = budget real samples the synthetic set is built on."""
from __future__ import annotations

from pathlib import Path

from nacd import storage
from nacd.config import RunConfig
from nacd.selection.common import SelectionError, budget_for, load_pool, random_subset

SEEDS_FILE = "seeds.json"


def select_seeds(cfg: RunConfig, dataset_dir: str | Path, out_dir: str | Path,
                 less_dir: str | Path | None = None) -> dict:
    """Write ``<out_dir>/seeds.json`` ``{"indices", "ids", "method", "seed", "budget", "pool_size"}``.

    ``indices`` are rows of the tokenised dataset, ascending. ``seed_selection.method``:
    ``random`` draws them with ``seed_selection.seed``; with the same seed as ``selection.seed``
    they are exactly the random baseline's rows, so distilled vs random compares the same real
    samples with and without distillation. ``less`` takes the rows of the LESS variant in
    ``less_dir`` (``select_less`` at the same budget), so distilled vs LESS compares them likewise."""
    pool = load_pool(dataset_dir)
    k = budget_for(cfg.budget, len(pool), f"{dataset_dir}")
    sel = cfg.seed_selection
    if sel.method == "random":
        indices = random_subset(len(pool), k, sel.seed)
    elif less_dir is None:
        raise SelectionError("seed_selection.method is 'less': the seeds are the LESS variant's rows, "
                             "so select_seeds needs the select_less output folder (less_dir)")
    else:
        indices = variant_indices(less_dir, pool, k)
    ids = list(pool.select(indices)["id"])
    result = {"indices": indices, "ids": ids, "method": sel.method, "seed": sel.seed,
              "budget": k, "pool_size": len(pool)}
    storage.write_json(str(Path(out_dir) / SEEDS_FILE), result)
    return {"budget": k, "pool_size": len(pool), "method": sel.method, "seed": sel.seed}


def variant_indices(variant_dir: str | Path, pool, k: int) -> list[int]:
    """The pool rows of a selection variant, ascending, matched by id (a variant made from another
    pool, or at another budget, is an error naming the file and line)."""
    from nacd.data.variants import read_variant

    where = Path(variant_dir) / "data.jsonl"
    rows = read_variant(variant_dir)
    if len(rows) != k:
        raise SelectionError(f"{where}: {len(rows)} rows, but the budget is {k} of {len(pool)}: "
                             f"select_less ran at another budget")
    index_of = {row_id: i for i, row_id in enumerate(pool["id"])}
    indices = []
    for line, row in enumerate(rows, start=1):
        if row["id"] not in index_of:
            raise SelectionError(f"{where}:{line}: id {row['id']!r} is not in the pool: "
                                 f"select_less ran on another dataset")
        indices.append(index_of[row["id"]])
    return sorted(indices)


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
