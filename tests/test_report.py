"""write_report: tables with the exact numbers, an embedded PNG plot, Markdown, clear errors."""
from __future__ import annotations

import base64
import json
import re

import pytest

from nacd.report import ReportError, format_table, read_scores, write_report


def _row(target, variant, acc, bench="arc_easy", **extra):
    return {"target": target, "variant": variant, "benchmark": bench, "split": "validation",
            "shots": 0, "limit": 8, "n": 8, "acc": acc, "acc_norm": acc / 2, "seed": 0,
            "finetune": {}, "wall_s": 1.0, **extra}


@pytest.fixture
def score_files(tmp_path):
    rows = {
        "a": [_row("tiny-llama", "distilled", 0.625), _row("tiny-llama", "none", 0.25)],
        "b": [_row("tiny-gemma3", "random", 0.375), _row("tiny-gemma3", "mmlu-only", 0.5, "mmlu")],
        "c": [],  # a skipped evaluation writes an empty list
    }
    files = []
    for name, content in rows.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(content))
        files.append(f)
    return files


def test_report_files_and_numbers(score_files, tmp_path):
    out = tmp_path / "report"
    path = write_report(score_files, out)
    assert path == str(out / "report.html")
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    png = (out / "scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(embedded) == png
    assert "0.6250 (0.3125)" in html and "0.3750 (0.1875)" in html
    # Markdown: variants ordered distilled, random, none; a missing cell is '-'
    arc = md.split("## arc_easy")[1].split("##")[0]
    assert "| target | distilled | random | none |" in arc
    assert "| tiny-gemma3 | - | 0.3750 (0.1875) | - |" in arc
    assert "| tiny-llama | 0.6250 (0.3125) | - | 0.2500 (0.1250) |" in arc
    assert "## mmlu" in md
    assert len(json.loads((out / "scores.json").read_text())) == 4


def test_format_table_prints_every_score(score_files):
    table = format_table(read_scores(score_files))
    assert "0.6250" in table and "0.2500" in table and "0.3750" in table and "0.5000" in table


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"target": "x", "variant": "y"}]')
    with pytest.raises(ReportError, match=r"bad.json\[0\].*benchmark, acc"):
        write_report([bad], tmp_path / "out")
    broken = tmp_path / "broken.json"
    broken.write_text("[\n{")
    with pytest.raises(ReportError, match="broken.json: not valid JSON"):
        write_report([broken], tmp_path / "out")
    with pytest.raises(ReportError, match="not found"):
        write_report([tmp_path / "missing.json"], tmp_path / "out")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ReportError, match="no score rows"):
        write_report([empty], tmp_path / "out2")
    assert not (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize("fields, needle", [
    ({"acc": "high"}, "'acc' is not a number: 'high'"),
    ({"acc": None}, "'acc' is null"),
    ({"acc": 0.5, "acc_norm": "x"}, "'acc_norm' is not a number: 'x'"),
    ({"acc": 0.5, "n": 12.5}, "'n' is not an integer: 12.5"),
    ({"acc": 0.5, "limit": True}, "'limit' is not an integer: True"),
    ({"acc": 0.5, "n": float("inf")}, "'n' is not an integer: inf"),
    ({"acc": float("nan")}, "'acc' is not a number: nan"),
])
def test_a_score_that_is_not_a_number_is_named(tmp_path, fields, needle):
    bad = tmp_path / "scores.json"
    bad.write_text(json.dumps([{"target": "t", "variant": "random", "benchmark": "arc_easy", "acc": 0.5},
                               {"target": "t", "variant": "none", "benchmark": "arc_easy", **fields}]))
    with pytest.raises(ReportError, match=r"scores.json\[1\]: ") as err:
        write_report([bad], tmp_path / "out")
    assert needle in str(err.value)
    assert not (tmp_path / "out").exists()
