"""Multiple-choice log-likelihood scoring of ARC-Easy and MMLU, two ways that must agree.

1. :func:`score_lm_eval` runs lm-evaluation-harness (``lm_eval``) with the harness's own task
   definitions (``arc_easy`` and the 57 ``mmlu_<subject>`` tasks: prompts, choices, few-shot
   split and sampler, metrics), only re-pointed at local JSONL files, and an ``HFLM`` wrapping the
   already-loaded model, so our registry models and merged LoRA adapters are scored exactly as
   published numbers are.
2. :func:`score_direct` computes the same quantities by hand: for each choice, the sum of the
   continuation tokens' log-probabilities given the context; ``acc`` takes the argmax,
   ``acc_norm`` the argmax of the sum divided by the choice's character length (the harness's
   definition). It cross-checks (1), and ``evaluation.method: direct`` scores with it: it computes
   the output layer only where a continuation token is scored, where the harness computes and
   log-softmaxes the whole vocabulary at every position: 1.7-1.8x the harness's speed on Gemma 3 270M
   on CPU, with the same predictions (``bench/scoring_speed.py``).

Prompts (the harness's): ARC ``"Question: {q}\\nAnswer:"`` + ``" {choice text}"``; MMLU a
subject description, ``"{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` + ``" A"`` .. ``" D"``.
k-shot exemplars: MMLU the first k of ``dev`` (the harness's ``first_n``), ARC ``train``
(the harness samples them with its seeded sampler; the direct scorer takes the first k, so
only zero-shot is expected to match exactly for ARC).

``limit`` is per task as in the harness: the first N questions of ARC, of each MMLU subject.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from nacd.config import MAX_LOGITS_GIB
from nacd.data.benchmarks import FEWSHOT_SPLIT, MCQuestion, load_benchmark, scored_continuations, subjects

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MCRequest:
    """One question as the model sees it: a context and one continuation per choice."""

    id: str
    context: str
    continuations: list[str]
    answer: int
    subject: str | None = None


# --------------------------------------------------------------------------- prompts
def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _question_text(benchmark: str, q: MCQuestion) -> str:
    if benchmark == "arc_easy":
        return f"Question: {q.question}\nAnswer:"
    lines = [q.question.strip()] + [f"{label}. {text}" for label, text in zip("ABCD", q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def build_requests(benchmark: str, questions: Sequence[MCQuestion], shots: int = 0,
                   fewshot: Sequence[MCQuestion] = ()) -> list[MCRequest]:
    """The harness's prompt for each question, with the first ``shots`` exemplars of ``fewshot``
    (per subject for MMLU) in front."""
    out = []
    for q in questions:
        pool = [f for f in fewshot if f.subject == q.subject and f.id != q.id][:shots] if shots else []
        examples = "".join(f"{_question_text(benchmark, f)}{scored_continuations(benchmark, f)[f.answer]}\n\n"
                           for f in pool)
        prefix = mmlu_description(q.subject) if benchmark == "mmlu" else ""
        out.append(MCRequest(q.id, prefix + examples + _question_text(benchmark, q),
                             scored_continuations(benchmark, q), q.answer, q.subject))
    return out


def limit_questions(questions: Sequence[MCQuestion], limit: int | None) -> list[MCQuestion]:
    """The first ``limit`` questions of each task (each MMLU subject), as the harness's --limit."""
    if limit is None:
        return list(questions)
    taken: dict[str | None, int] = {}
    out = []
    for q in questions:
        if taken.get(q.subject, 0) < limit:
            taken[q.subject] = taken.get(q.subject, 0) + 1
            out.append(q)
    return out


