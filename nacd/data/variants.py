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
from typing import Any, Callable, Iterator, Mapping, Sequence

from nacd.atomic import set_aside_name, temp_dir_beside

REQUIRED_FIELDS = ("id", "prompt", "response")
META_FILE = "variant.json"


class VariantError(ValueError):
    pass


class OutputError(ValueError):
    """An output path that a stage must not replace."""


def check_replaceable(out_dir: str | Path, marker: str) -> None:
    """Refuse an ``out_dir`` that is a file, or a folder that is neither empty nor an earlier
    output of the same stage (which holds ``marker``, the file the stage writes last): replacing
    a stage's output removes the folder, and a mistyped ``--out`` must not remove a user's files."""
    final = Path(out_dir)
    if final.is_symlink():  # the rename would replace the link, not the folder it points to
        raise OutputError(f"{final}: is a symbolic link; give the folder's own path or another one")
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; choose another output path")
    if final.is_dir() and not (final / marker).is_file() and any(final.iterdir()):
        raise OutputError(f"{final}: a folder with other content ({marker} missing, so not an "
                          f"earlier output of this step); choose another output path or empty it")


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, marker: str) -> Iterator[Path]:
    """Yield a temp sibling of ``out_dir`` to fill, ``marker`` (the stage's completion file)
    last; on success it replaces ``out_dir`` in one rename, on error it is removed, so readers
    never see a half-written folder. See :func:`check_replaceable` for what may be replaced."""
    final = Path(out_dir)
    check_replaceable(final, marker)
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"{final}: the stage wrote no {marker}; nothing was replaced")
        if final.exists():  # re-running a stage replaces its previous output
            check_replaceable(final, marker)  # it may have changed while the stage ran
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


def read_json_object(path: Path, error: type[Exception], what: str, hint: str = "") -> dict:
    """A stage's JSON record (``what`` names it when missing), as a dict; any fault is ``error``
    naming ``path``, with ``hint`` (what to do) appended."""
    if not path.is_file():
        raise error(f"{path.parent}: not {what} ({path.name} missing)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}){hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a JSON object is expected, not {type(data).__name__}{hint}")
    return data


def _check_rows(rows: Sequence[Any], where: Callable[[int], str] = lambda i: f"variant row {i}") -> list[dict]:
    """Rows as a variant holds them; ``where(i)`` names row i in errors (a file line, when read)."""
    if not rows:
        raise VariantError("a variant needs at least one row")
    out, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise VariantError(f"{where(i)}: a row is a JSON object, not {type(row).__name__}")
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise VariantError(f"{where(i)} lacks field(s) {missing} (has {sorted(row)})")
        for key in ("prompt", "response", "text"):
            if key in row and not isinstance(row[key], str):
                raise VariantError(f"{where(i)}: '{key}' is {type(row[key]).__name__}, not text")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise VariantError(f"{where(i)}: 'id' is {type(row['id']).__name__}, not a string or integer")
        row = dict(row)
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise VariantError(f"{where(i)}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        expected = row["prompt"] + row["response"]
        if row.setdefault("text", expected) != expected:
            raise VariantError(f"{where(i)} ({row['id']}): 'text' is not prompt + response")
        out.append(row)
    return out


def write_variant(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, meta: Mapping[str, Any]) -> dict:
    """Write a variant folder atomically; ``meta`` must name the ``variant``. Returns variant.json."""
    import datasets

    if "variant" not in meta:
        raise VariantError("variant meta must name the 'variant' (distilled, random, less, full ...)")
    checked = _check_rows(rows)
    info = {**meta, "rows": len(checked)}
    with atomic_dir(out_dir, META_FILE) as tmp:
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as f:
            for row in checked:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        datasets.Dataset.from_list(checked).save_to_disk(str(tmp / "hf"))
        write_json(tmp / META_FILE, info)
    return info


def read_variant_meta(variant_dir: str | Path) -> dict:
    path = Path(variant_dir) / META_FILE
    meta = read_json_object(path, VariantError, "a complete variant dataset")
    rows = meta.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise VariantError(f"{path}: 'rows' must be a positive integer (the row count), got {rows!r}")
    return meta


def read_variant(variant_dir: str | Path) -> list[dict]:
    """Rows of a variant folder (from ``data.jsonl``), checked for the required fields."""
    meta = read_variant_meta(variant_dir)
    rows = []
    path = Path(variant_dir) / "data.jsonl"
    if not path.is_file():
        raise VariantError(f"{path}: missing ({META_FILE} says the folder is complete)")
    with open(path, "rb") as f:  # decoded line by line, so an encoding fault names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise VariantError(f"{path}: line {lineno} is not UTF-8 text ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise VariantError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if len(rows) != meta["rows"]:
        raise VariantError(f"{path}: {len(rows)} rows, but {META_FILE} says {meta['rows']}")
    return _check_rows(rows, lambda i: f"{path}:{i + 1}")


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
