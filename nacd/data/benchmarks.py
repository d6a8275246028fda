"""ARC-Easy and MMLU as lists of :class:`MCQuestion`, from a local folder or the hub.

Local layout (``data_dir``, as in ``shared/data``): ``arc_easy/{train,validation}.jsonl`` (the
``allenai/ai2_arc`` schema) and ``mmlu/{dev,val}/<subject>_<split>.csv`` (the original release:
no header, ``question,A,B,C,D,answer``). MMLU's split is called ``val`` on disk; ``validation``
is accepted as an alias.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nacd.data.sources import BUILTINS, DataSourceError, Record, load_builtin

BENCHMARKS = ("arc_easy", "mmlu")
BenchmarkName = Literal["arc_easy", "mmlu"]
# k-shot exemplars come from these splits, as in lm-evaluation-harness.
FEWSHOT_SPLIT = {"arc_easy": "train", "mmlu": "dev"}


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; ``answer`` indexes ``choices`` (and ``labels``)."""

    id: str
    question: str
    choices: list[str] = field(hash=False)
    labels: list[str] = field(hash=False)  # as shown to the model: ["A", "B", ...] (or "1".."4" in ARC)
    answer: int
    subject: str | None = None

    def __post_init__(self) -> None:
        if len(self.choices) != len(self.labels) or len(self.choices) < 2:
            raise ValueError(f"question {self.id}: {len(self.choices)} choices, {len(self.labels)} labels")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"question {self.id}: answer index {self.answer} out of range")


def _arc_question(row: Record, where: str) -> MCQuestion:
    try:
        labels = [str(x) for x in row["choices"]["label"]]
        texts = [str(x) for x in row["choices"]["text"]]
        return MCQuestion(id=str(row["id"]), question=str(row["question"]), choices=texts,
                          labels=labels, answer=labels.index(str(row["answerKey"])))
    except (KeyError, TypeError) as e:
        raise DataSourceError(f"{where}: ARC record {row.get('id', '?')} lacks field {e}") from None
    except ValueError:
        raise DataSourceError(f"{where}: ARC record {row.get('id')}: answerKey {row.get('answerKey')!r} "
                              f"is not one of its labels") from None


def _mmlu_question(row: Record, where: str) -> MCQuestion:
    answer = str(row.get("answer", "")).strip()
    if answer not in ("A", "B", "C", "D"):
        raise DataSourceError(f"{where}: MMLU record {row.get('id')}: answer {answer!r} is not A-D")
    return MCQuestion(id=str(row["id"]), question=str(row["question"]),
                      choices=[str(row[k]) for k in "ABCD"], labels=list("ABCD"),
                      answer="ABCD".index(answer), subject=row.get("subject"))


def scored_continuations(benchmark: str, q: MCQuestion) -> list[str]:
    """What lm-evaluation-harness scores after the prompt, one per choice: ARC-Easy scores the
    choice's text, MMLU its letter. Training data built from these questions answers the same way
    (:func:`nacd.data.formats.mc_to_instruction`), so fine-tuning teaches what is scored."""
    return [f" {c}" for c in q.choices] if benchmark == "arc_easy" else [f" {label}" for label in q.labels]


def to_mc_questions(name: str, rows: list[Record], where: str = "") -> list[MCQuestion]:
    convert = _arc_question if name == "arc_easy" else _mmlu_question
    return [convert(r, where or name) for r in rows]


def load_benchmark(name: BenchmarkName, split: str, data_dir: str | Path | None = None) -> list[MCQuestion]:
    """All questions of a benchmark split (MMLU: all 57 subjects, ordered by subject file)."""
    if name not in BENCHMARKS:
        raise DataSourceError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    rows = load_builtin(name, split, data_dir)
    if not rows:
        raise DataSourceError(f"{name} {split}: the split is empty")
    return to_mc_questions(name, rows, f"{name} {split}")


def benchmark_splits(name: str) -> tuple[str, ...]:
    return BUILTINS[name].splits


def subjects(questions: list[MCQuestion]) -> list[str]:
    return sorted({q.subject for q in questions if q.subject})
