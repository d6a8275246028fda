"""Stage ``evaluate`` and the ``nacd evaluate`` entry point.

``evaluate(cfg, target, variant_name, variant_dir, out_dir)`` fine-tunes ``target`` on the variant
(none for the ``none`` variant) with ``cfg.evaluation.finetune_for(target)`` and scores every benchmark in
``cfg.evaluation.benchmarks`` with ``cfg.evaluation.method`` (lm-evaluation-harness by default).
``out_dir`` (written atomically) gets ``scores.json`` (rows of docs/stages.md), ``evaluate.json``
(the inputs, for reuse) and, after fine-tuning with LoRA, ``adapter/`` (peft ``save_pretrained``).
A second call with the same inputs returns the stored rows.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nacd import storage
from nacd.config import MAX_LOGITS_GIB, RunConfig
from nacd.data.tokenization import ensure_pad_token
from nacd.data.variants import atomic_dir, read_variant, read_variant_meta, write_json
from nacd.evaluation.finetune import finetune, merged
from nacd.evaluation.scoring import score_direct, score_lm_eval

SCORES_FILE = "scores.json"
SCORE_KEYS = ("target", "variant", "benchmark", "split", "shots", "limit", "n", "acc", "acc_norm",
              "seed", "finetune", "wall_s")


def load_target(name: str, adapter: str | Path | None = None, dtype: str = "float32"):
    """Model (adapter merged in) and its tokenizer (pad token ensured)."""
    from nacd.models import load_model, load_tokenizer

    model = load_model(name, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter folder has no adapter_config.json: {adapter}")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    return model, ensure_pad_token(load_tokenizer(name), name)


def load_expert_checkpoint(cfg: RunConfig, store_uri: str, expert: int | str, index: int):
    """The source model at checkpoint ``index`` of an expert's trajectory (LoRA folded in), its
    tokenizer and the checkpoint's optimizer step: what a stretch of an expert's path teaches,
    scored like any target. The trajectory's parameter layout must be the model's."""
    from nacd.models import ParamSpace, load_model, load_tokenizer, make_trainable
    from nacd.trajectories import open_store

    model = make_trainable(load_model(cfg.source.name, dtype=cfg.source.dtype, revision=cfg.source.revision),
                           cfg.source.param_space)
    space = ParamSpace.from_model(model, cfg.source.param_space)
    trajectory = open_store(store_uri, cfg.storage).expert(expert, expect=space)
    if not 0 <= index < len(trajectory):
        raise IndexError(f"{trajectory!r} has checkpoints 0..{len(trajectory) - 1}, not {index}")
    space.set(model, trajectory.read(index))
    tokenizer = ensure_pad_token(load_tokenizer(cfg.source.name, cfg.source.revision), cfg.source.name)
    return merged(model).eval(), tokenizer, trajectory.steps[index]


def score(model: Any, tokenizer: Any, benchmark: str, split: str, data_dir: str | Path | None,
          shots: int = 0, limit: int | None = None, batch_size: int = 8, method: str = "lm_eval",
          max_logits_gib: float = MAX_LOGITS_GIB) -> dict:
    if method not in ("lm_eval", "direct"):
        raise ValueError(f"unknown scoring method '{method}' (lm_eval or direct)")
    scorer = score_lm_eval if method == "lm_eval" else score_direct
    start = time.time()
    result = scorer(model, tokenizer, benchmark, split, data_dir, shots, limit, batch_size,
                    max_logits_gib=max_logits_gib)
    result.pop("harness", None)
    questions = result.pop("questions")
    return {"benchmark": benchmark, "split": split, "shots": shots, "limit": limit, "method": method,
            **result, "wall_s": round(time.time() - start, 2), "_questions": questions}


def score_benchmarks(model: Any, tokenizer: Any, cfg: RunConfig) -> list[dict]:
    """``score`` on every benchmark of ``cfg.evaluation`` (accuracy summaries, no per-question rows)."""
    results = []
    for bench in cfg.evaluation.benchmarks:
        result = score(model, tokenizer, bench.name, bench.split, cfg.data.data_dir, bench.shots,
                       bench.limit, cfg.evaluation.batch_size, cfg.evaluation.method,
                       max_logits_gib=cfg.evaluation.max_logits_gib)
        result.pop("_questions")
        results.append(result)
    return results


def evaluate_model(model: str, adapter: str | Path | None, benchmark: str, split: str,
                   data_dir: str | Path | None, shots: int = 0, limit: int | None = None,
                   batch_size: int = 8, method: str = "lm_eval", json_out: str | Path | None = None,
                   max_logits_gib: float = MAX_LOGITS_GIB) -> dict:
    """``nacd evaluate``: score a model (optionally with a LoRA adapter) and return the accuracy
    summary; ``json_out`` also gets it, with per-question predictions."""
    net, tokenizer = load_target(model, adapter)
    result = score(net, tokenizer, benchmark, split, data_dir, shots, limit, batch_size, method, max_logits_gib)
    questions = result.pop("_questions")
    result = {"model": model, "adapter": str(adapter) if adapter else None, **result}
    if json_out is not None:
        storage.write_json(str(json_out), {**result, "questions": questions})
    return result


def _inputs(cfg: RunConfig, target: str, variant_name: str, variant_dir: str | Path | None) -> dict:
    variant = read_variant_meta(variant_dir) if variant_dir is not None else None
    return {"target": target, "variant": variant_name, "variant_meta": variant,
            "evaluation": cfg.evaluation.model_dump(mode="json", exclude={"targets", "variants"}),
            "data_dir": cfg.data.data_dir}


def evaluate(cfg: RunConfig, target: str, variant_name: str, variant_dir: str | Path | None,
             out_dir: str | Path) -> list[dict]:
    """Fine-tune ``target`` on a variant (or not, for ``none``) and score it; see the module doc."""
    if variant_name != "none" and variant_dir is None:
        raise ValueError(f"variant '{variant_name}' needs a variant dataset folder (only 'none' has none)")
    out_dir = Path(out_dir)
    inputs = _inputs(cfg, target, variant_name, variant_dir)
    if (out_dir / SCORES_FILE).is_file() and (out_dir / "evaluate.json").is_file():
        if json.loads((out_dir / "evaluate.json").read_text()) == inputs:
            return json.loads((out_dir / SCORES_FILE).read_text())
    ft = cfg.evaluation.finetune_for(target)
    model, tokenizer = load_target(target)
    with atomic_dir(out_dir, SCORES_FILE) as tmp:
        train_info: dict = {"trained": False}
        if variant_dir is not None:
            model, train_info = finetune(model, tokenizer, read_variant(variant_dir), ft)
            train_info["trained"] = True
            if ft.param_space.kind == "lora":
                model.save_pretrained(str(tmp / "adapter"))
            model = merged(model)
        rows = [{"target": target, "variant": variant_name, **result, "seed": ft.seed, "finetune": train_info}
                for result in score_benchmarks(model, tokenizer, cfg)]
        write_json(tmp / SCORES_FILE, rows)
        write_json(tmp / "evaluate.json", inputs)
    return rows
