"""Raw records -> :class:`InstructionExample`, weighted mixtures, and prompt rendering.

Formats (``DataSourceConfig.format``; ``auto`` picks one from the record's keys):

- ``alpaca``: ``instruction``, optional ``input``, ``output``
- ``messages``: ``messages`` (``role``/``content``), ``conversations`` as LIMA's list of
  alternating user/assistant strings, or ShareGPT's ``from``/``value`` turns. The last
  assistant turn is the response; earlier turns become the context.
- ``dolly``: ``instruction``, optional ``context``, ``response``
- ``flan_cot``: ``question``, ``answer``, ``rationale`` (FLAN v2 CoT TSV; ``\\n`` escapes are
  real newlines). Response = rationale followed by "So the answer is <answer>.", the FLAN CoT
  target style.
- ``arc`` / ``mmlu``: multiple-choice question -> question with labelled choices, response =
  what the evaluation scores: the correct choice's text for ARC-Easy, its letter for MMLU
  (:func:`mc_to_instruction`).

Rendering (``DataConfig.template``):

- ``plain`` (default; the same text for every tokenizer, so a dataset transfers across
  architectures)::

      ### Instruction:
      {instruction}

      ### Input:            <- only when the example has a context
      {context}

      ### Response:
      {response}

- ``chat``: the tokenizer's chat template with one user turn (instruction, then a blank line
  and the context) and the generation prompt; falls back to ``plain`` when the tokenizer has
  no chat template.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from nacd.data.benchmarks import MCQuestion, scored_continuations, to_mc_questions
from nacd.data.sources import DataSourceError, Record, row_where, text_field

FORMATS = ("alpaca", "messages", "dolly", "flan_cot", "arc", "mmlu")
TEMPLATES = ("plain", "chat")
PLAIN_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
PLAIN_CONTEXT = "### Input:\n{context}\n\n"
PLAIN_RESPONSE = "### Response:\n"
MC_INSTRUCTION = {"arc_easy": "Answer the multiple-choice question with the text of the correct choice.",
                  "mmlu": "Answer the multiple-choice question with the letter of the correct choice."}


@dataclass(frozen=True)
class InstructionExample:
    id: str
    source: str
    instruction: str
    response: str
    context: str = ""


# --------------------------------------------------------------------------- adapters
def mc_to_instruction(q: MCQuestion, source: str = "", benchmark: str | None = None) -> InstructionExample:
    """Question + labelled choices -> the answer as the evaluation scores it (ARC-Easy: the choice's
    text; MMLU: its letter), so training on these rows teaches what ARC/MMLU accuracy measures.
    ``benchmark`` defaults to what the question shows (loaded MMLU questions carry a subject); a
    user's MMLU-format rows may have none, so :func:`to_instructions` passes their format."""
    benchmark = benchmark or ("mmlu" if q.subject else "arc_easy")
    lines = [q.question.strip()] + [f"{label}. {text.strip()}" for label, text in zip(q.labels, q.choices)]
    return InstructionExample(id=q.id, source=source or benchmark,
                              instruction=f"{MC_INSTRUCTION[benchmark]}\n\n" + "\n".join(lines),
                              response=scored_continuations(benchmark, q)[q.answer].strip())


_ROLE = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