# --------------------------------------------------------------------------- direct scorer
def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids the harness's way: encode the whole string and split at the
    context's length, with trailing spaces of the context moved to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def fitting_batch_size(model: torch.nn.Module, tokenizer: Any, requests: Sequence[MCRequest],
                       batch_size: int, max_logits_gib: float) -> int:
    """The harness's batch: the largest, up to ``batch_size``, whose float32 logits for the longest
    input take at most ``max_logits_gib``. Its forward pass holds batch x length x vocabulary logits
    and a log-softmax of them beside: Gemma 3's 262k vocabulary on MMLU's longest prompt (790 tokens)
    needs 6.2 GiB of logits at batch 8, which with its copies overran a 24 GiB machine."""
    # the whole string's length is the pair's, however _encode_pair splits it: one encode, not two
    longest = max((len(tokenizer(r.context + c)["input_ids"]) for r in requests for c in r.continuations),
                  default=1)
    vocab = model.get_output_embeddings().weight.shape[0]
    fits = int(max_logits_gib * 2**30) // (longest * vocab * 4)
    return max(1, min(batch_size, fits))


def _scored_batches(keys: Sequence[tuple[int, ...]], first_scored: dict[tuple[int, ...], int],
                    batch_size: int, max_logit_rows: int) -> list[tuple[list[tuple[int, ...]], int]]:
    """Consecutive runs of ``keys`` (longest first) of at most ``batch_size`` inputs whose kept
    logits, batch x (longest input - earliest scored position) rows, stay within ``max_logit_rows``,
    each with that earliest scored position. An input alone is never split, whatever its rows."""
    batches: list[tuple[list[tuple[int, ...]], int]] = []
    for key in keys:
        if batches:
            batch, first = batches[-1]
            joined = min(first, first_scored[key])
            if len(batch) < batch_size and (len(batch) + 1) * (len(batch[0]) - joined) <= max_logit_rows:
                batch.append(key)
                batches[-1] = (batch, joined)
                continue
        batches.append(([key], first_scored[key]))
    return batches


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                          batch_size: int = 8, max_logits_gib: float = MAX_LOGITS_GIB) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair.

    Pairs whose model input is identical (single-token continuations of one context, e.g. MMLU's
    " A".." D") share one forward pass. Batched longest-first with right padding (padding never
    precedes a scored token). Only the positions from the batch's earliest scored one on go through
    the output layer (``logits_to_keep``): with Gemma 3's 262k vocabulary that layer is 60 % of a
    forward pass, and MMLU scores one position of a ~100-token prompt. ``max_logits_gib`` caps the
    float32 logits a batch keeps."""
    encoded = [_encode_pair(tokenizer, c, x) for c, x in pairs]
    # the last token is never an input: its prediction is not needed
    inputs: dict[tuple[int, ...], list[int]] = {}
    first_scored: dict[tuple[int, ...], int] = {}
    for i, (ctx, cont) in enumerate(encoded):
        key = tuple(ctx + cont[:-1])
        inputs.setdefault(key, []).append(i)
        # the logits at position len(ctx) - 1 predict the continuation's first token
        first_scored[key] = min(first_scored.get(key, len(key)), len(ctx) - 1)
    keys = sorted(inputs, key=len, reverse=True)
    head = model.get_output_embeddings()
    max_logit_rows = int(max_logits_gib * 2**30) // (head.weight.shape[0] * 4)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(encoded)
    # The model slices its hidden states before the output layer. On CPU, a non-contiguous 3-D input
    # times a weight that does not require grad (a fine-tuned model, frozen and merged) runs as bmm
    # over an expanded weight, ~5x slower than the folded mm: such a Gemma 3 scored at half speed.
    contiguous_input = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    device = next(model.parameters()).device
    try:
        for batch, first in _scored_batches(keys, first_scored, batch_size, max_logit_rows):
            width = len(batch[0])
            ids = torch.tensor([list(k) + [pad] * (width - len(k)) for k in batch], device=device)
            mask = torch.tensor([[1] * len(k) + [0] * (width - len(k)) for k in batch], device=device)
            # logits of positions first .. width - 1 (an int keeps the last ones; it is >= 1 here)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
            for row, key in enumerate(batch):
                for i in inputs[key]:
                    ctx, cont = encoded[i]
                    start = len(ctx) - 1 - first
                    rows = logits[row, start:start + len(cont)].float().log_softmax(-1)
                    out[i] = float(rows[torch.arange(len(cont)), torch.tensor(cont, device=device)].sum())
    finally:
        contiguous_input.remove()
    return out


def score_requests(model: torch.nn.Module, tokenizer: Any, requests: Sequence[MCRequest],
                   batch_size: int = 8, max_logits_gib: float = MAX_LOGITS_GIB) -> dict:
    """acc / acc_norm (and per-subject acc) from per-choice log-likelihoods."""
    pairs = [(r.context, c) for r in requests for c in r.continuations]
    flat = continuation_logprobs(model, tokenizer, pairs, batch_size, max_logits_gib)
    per_question, k = [], 0
    for r in requests:
        lls = flat[k:k + len(r.continuations)]
        k += len(r.continuations)
        norm = [ll / len(c) for ll, c in zip(lls, r.continuations)]
        per_question.append({"id": r.id, "subject": r.subject, "loglikelihoods": lls,
                             "pred": max(range(len(lls)), key=lls.__getitem__),
                             "pred_norm": max(range(len(norm)), key=norm.__getitem__), "answer": r.answer})
    return summarize(per_question)


def summarize(per_question: list[dict]) -> dict:
    n = len(per_question)
    if n == 0:
        raise ValueError("no questions to score")
    result = {"n": n, "acc": sum(p["pred"] == p["answer"] for p in per_question) / n,
              "acc_norm": sum(p["pred_norm"] == p["answer"] for p in per_question) / n,
              # mean log-likelihood of the gold choice: moves even when no argmax flips
              "gold_loglik": sum(p["loglikelihoods"][p["answer"]] for p in per_question) / n,
              "questions": per_question}
    subs = sorted({p["subject"] for p in per_question if p["subject"]})
    if subs:
        result["subjects"] = {}
        for s in subs:
            rows = [p for p in per_question if p["subject"] == s]
            result["subjects"][s] = {"n": len(rows), "acc": sum(p["pred"] == p["answer"] for p in rows) / len(rows)}
        result["acc_macro"] = sum(v["acc"] for v in result["subjects"].values()) / len(subs)
    return result


def score_direct(model: torch.nn.Module, tokenizer: Any, benchmark: str, split: str,
                 data_dir: str | Path | None, shots: int = 0, limit: int | None = None,
                 batch_size: int = 8, *, max_logits_gib: float) -> dict:
    questions = limit_questions(load_benchmark(benchmark, split, data_dir), limit)
    fewshot = load_benchmark(benchmark, FEWSHOT_SPLIT[benchmark], data_dir) if shots else []
    requests = build_requests(benchmark, questions, shots, fewshot)
    return {**score_requests(model, tokenizer, requests, batch_size, max_logits_gib), "batch_size": batch_size}


# --------------------------------------------------------------------------- lm-eval
def _harness_task_yaml(*parts: str) -> dict:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / Path(*parts)
    return yaml.safe_load(path.read_text())


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _hf_schema(benchmark: str, q: MCQuestion) -> dict:
    """A question in the hub schema the harness's task templates expect."""
    if benchmark == "arc_easy":
        return {"id": q.id, "question": q.question, "choices": {"text": q.choices, "label": q.labels},
                "answerKey": q.labels[q.answer]}
    return {"question": q.question, "subject": q.subject, "choices": q.choices, "answer": q.answer}


