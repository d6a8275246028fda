"""Variant datasets (distilled, random, LESS, full): the text every target model trains on.

A variant folder holds ``data.jsonl`` and the same rows as a ``datasets`` folder ``hf/``, each row
with at least ``id``, ``prompt`` (no loss), ``response`` (loss) and ``text`` (= prompt + response),
plus ``variant.json`` (``{"variant", "rows", "budget", ...}``). ``variant.json`` is written last
inside a temp folder that is renamed into place, so a folder with ``variant.json`` is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from nacd.atomic import set_aside_name, temp_dir_beside

REQUIRED_FIELDS = ("id", "prompt", "response")
META_FILE = "variant.json"


class VariantError(ValueError):
    pass


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp sibling of ``out_dir`` to fill; on success it replaces ``out_dir`` in one
    rename, on error it is removed, so readers never see a half-written folder."""
    final = Path(out_dir)
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        if final.exists():  # re-running a stage replaces its previous output
            old = set_aside_name(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    if not rows:
        raise VariantError("a variant needs at least one row")
    out, seen = [], set()
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise VariantError(f"variant row {i} lacks field(s) {missing} (has {sorted(row)})")
        row = dict(row)
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise VariantError(f"variant row {i}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        expected = row["prompt"] + row["response"]
        if row.setdefault("text", expected) != expected:
            raise VariantError(f"variant row {i} ({row['id']}): 'text' is not prompt + response")
        out.append(row)
    return out


def write_variant(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, meta: Mapping[str, Any]) -> dict:
    """Write a variant folder atomically; ``meta`` must name the ``variant``. Returns variant.json."""
    import datasets

    if "variant" not in meta:
        raise VariantError("variant meta must name the 'variant' (distilled, random, less, full ...)")
    checked = _check_rows(rows)
    info = {**meta, "rows": len(checked)}
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as f:
            for row in checked:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        datasets.Dataset.from_list(checked).save_to_disk(str(tmp / "hf"))
        write_json(tmp / META_FILE, info)
    return info


def read_variant_meta(variant_dir: str | Path) -> dict:
    path = Path(variant_dir) / META_FILE
    if not path.is_file():
        raise VariantError(f"{variant_dir}: not a complete variant dataset ({META_FILE} missing)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_variant(variant_dir: str | Path) -> list[dict]:
    """Rows of a variant folder (from ``data.jsonl``), checked for the required fields."""
    meta = read_variant_meta(variant_dir)
    rows = []
    path = Path(variant_dir) / "data.jsonl"
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise VariantError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if len(rows) != meta["rows"]:
        raise VariantError(f"{path}: {len(rows)} rows, {META_FILE} says {meta['rows']}")
    return _check_rows(rows)


def full_variant(dataset_dir: str | Path, out_dir: str | Path) -> dict:
    """The whole prepared pool as a variant (the "full data" reference)."""
    import datasets

    hf = Path(dataset_dir) / "hf"
    if not hf.is_dir():
        raise VariantError(f"{dataset_dir}: no prepared dataset (hf/ missing); run prepare_data first")
    ds = datasets.load_from_disk(str(hf))
    rows = [{"id": r["id"], "source": r["source"], "prompt": r["prompt"], "response": r["response"]}
            for r in ds.select_columns(["id", "source", "prompt", "response"])]
    return write_variant(rows, out_dir, {"variant": "full", "budget": len(rows), "dataset": str(dataset_dir)})
