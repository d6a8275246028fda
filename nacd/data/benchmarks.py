"""ARC-Easy and MMLU as lists of :class:`MCQuestion`, from a local folder or the hub.

Local layout (``data_dir``, as in ``shared/data``): ``arc_easy/{train,validation}.jsonl`` (the
``allenai/ai2_arc`` schema) and ``mmlu/{dev,val}/<subject>_<split>.csv`` (the original release:
no header, ``question,A,B,C,D,answer``). MMLU's split is called ``val`` on disk; ``validation``
is accepted as an alias.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nacd.data.sources import BUILTINS, DataSourceError, Record, load_builtin, row_where, text_field

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
            raise ValueError(f"question {self.id}: {len(self.choices)} choice(s) and {len(self.labels)} label(s); "
                             f"a question needs at least 2 choices, one label each")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"question {self.id}: answer index {self.answer} out of range")


def _question(where: str, **fields: Any) -> MCQuestion:
    """An :class:`MCQuestion` whose own checks (choice count, answer range) name the row."""
    try:
        return MCQuestion(**fields)
    except ValueError as e:
        raise DataSourceError(f"{where}: {e}") from None


def _arc_question(row: Record, where: str, default_id: str) -> MCQuestion:
    choices = row.get("choices")
    if not (isinstance(choices, dict) and isinstance(choices.get("label"), list)
            and isinstance(choices.get("text"), list)):
        raise DataSourceError(f"{where}: field 'choices' must be an object with lists 'label' and 'text' "
                              f"(the allenai/ai2_arc schema), got {choices!r:.80}")
    texts = choices["text"]
    if not all(isinstance(t, str) for t in texts):
        raise DataSourceError(f"{where}: field 'choices.text' must be a list of strings, got {texts!r:.80}")
    labels = [str(x) for x in choices["label"]]  # labels and answerKey are ids: "A" or 1 both do
    qid = str(row.get("id", default_id))
    if row.get("answerKey") is None:
        raise DataSourceError(f"{where}: field 'answerKey' is missing")
    if str(row["answerKey"]) not in labels:
        raise DataSourceError(f"{where}: ARC record {qid}: answerKey {str(row['answerKey'])!r} "
                              f"is not one of its labels {labels}")
    return _question(where, id=qid, question=text_field(row, "question", where), choices=texts,
                     labels=labels, answer=labels.index(str(row["answerKey"])))


def _mmlu_question(row: Record, where: str, default_id: str) -> MCQuestion:
    qid = str(row.get("id", default_id))
    answer = str(row.get("answer", "")).strip()
    if answer not in ("A", "B", "C", "D"):
        raise DataSourceError(f"{where}: MMLU record {qid}: field 'answer' {answer!r} is not A-D")
    return _question(where, id=qid, question=text_field(row, "question", where),
                     choices=[text_field(row, k, where, allow_blank=True) for k in "ABCD"],
                     labels=list("ABCD"), answer="ABCD".index(answer), subject=row.get("subject"))


def scored_continuations(benchmark: str, q: MCQuestion) -> list[str]:
    """What lm-evaluation-harness scores after the prompt, one per choice: ARC-Easy scores the
    choice's text, MMLU its letter. Training data built from these questions answers the same way
    (:func:`nacd.data.formats.mc_to_instruction`), so fine-tuning teaches what is scored."""
    return [f" {c}" for c in q.choices] if benchmark == "arc_easy" else [f" {label}" for label in q.labels]


def to_mc_questions(name: str, rows: Sequence[Record], source: str = "") -> list[MCQuestion]:
    """ARC- or MMLU-format records as questions. Errors name the row's file and line (or
    ``<source> row <n>``); a row without ``id`` gets ``<source>/<index>``, as in
    :func:`nacd.data.formats.to_instructions`."""
    convert = _arc_question if name == "arc_easy" else _mmlu_question
    source = source or name
    return [convert(r, row_where(rows, i, source), f"{source}/{i}") for i, r in enumerate(rows)]


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