def harness_task_configs(benchmark: str, questions: Sequence[MCQuestion], fewshot: Sequence[MCQuestion],
                         folder: Path) -> list[dict]:
    """The harness's own task configs, re-pointed at local JSONL: the evaluated questions become
    the ``test`` split, few-shot exemplars the ``train`` (ARC) / ``dev`` (MMLU) split."""
    def local(name: str, evaluated: list[MCQuestion], shots: list[MCQuestion]) -> dict:
        files = {"test": _write_jsonl(folder / f"{name}-test.jsonl", [_hf_schema(benchmark, q) for q in evaluated])}
        if shots:
            files[FEWSHOT_SPLIT[benchmark]] = _write_jsonl(folder / f"{name}-shots.jsonl",
                                                           [_hf_schema(benchmark, q) for q in shots])
        return {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files},
                "test_split": "test", "validation_split": None,
                "training_split": FEWSHOT_SPLIT[benchmark] if shots and benchmark == "arc_easy" else None,
                "fewshot_split": FEWSHOT_SPLIT[benchmark] if shots else None}

    if benchmark == "arc_easy":
        cfg = _harness_task_yaml("arc", "arc_easy.yaml")
        cfg.pop("tag", None)
        cfg.update(local("arc_easy", list(questions), list(fewshot)), task="nacd_arc_easy")
        return [cfg]
    template = _harness_task_yaml("mmlu", "default", "_default_template_yaml")
    configs = []
    for subject in subjects(list(questions)):
        sub = _harness_task_yaml("mmlu", "default", f"mmlu_{subject}.yaml")
        cfg = {**template, "description": sub["description"], "task": f"nacd_mmlu_{subject}"}
        cfg.update(local(subject, [q for q in questions if q.subject == subject],
                         [q for q in fewshot if q.subject == subject]))
        if not cfg["fewshot_split"]:
            cfg.pop("fewshot_config", None)
        configs.append(cfg)
    return configs


