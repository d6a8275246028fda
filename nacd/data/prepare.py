"""Stage ``prepare_data``: the configured mixture -> the tokenised dataset every later stage reads.

Output (``out_dir``, written atomically): ``hf/`` (``datasets`` folder with ``input_ids``,
``labels``, ``attention_mask``, ``prompt``, ``response``, ``source``, ``id``) and ``prepare.json``
(``fingerprint``, ``counts`` per source, ``tokenizer``, ``template``, ``config``). Tokenised with
the source model's tokenizer. A second call with the same config finds the complete folder and
returns its summary without redoing the work.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

from nacd.config import DataConfig, DataSourceConfig, RunConfig
from nacd.data.formats import InstructionExample, mix, render_row, to_instructions
from nacd.data.sources import BUILTINS, DataSourceError, load_records
from nacd.data.tokenization import ensure_pad_token, tokenize_example
from nacd.data.variants import atomic_dir, check_replaceable, read_json_object, write_json

PREPARE_FILE = "prepare.json"


def source_label(src: DataSourceConfig) -> str:
    """A short name for a source: the built-in name, else the file/folder/URI's last part."""
    if src.name in BUILTINS:
        return src.name
    return Path(src.name.rstrip("/")).stem or src.name


def load_source(src: DataSourceConfig, data_dir: str | None, seed: int) -> list[InstructionExample]:
    """One source as instruction examples; ``max_rows`` keeps a seeded subsample. A source with no
    rows is an error: in a mixture it would silently drop out (and from ``counts``), and a header-only
    file or an empty split is a mistake, not a request."""
    label = source_label(src)
    examples = to_instructions(load_records(src.name, src.split, data_dir), src.format, label)
    if not examples:
        where = f" in data_dir {data_dir}" if src.name in BUILTINS and data_dir is not None else ""
        raise DataSourceError(f"source '{src.name}' (split '{src.split}'{where}) has no rows")
    if src.max_rows is not None and len(examples) > src.max_rows:
        examples = random.Random(seed).sample(examples, src.max_rows)
    return examples


def load_mixture(cfg: DataConfig) -> list[InstructionExample]:
    """The weighted, seeded mixture of all sources, capped at ``pool_size``, with unique ids."""
    mixture = mix([(load_source(s, cfg.data_dir, cfg.seed), s.weight) for s in cfg.sources], cfg.seed)
    if cfg.pool_size is not None and len(mixture) > cfg.pool_size:
        mixture = random.Random(cfg.seed).sample(mixture, cfg.pool_size)
    seen: dict[str, int] = {}
    out = []
    for ex in mixture:  # repeated rows (weight > 1) and clashing ids across sources get a suffix
        n = seen[ex.id] = seen.get(ex.id, 0) + 1
        out.append(ex if n == 1 else InstructionExample(f"{ex.id}#{n}", ex.source, ex.instruction,
                                                        ex.response, ex.context))
    return out


def _fingerprint(rows: list[dict], tokenizer_name: str, template: str) -> str:
    h = hashlib.sha256(json.dumps({"tokenizer": tokenizer_name, "template": template}).encode())
    for r in rows:
        h.update(json.dumps([r["id"], r["input_ids"], r["labels"]]).encode())
    return h.hexdigest()


def tokenize_rows(examples: list[InstructionExample], tokenizer: Any, cfg: DataConfig) -> tuple[list[dict], dict]:
    """Render and tokenise; returns kept rows and per-source counts kept/truncated/dropped."""
    rows, counts = [], {}
    for ex in examples:
        rendered = render_row(ex, cfg.template, tokenizer)
        tok = tokenize_example(tokenizer, rendered["prompt"], rendered["response"], cfg.max_length, cfg.overflow)
        c = counts.setdefault(ex.source, {"kept": 0, "truncated": 0, "dropped": 0})
        c[tok.status] += 1
        if tok.status != "dropped":
            rows.append({"id": ex.id, "source": ex.source, "prompt": rendered["prompt"],
                         "response": rendered["response"], "input_ids": tok.input_ids,
                         "labels": tok.labels, "attention_mask": tok.attention_mask})
    return rows, counts


def read_prepared(dataset_dir: str | Path) -> dict:
    return read_json_object(Path(dataset_dir) / PREPARE_FILE, DataSourceError, "a prepared dataset",
                            "; run prepare-data again")


def prepared_fingerprint(dataset_dir: str | Path) -> str | None:
    """The fingerprint recorded by prepare_data, or None for a folder it did not write."""
    if not (Path(dataset_dir) / PREPARE_FILE).is_file():
        return None
    return read_prepared(dataset_dir).get("fingerprint") or None


def _reusable(out_dir: Path, config: dict) -> dict | None:
    """The summary of an earlier run with this config in ``out_dir``, else None. A prepare.json that
    cannot be read (a crash or a hand edit) counts as no earlier output: re-running the step is
    how a user repairs it, so it rebuilds the folder instead of failing on it."""
    try:
        done = read_prepared(out_dir)
    except DataSourceError:
        return None
    summary = done.get("summary")
    return summary if done.get("config") == config and isinstance(summary, dict) else None


def prepare_data(cfg: RunConfig, out_dir: str | Path) -> dict:
    """Build the tokenised dataset (see module doc); returns the JSON-able summary."""
    import datasets

    from nacd.models import load_tokenizer

    config = {"data": cfg.data.model_dump(mode="json"), "tokenizer": cfg.source.name,
              "revision": cfg.source.revision}
    out_dir = Path(out_dir)
    if (done := _reusable(out_dir, config)) is not None:
        return {**done, "reused": True}
    check_replaceable(out_dir, PREPARE_FILE)  # before the tokenising, not after
    start = time.time()
    tokenizer = ensure_pad_token(load_tokenizer(cfg.source.name, cfg.source.revision), cfg.source.name)
    rows, counts = tokenize_rows(load_mixture(cfg.data), tokenizer, cfg.data)
    if not rows:
        raise ValueError(f"prepare_data: every example was dropped (max_length={cfg.data.max_length}, "
                         f"overflow={cfg.data.overflow}); counts: {counts}")
    fingerprint = _fingerprint(rows, cfg.source.name, cfg.data.template)
    summary = {"rows": len(rows), "counts": counts, "fingerprint": fingerprint,
               "tokens": sum(len(r["input_ids"]) for r in rows), "wall_s": round(time.time() - start, 2)}
    with atomic_dir(out_dir, PREPARE_FILE) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "hf"))
        write_json(tmp / PREPARE_FILE, {"fingerprint": fingerprint, "counts": counts,
                                         "tokenizer": cfg.source.name, "template": cfg.data.template,
                                         "max_length": cfg.data.max_length, "config": config,
                                         "summary": summary})
    return summary
