"""ARC-Easy and MMLU loaders on the real shared data, and their bad-input errors."""
from __future__ import annotations

import json
import re

import pytest

from nacd.data.benchmarks import load_benchmark, subjects
from nacd.data.formats import mc_to_instruction
from nacd.data.sources import DataSourceError


@pytest.mark.parametrize("name,split,count,n_subjects", [
    ("arc_easy", "train", 2251, 0), ("arc_easy", "validation", 570, 0),
    ("mmlu", "dev", 285, 57), ("mmlu", "val", 1531, 57), ("mmlu", "validation", 1531, 57)])
def test_benchmark_counts(shared_data, name, split, count, n_subjects):
    questions = load_benchmark(name, split, shared_data)
    assert len(questions) == count
    assert len(subjects(questions)) == n_subjects
    assert len({q.id for q in questions}) == count
    assert all(0 <= q.answer < len(q.choices) == len(q.labels) for q in questions)


def test_arc_keeps_numeric_labels_and_odd_choice_counts(shared_data):
    val = load_benchmark("arc_easy", "validation", shared_data)
    assert sum(q.labels[0] == "1" for q in val) == 21  # NYSEDREGENTS items (SOURCES.md)
    assert sorted(len(q.choices) for q in val if len(q.choices) != 4) == [3, 5, 5]
    ex = mc_to_instruction(val[0])
    assert ex.response == val[0].choices[val[0].answer].strip()  # ARC scores the choice's text
    assert all(f"{label}. " in ex.instruction for label in val[0].labels)


def test_mmlu_per_subject_counts(shared_data):
    val = load_benchmark("mmlu", "val", shared_data)
    per = {s: sum(q.subject == s for q in val) for s in subjects(val)}
    assert per["professional_law"] == 170 and per["abstract_algebra"] == 11
    assert mc_to_instruction(val[0]).response == "ABCD"[val[0].answer]  # MMLU scores the letter


def test_bad_benchmark_split_and_folder(shared_data, tmp_path):
    with pytest.raises(DataSourceError, match="unknown benchmark 'hellaswag'"):
        load_benchmark("hellaswag", "validation", shared_data)
    with pytest.raises(DataSourceError, match="has no split 'dev'.*train, validation"):
        load_benchmark("arc_easy", "dev", shared_data)
    with pytest.raises(DataSourceError, match=r"no <subject>_val\.csv files in .*mmlu/val"):
        load_benchmark("mmlu", "val", tmp_path)


def test_bad_arc_answer_key(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "validation.jsonl").write_text(
        '{"id": "q1", "question": "?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "C"}\n')
    with pytest.raises(DataSourceError, match="answerKey 'C' is not one of its labels"):
        load_benchmark("arc_easy", "validation", tmp_path)


def test_users_mc_rows_name_file_line_and_field(tmp_path):
    from nacd.data.formats import to_instructions
    from nacd.data.sources import load_records

    mmlu = tmp_path / "mine.jsonl"
    row = {"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}
    mmlu.write_text(json.dumps(row) + "\n")  # no id: gets <source>/<index>, like other formats
    ex = to_instructions(load_records(str(mmlu)), "mmlu", "mine")[0]
    assert (ex.id, ex.response) == ("mine/0", "B")  # MMLU scores the letter, subject or not
    for drop in ("question", "C"):
        mmlu.write_text(json.dumps(row) + "\n" + json.dumps({k: v for k, v in row.items() if k != drop}) + "\n")
        with pytest.raises(DataSourceError, match=rf"^{re.escape(str(mmlu))}:2: field '{drop}' is missing$"):
            to_instructions(load_records(str(mmlu)), "mmlu", "mine")


@pytest.mark.parametrize("choices,found", [({"label": ["A"], "text": ["x"]}, r"1 choice\(s\) and 1 label\(s\)"),
                                           ({"label": ["A", "B"], "text": ["x"]}, r"1 choice\(s\) and 2 label\(s\)")])
def test_arc_choice_count_errors_are_not_answer_key_errors(tmp_path, choices, found):
    (tmp_path / "arc_easy").mkdir()
    path = tmp_path / "arc_easy" / "validation.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "?", "choices": choices, "answerKey": "A"}) + "\n")
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(path))}:1: question q1: {found}; a question needs at least 2"):
        load_benchmark("arc_easy", "validation", tmp_path)