def score_lm_eval(model: torch.nn.Module, tokenizer: Any, benchmark: str, split: str,
                  data_dir: str | Path | None, shots: int = 0, limit: int | None = None,
                  batch_size: int = 8, *, max_logits_gib: float) -> dict:
    """Accuracy through lm-evaluation-harness; per-question log-likelihoods come back too."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    questions = limit_questions(load_benchmark(benchmark, split, data_dir), limit)
    fewshot = load_benchmark(benchmark, FEWSHOT_SPLIT[benchmark], data_dir) if shots else []
    device = str(next(model.parameters()).device)
    batch = fitting_batch_size(model, tokenizer, build_requests(benchmark, questions, shots, fewshot),
                               batch_size, max_logits_gib)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, device=device)
    with tempfile.TemporaryDirectory(prefix="nacd-lmeval-") as tmp:
        configs = harness_task_configs(benchmark, questions, fewshot, Path(tmp))
        results = simple_evaluate(model=lm, tasks=configs, num_fewshot=shots, limit=None,
                                  task_manager=TaskManager(include_defaults=False),
                                  bootstrap_iters=0, log_samples=True, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=1234)
    by_id = {}
    for cfg in configs:
        subset = [q for q in questions if benchmark == "arc_easy" or q.subject == cfg["task"][len("nacd_mmlu_"):]]
        for sample in results["samples"][cfg["task"]]:
            q = subset[sample["doc_id"]]
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            lens = [len(c) for c in scored_continuations(benchmark, q)]
            by_id[q.id] = {"id": q.id, "subject": q.subject, "loglikelihoods": lls,
                           "pred": max(range(len(lls)), key=lls.__getitem__),
                           "pred_norm": max(range(len(lls)), key=lambda i: lls[i] / lens[i]),
                           "answer": q.answer,
                           "harness_acc": sample.get("acc")}
    per_question = [by_id[q.id] for q in questions]
    result = summarize(per_question)
    # The harness's own aggregate must be what we recomputed from its per-sample outputs.
    harness_acc = [results["results"][c["task"]]["acc,none"] for c in configs]
    if benchmark == "arc_easy" and not math.isclose(harness_acc[0], result["acc"], abs_tol=1e-9):
        raise RuntimeError(f"lm-eval acc {harness_acc[0]} != per-sample acc {result['acc']}")
    result["harness"] = {c["task"]: results["results"][c["task"]] for c in configs}
    result["batch_size"] = batch
    return result
