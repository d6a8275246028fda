"""Where raw records come from: local files, folders laid out like ``shared/data``, ``s3://`` URIs
and hub ids.

Every reader returns plain ``dict`` records, as :class:`Records` that also know each record's
file and line, and every failure is a :class:`DataSourceError` that names the file (and line, for
line-oriented formats), so a bad row is found in seconds. Files are read as UTF-8.

Built-in datasets (``arc_easy``, ``mmlu``, ``lima``, ``dolly_open_qa``, ``flan_v2_cot``) are read
from ``data_dir`` when one is given (the layout of ``shared/data``, see :data:`BUILTINS`) and from
their hub id through ``datasets.load_dataset`` otherwise.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# FLAN CoT rationales and MMLU law questions exceed csv's default 128 KiB field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Record = dict[str, Any]
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class DataSourceError(ValueError):
    """A dataset cannot be found or read; the message names the file, line or field."""


class Records(list):
    """Records read from files, with ``where[i]``: the place record ``i`` came from, 1-based, as
    errors name it: ``<file>:<line>`` for JSONL and CSV/TSV (the line the record starts on),
    ``<file> item <n>`` for JSON, ``<file> row <n>`` for Parquet. Records from the hub are plain
    lists (see :func:`row_where`)."""

    def __init__(self, rows: Iterable[Record] = (), where: Iterable[str] = ()) -> None:
        super().__init__(rows)
        self.where = list(where)
        if len(self.where) != len(self):
            raise ValueError(f"{len(self)} records but {len(self.where)} places")

    @classmethod
    def concat(cls, parts: Iterable[Records]) -> Records:
        parts = list(parts)
        return cls([r for p in parts for r in p], [w for p in parts for w in p.where])


def row_where(rows: Sequence[Record], i: int, source: str) -> str:
    """Where row ``i`` came from, for errors: its file and line when a reader recorded them, else
    ``<source> row <i+1>``."""
    if isinstance(rows, Records):
        return rows.where[i]
    return f"{source} row {i + 1}"


def text_field(row: Record, key: str, where: str, *, required: bool = True, allow_blank: bool = False) -> str:
    """``row[key]`` as text. Text fields are strings, or numbers (a numeric answer column read by
    pandas or Parquet is one): ``str()`` of a list or object would put its Python repr into a
    prompt, so those are refused. Missing (or null) is an error when ``required``, else "";
    a blank value is an error when ``required`` and not ``allow_blank``."""
    value = row.get(key)
    if value is None:
        if required:
            raise DataSourceError(f"{where}: field '{key}' is missing")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataSourceError(f"{where}: field '{key}' must be text or a number, got "
                              f"{type(value).__name__} {value!r:.60}")
    if required and not allow_blank and not value.strip():
        raise DataSourceError(f"{where}: field '{key}' is empty")
    return value


# --------------------------------------------------------------------------- files
def _read_text(path: Path) -> str:
    """The file as UTF-8 text; other encodings (or binary files) fail naming the line of the first
    undecodable byte, since the reader's own error names neither file nor line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataSourceError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                              f"save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # the byte-order mark Excel and Notepad write


def _read_jsonl(path: Path) -> Records:
    rows, where = [], []
    # "\n" only: str.splitlines() would also split on U+2028 and friends, which JSON strings may hold
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataSourceError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{path}:{lineno}")
    return Records(rows, where)


def _read_json(path: Path) -> Records:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataSourceError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataSourceError(f"{path}: expected a JSON list of objects (or one key holding it)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of objects")
    where = [f"{path} item {i}" for i in range(1, len(data) + 1)]
    for place, row in zip(where, data):
        if not isinstance(row, dict):
            raise DataSourceError(f"{place}: expected a JSON object, got {type(row).__name__}")
    return Records(data, where)


def read_delimited(path: Path, delimiter: str, fieldnames: list[str] | None = None) -> Records:
    """CSV/TSV with a header row, or headerless with ``fieldnames`` (every row must have that many
    fields). Line numbers in errors are the physical line where the bad record starts."""
    rows, where = [], []
    # newline="": quoted fields may hold line breaks, which csv must see untranslated
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    header = fieldnames
    start = 1
    try:
        for fields in reader:
            lineno, start = start, reader.line_num + 1
            if not fields:
                continue
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                raise DataSourceError(f"{path}:{lineno}: expected {len(header)} fields "
                                      f"({', '.join(header)}), found {len(fields)}")
            rows.append(dict(zip(header, fields)))
            where.append(f"{path}:{lineno}")
    except csv.Error as e:
        raise DataSourceError(f"{path}:{reader.line_num}: {e}") from None
    return Records(rows, where)