def _turns(row: Record, where: str) -> list[tuple[str, str]]:
    raw = row.get("messages", row.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataSourceError(f"{where}: field 'messages'/'conversations' must be a non-empty list")
    if all(isinstance(t, str) for t in raw):  # LIMA: alternating user, assistant, ...
        return [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(raw)]
    turns = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise DataSourceError(f"{where}: turn {i} is a {type(t).__name__}, expected an object or string")
        role = _ROLE.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or content is None:
            raise DataSourceError(f"{where}: turn {i} needs role/content (or from/value), got keys {sorted(t)}")
        if not isinstance(content, str):  # e.g. a list of content parts: its repr is no prompt
            raise DataSourceError(f"{where}: turn {i}'s content must be a string, got {type(content).__name__}")
        turns.append((role, content))
    return turns


def _from_messages(row: Record, where: str) -> tuple[str, str, str]:
    turns = [t for t in _turns(row, where) if t[0] != "system"]
    last_assistant = max((i for i, (r, _) in enumerate(turns) if r == "assistant"), default=-1)
    if last_assistant < 1 or turns[last_assistant - 1][0] != "user":
        raise DataSourceError(f"{where}: the conversation has no user turn followed by an assistant turn")
    history = "\n\n".join(f"{r.capitalize()}: {c}" for r, c in turns[: last_assistant - 1])
    return turns[last_assistant - 1][1], history, turns[last_assistant][1]


def _from_flan(row: Record, where: str) -> tuple[str, str, str]:
    def unescape(s: str) -> str:
        return s.replace("\\n", "\n").strip()

    question = unescape(text_field(row, "question", where))
    answer = unescape(text_field(row, "answer", where))
    rationale = unescape(text_field(row, "rationale", where, required=False))
    response = f"{rationale} So the answer is {answer}." if rationale else answer
    return question, "", response


ADAPTERS: dict[str, Callable[[Record, str], tuple[str, str, str]]] = {
    "alpaca": lambda r, w: (text_field(r, "instruction", w), text_field(r, "input", w, required=False),
                            text_field(r, "output", w)),
    "dolly": lambda r, w: (text_field(r, "instruction", w), text_field(r, "context", w, required=False),
                           text_field(r, "response", w)),
    "messages": _from_messages,
    "flan_cot": _from_flan,
}


def detect_format(row: Record, where: str = "") -> str:
    keys = set(row)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"question", "answer", "rationale"} <= keys:
        return "flan_cot"
    if {"question", "choices", "answerKey"} <= keys:
        return "arc"
    if {"question", "A", "B", "C", "D", "answer"} <= keys:
        return "mmlu"
    raise DataSourceError(f"{where}: cannot tell the format from keys {sorted(keys)}; "
                          f"set format to one of {', '.join(FORMATS)}")


def to_instructions(rows: Sequence[Record], fmt: str, source: str) -> list[InstructionExample]:
    """Adapt raw records; ids are the record's own ``id`` when it has one, else ``<source>/<index>``.
    Errors name the row's file and line (:func:`nacd.data.sources.row_where`) and the field."""
    if not rows:
        return []
    if fmt == "auto":
        fmt = detect_format(rows[0], row_where(rows, 0, source))
    if fmt in ("arc", "mmlu"):
        benchmark = "arc_easy" if fmt == "arc" else "mmlu"
        return [mc_to_instruction(q, source, benchmark) for q in to_mc_questions(benchmark, rows, source)]
    if fmt not in ADAPTERS:
        raise DataSourceError(f"{source}: unknown format '{fmt}' (known: auto, {', '.join(FORMATS)})")
    out = []
    for i, row in enumerate(rows):
        instruction, context, response = ADAPTERS[fmt](row, row_where(rows, i, source))
        out.append(InstructionExample(id=str(row.get("id", f"{source}/{i}")), source=source,
                                      instruction=instruction.strip(), context=context.strip(),
                                      response=response.strip()))
    return out


# --------------------------------------------------------------------------- mixtures
def mix(parts: Iterable[tuple[list[InstructionExample], float]], seed: int = 0) -> list[InstructionExample]:
    """A weighted mixture: each part contributes ``round(weight * len(part))`` examples (weight < 1
    subsamples without replacement, weight > 1 repeats whole copies plus a seeded remainder),
    then everything is shuffled with ``seed``. Weights are relative sampling rates, so a source's
    share of the mixture is ``weight * len / sum(weight * len)``."""
    rng = random.Random(seed)
    out: list[InstructionExample] = []
    parts = list(parts)
    if not parts:
        raise DataSourceError("the data mixture is empty: name at least one source")
    for examples, weight in parts:
        if weight <= 0:
            raise DataSourceError(f"mixture weight must be positive, got {weight}")
        whole, frac = divmod(weight * len(examples), len(examples)) if examples else (0, 0)
        out.extend(list(examples) * int(whole))
        out.extend(rng.sample(examples, round(frac)) if examples else [])
    if not out:
        raise DataSourceError("the data mixture has no rows (every source is empty or weighted to 0 rows)")
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- rendering
def _has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(ex: InstructionExample, template: str = "plain", tokenizer: Any = None) -> str:
    """The text the model reads before the response (no loss on it)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template '{template}' (known: {', '.join(TEMPLATES)})")
    if template == "chat" and _has_chat_template(tokenizer):
        user = ex.instruction + (f"\n\n{ex.context}" if ex.context else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    text = PLAIN_INSTRUCTION.format(instruction=ex.instruction)
    if ex.context:
        text += PLAIN_CONTEXT.format(context=ex.context)
    return text + PLAIN_RESPONSE


def render_row(ex: InstructionExample, template: str = "plain", tokenizer: Any = None) -> dict[str, str]:
    """``prompt``/``response``/``text`` as every variant dataset stores them."""
    prompt = render_prompt(ex, template, tokenizer)
    return {"id": ex.id, "source": ex.source, "prompt": prompt, "response": ex.response,
            "text": prompt + ex.response}
