"""A variant folder written by another tool or damaged by hand: each fault is named by file and
line or field, never a bare Python error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nacd.data.variants import VariantError, read_variant, write_variant

ROWS = [{"id": "a", "prompt": "Q: one\nA:", "response": " 1"},
        {"id": "b", "prompt": "Q: two\nA:", "response": " 2"}]


@pytest.fixture
def variant(tmp_path) -> Path:
    write_variant(ROWS, tmp_path / "v", {"variant": "random"})
    return tmp_path / "v"


def _lines(variant: Path, lines: list[str]) -> None:
    (variant / "data.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_a_written_variant_reads_back(variant):
    assert [(r["id"], r["text"]) for r in read_variant(variant)] == [
        ("a", "Q: one\nA: 1"), ("b", "Q: two\nA: 2")]


@pytest.mark.parametrize("meta, needle", [
    ("{not json", "variant.json: not valid JSON"),
    ("[1, 2]", "variant.json: a JSON object is expected, not list"),
    ('{"variant": "random"}', "variant.json: 'rows' must be a positive integer"),
    ('{"variant": "random", "rows": "2"}', "'rows' must be a positive integer (the row count), got '2'"),
])
def test_a_bad_variant_json_is_named(variant, meta, needle):
    (variant / "variant.json").write_text(meta, encoding="utf-8")
    with pytest.raises(VariantError, match=r"^" + str(variant / "variant.json").replace(".", r"\.")) as err:
        read_variant(variant)
    assert needle in str(err.value)


@pytest.mark.parametrize("second_line, needle", [
    ("5", ":2: a row is a JSON object, not int"),
    ('{"id": "b", "prompt": 7, "response": " 2"}', ":2: 'prompt' is int, not text"),
    ('{"id": "b", "prompt": "Q", "response": null}', ":2: 'response' is NoneType, not text"),
    ('{"id": ["b"], "prompt": "Q", "response": " 2"}', ":2: 'id' is list"),
    ('{"id": "b", "prompt": "Q"}', ":2 lacks field(s) ['response']"),
    ('{"id": "a", "prompt": "Q", "response": " 2"}', ":2: duplicate id 'a'"),
    ('{"id": "b", "prompt": "Q", "response": " 2", "text": "other"}', ":2 (b): 'text' is not prompt + response"),
    ('{"id": "b", ', ":2: not valid JSON"),
])
def test_a_bad_row_is_named_by_file_and_line(variant, second_line, needle):
    _lines(variant, [json.dumps(ROWS[0]), second_line])
    with pytest.raises(VariantError) as err:
        read_variant(variant)
    assert str(err.value).startswith(str(variant / "data.jsonl")), err.value
    assert needle in str(err.value)


def test_row_count_and_encoding_are_checked(variant):
    _lines(variant, [json.dumps(ROWS[0])])
    with pytest.raises(VariantError, match="1 rows, but variant.json says 2"):
        read_variant(variant)
    (variant / "data.jsonl").write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(VariantError, match="data.jsonl: line 2 is not UTF-8"):
        read_variant(variant)
    (variant / "data.jsonl").unlink()
    with pytest.raises(VariantError, match="data.jsonl: missing"):
        read_variant(variant)