def _read_parquet(path: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataSourceError(f"{path}: not a readable Parquet file ({e})") from None
    return Records(rows, (f"{path} row {i}" for i in range(1, len(rows) + 1)))


def read_file(path: str | Path) -> Records:
    """Records of one local JSONL / JSON / CSV / TSV (header row) / Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        return read_delimited(path, "," if suffix == ".csv" else "\t")
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataSourceError(f"{path}: unknown file type '{suffix}' (expected one of {', '.join(FILE_SUFFIXES)})")


def read_folder(folder: Path, split: str) -> Records:
    """A user folder: ``<split>.<ext>`` or ``<split>/*.<ext>`` or every data file in it."""
    for suffix in FILE_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return read_file(folder / f"{split}{suffix}")
    sub = folder / split if (folder / split).is_dir() else folder
    files = sorted(p for p in sub.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise DataSourceError(f"{folder}: no {split}.jsonl (or .json/.csv/.tsv/.parquet) and no data files")
    return Records.concat(read_file(p) for p in files)


# --------------------------------------------------------------------------- built-in datasets
MMLU_FIELDS = ["question", "A", "B", "C", "D", "answer"]
FLAN_COT_FIELDS = ["question", "answer", "rationale"]
FLAN_COT_TASKS = ["aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa"]
MMLU_SPLIT_DIRS = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Builtin:
    """A named dataset: its local layout under ``data_dir`` and its hub id."""

    name: str
    splits: tuple[str, ...]
    expected: Callable[[Path, str], str]  # describes the local file/folder, for errors
    read_local: Callable[[Path, str], list[Record]]
    hub: Callable[[str], list[Record]]


def _local_file(rel: Callable[[str], str]) -> tuple[Callable, Callable]:
    def expected(root: Path, split: str) -> str:
        return str(root / rel(split))

    def read(root: Path, split: str) -> Records:
        return read_file(root / rel(split))

    return expected, read


def _per_file(folder: Path, suffix: str, fields: list[str], key: str, what: str) -> Records:
    """Headerless files ``<name><suffix>`` in one folder (MMLU subjects, FLAN CoT tasks): every row
    gets ``key`` = the file's ``<name>`` and a stable id ``<name>/<suffix>/<row>``."""
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise DataSourceError(f"{what}: no <{key}>{suffix} files in {folder}")
    parts = []
    for path in files:
        name = path.name[: -len(suffix)]
        rows = read_delimited(path, "\t" if suffix.endswith(".tsv") else ",", fields)
        parts.append(Records(({**row, key: name, "id": f"{name}/{suffix.strip('_').split('.')[0]}/{i}"}
                              for i, row in enumerate(rows)), rows.where))
    return Records.concat(parts)


def _mmlu_local(root: Path, split: str) -> Records:
    d = MMLU_SPLIT_DIRS[split]
    return _per_file(root / "mmlu" / d, f"_{d}.csv", MMLU_FIELDS, "subject", f"MMLU {split}")


def _flan_local(root: Path, split: str) -> Records:
    return _per_file(root / "flan_v2_cot", f"_{split}.tsv", FLAN_COT_FIELDS, "task", f"FLAN CoT {split}")


def _hub(repo: str, config: str | None = None, *, split_map: dict[str, str] | None = None,
         keep: Callable[[Record], bool] | None = None) -> Callable[[str], list[Record]]:
    def load(split: str) -> list[Record]:
        import datasets

        ds = datasets.load_dataset(repo, config, split=(split_map or {}).get(split, split))
        rows = ds.to_list()
        return [r for r in rows if keep(r)] if keep else rows

    return load


def _mmlu_hub(split: str) -> list[Record]:
    import datasets

    ds = datasets.load_dataset("cais/mmlu", "all", split={"val": "validation"}.get(split, split))
    counters: dict[str, int] = {}
    rows = []
    for r in ds.to_list():
        i = counters[r["subject"]] = counters.get(r["subject"], -1) + 1
        rows.append({"question": r["question"], **dict(zip("ABCD", r["choices"])),
                     "answer": "ABCD"[int(r["answer"])], "subject": r["subject"],
                     "id": f"{r['subject']}/{MMLU_SPLIT_DIRS[split]}/{i}"})
    return rows


_arc_expected, _arc_read = _local_file(lambda s: f"arc_easy/{s}.jsonl")
_lima_expected, _lima_read = _local_file(lambda s: f"lima/{s}.jsonl")
_dolly_expected, _dolly_read = _local_file(lambda s: f"dolly_open_qa/{s}.jsonl")

BUILTINS: dict[str, Builtin] = {
    "arc_easy": Builtin("arc_easy", ("train", "validation", "test"), _arc_expected, _arc_read,
                        _hub("allenai/ai2_arc", "ARC-Easy")),
    "mmlu": Builtin("mmlu", ("dev", "val", "validation", "test"),
                    lambda root, s: f"{root / 'mmlu' / MMLU_SPLIT_DIRS[s]}/<subject>_{MMLU_SPLIT_DIRS[s]}.csv",
                    _mmlu_local, _mmlu_hub),
    "lima": Builtin("lima", ("train", "test"), _lima_expected, _lima_read, _hub("GAIR/lima")),
    "dolly_open_qa": Builtin("dolly_open_qa", ("train",), _dolly_expected, _dolly_read,
                             _hub("databricks/databricks-dolly-15k",
                                  keep=lambda r: r.get("category") == "open_qa")),
    # The FLAN CoT source TSVs are not on the hub as such; the Tulu-v2 mixture carries the
    # formatted CoT rows with a "dataset" field.
    "flan_v2_cot": Builtin("flan_v2_cot", ("train",),
                           lambda root, s: f"{root / 'flan_v2_cot'}/<task>_{s}.tsv", _flan_local,
                           _hub("allenai/tulu-v2-sft-mixture",
                                keep=lambda r: str(r.get("dataset", "")).startswith("cot"))),
}


def _check_split(builtin: Builtin, split: str) -> None:
    if split not in builtin.splits:
        raise DataSourceError(f"dataset '{builtin.name}' has no split '{split}' "
                              f"(known: {', '.join(builtin.splits)})")


def load_builtin(name: str, split: str, data_dir: str | Path | None) -> list[Record]:
    """Raw records of a built-in dataset from ``data_dir`` (local layout) or the hub."""
    builtin = BUILTINS[name]
    _check_split(builtin, split)
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataSourceError(f"data_dir not found: {root}")
        # The readers' own errors name the exact missing file (or folder, for per-subject sets).
        return builtin.read_local(root, split)
    try:
        return builtin.hub(split)
    except Exception as e:  # offline hub, missing dataset, network: all mean "no source"
        raise DataSourceError(
            f"{name} {split}: no data_dir given and the hub failed ({type(e).__name__}: {e}). "
            f"Pass data_dir pointing at a folder holding {builtin.expected(Path('<data_dir>'), split)}"
        ) from None


# --------------------------------------------------------------------------- s3 and hub ids
def _download_s3(uri: str, dest: Path) -> Path:
    """A file or a prefix from S3 into ``dest``; nacd.storage handles endpoints and credentials."""
    from nacd import storage  # lazy: plain local use never needs boto3

    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        target = dest / name
        target.write_bytes(storage.read_bytes(uri))
        return target
    storage.download_prefix(uri, dest)
    return dest


def _read_s3(uri: str, split: str) -> Records:
    """An S3 file or folder, read from a temp copy; errors and row places name the URI, not the
    temp path, which is gone by the time anyone reads the message."""
    with tempfile.TemporaryDirectory(prefix="nacd-s3-") as tmp:
        local = _download_s3(uri, Path(tmp))
        try:
            rows = read_file(local) if local.is_file() else read_folder(local, split)
        except DataSourceError as e:
            raise DataSourceError(str(e).replace(str(local), uri.rstrip("/"))) from None
    return Records(rows, (w.replace(str(local), uri.rstrip("/"), 1) for w in rows.where))


def load_records(name: str, split: str = "train", data_dir: str | Path | None = None) -> list[Record]:
    """Raw records of a source: a built-in name, a local file or folder, an ``s3://`` URI or a hub id.
    Records from files are :class:`Records`, which know each record's file and line."""
    if name in BUILTINS:
        return load_builtin(name, split, data_dir)
    if name.startswith("s3://"):
        return _read_s3(name, split)
    path = Path(name)
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        return read_folder(path, split)
    if path.suffix.lower() in FILE_SUFFIXES or name.startswith(("/", "./", "../", "~")):
        raise DataSourceError(f"data file or folder not found: {name}")
    try:
        import datasets

        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:
        raise DataSourceError(f"'{name}' is not a built-in dataset ({', '.join(BUILTINS)}), "
                              f"a local file/folder or a reachable hub dataset ({type(e).__name__}: {e})") from None
