"""One lightweight KFP component per nacd stage.

A component body is an import, one library call and metrics logging: KFP serialises the
function's source into the pipeline, so every helper lives in the library
(``nacd.pipeline_params``), which the project image has installed.
"""

import os
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

# The project image (docker/Dockerfile.cuda on a cluster). Overridable at compile time so CI can
# pin the tag it just pushed; the Helm chart passes its own `image` value the same way.
IMAGE = os.environ.get("NACD_IMAGE", "ghcr.io/nacd-project/nacd:0.1.0")

component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def check_config(name: str, budget: float, storage: dict, data: dict, source: dict, experts: dict,
                 seed_selection: dict, distill: dict, selection: dict, evaluation: dict):
    """The whole-config checks the CLI runs before a local run, for runs started from the UI."""
    from nacd.pipeline_params import config_from_sections, preflight

    preflight(config_from_sections(name=name, budget=budget, storage=storage, data=data,
                                   source=source, experts=experts, seed_selection=seed_selection,
                                   distill=distill, selection=selection, evaluation=evaluation))


@component
def prepare_data(data: dict, source: dict, dataset: Output[Dataset], metrics: Output[Metrics]):
    """Tokenise the instruction mixture with the source model's tokenizer."""
    from nacd.data.prepare import prepare_data as run
    from nacd.pipeline_params import config_from_sections, log_metrics

    cfg = config_from_sections(data=data, source=source)
    log_metrics(metrics, run(cfg, dataset.path))


@component
def expert_indices(experts: dict) -> list:
    """The expert indices to fan out over (kfp loops iterate over a task's single output)."""
    from nacd.pipeline_params import config_from_sections

    return list(range(config_from_sections(experts=experts).experts.num_experts))


@component
def train_experts(source: dict, experts: dict, storage: dict, expert_index: int, num_gpus: int,
                  dataset: Input[Dataset], store: Output[Artifact], metrics: Output[Metrics]):
    """Train expert ``expert_index`` and record its trajectory (DeepSpeed across the pod's GPUs)."""
    from nacd.pipeline_params import (config_from_sections, expert_store_uri, log_metrics,
                                      run_train_expert)

    cfg = config_from_sections(source=source, experts=experts, storage=storage)
    uri = expert_store_uri(cfg, dataset.path, store.path)
    store.metadata["store_uri"] = uri
    store.metadata["expert_index"] = expert_index
    log_metrics(metrics, run_train_expert(cfg, dataset.path, uri, expert_index, num_gpus))


@component
def select_seeds(budget: float, seed_selection: dict, dataset: Input[Dataset],
                 less_variant: Input[Dataset], seeds: Output[Artifact]):
    """Pick the real seed samples the synthetic prompts are placed in front of (random, or the
    LESS variant's rows with ``seed_selection.method=less``)."""
    from nacd.pipeline_params import config_from_sections
    from nacd.selection.seeds import select_seeds as run

    cfg = config_from_sections(budget=budget, seed_selection=seed_selection)
    summary = run(cfg, dataset.path, seeds.path, less_dir=less_variant.path)
    seeds.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


@component
def distill(budget: float, source: dict, distill: dict, storage: dict, num_gpus: int,
            dataset: Input[Dataset], seeds: Input[Artifact], stores: Input[List[Artifact]],
            synthetic: Output[Model], metrics: Output[Metrics]):
    """Trajectory matching with the neighbour regulariser: learn the synthetic set."""
    import tempfile

    from nacd.distill.run import distill as run
    from nacd.pipeline_params import config_from_sections, log_metrics, merge_stores

    cfg = config_from_sections(budget=budget, source=source, distill=distill, storage=storage)
    uris = [s.metadata.get("store_uri") or s.path for s in stores]
    with tempfile.TemporaryDirectory(prefix="nacd-store-") as work:
        log_metrics(metrics, run(cfg, dataset.path, seeds.path, merge_stores(uris, work),
                                 synthetic.path))


@component
def project_ids(source: dict, distill: dict, synthetic: Input[Model], distilled: Output[Dataset],
                metrics: Output[Metrics]):
    """Nearest-vocabulary projection of the learned embeddings: the distilled text dataset."""
    from nacd.pipeline_params import config_from_sections, log_metrics
    from nacd.projection import project_ids as run

    cfg = config_from_sections(source=source, distill=distill)
    log_metrics(metrics, run(cfg, synthetic.path, distilled.path))


@component
def select_random(budget: float, selection: dict, dataset: Input[Dataset],
                  variant: Output[Dataset], metrics: Output[Metrics]):
    """Random baseline subset of the same budget."""
    from nacd.pipeline_params import config_from_sections, log_metrics
    from nacd.selection.random import select_random as run

    cfg = config_from_sections(budget=budget, selection=selection)
    log_metrics(metrics, run(cfg, dataset.path, variant.path))


@component
def select_less(budget: float, source: dict, selection: dict, data: dict, num_gpus: int,
                dataset: Input[Dataset], variant: Output[Dataset], metrics: Output[Metrics]):
    """LESS baseline: gradient-similarity selection of the same budget."""
    from nacd.pipeline_params import config_from_sections, log_metrics
    from nacd.selection.less import select_less as run

    cfg = config_from_sections(budget=budget, source=source, selection=selection, data=data)
    log_metrics(metrics, run(cfg, dataset.path, variant.path))


@component
def full_variant(dataset: Input[Dataset], variant: Output[Dataset]):
    """The whole pool as a variant dataset (the full-data reference)."""
    from nacd.data.variants import full_variant as run

    summary = run(dataset.path, variant.path)
    variant.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


@component
def eval_plan(evaluation: dict, data: dict, variant: str) -> list:
    """The (target, variant) evaluations of one data variant."""
    from nacd.pipeline_params import eval_items

    return eval_items(evaluation, data, variant)


@component
def evaluate(item: dict, num_gpus: int, scores: Output[Artifact], metrics: Output[Metrics],
             variant_data: Input[Dataset] = None):
    """Fine-tune one target on one data variant (or none) and score the benchmarks."""
    import os

    from nacd.pipeline_params import config_for_item, log_metrics, score_metrics, write_json

    os.makedirs(scores.path, exist_ok=True)
    rows = []
    if not item.get("skip"):
        from nacd.evaluation.run import evaluate as run

        cfg = config_for_item(item)
        rows = run(cfg, item["target"], item["variant"],
                   variant_data.path if variant_data is not None else None, scores.path)
    log_metrics(metrics, score_metrics(rows))  # also on skipped items: the file must exist
    write_json(os.path.join(scores.path, "scores.json"), rows)


@component
def report(distilled: Input[List[Artifact]], random: Input[List[Artifact]],
           less: Input[List[Artifact]], full: Input[List[Artifact]], none: Input[List[Artifact]],
           html: Output[HTML], markdown: Output[Markdown], bundle: Output[Artifact]):
    """Score table and plot: an HTML artifact the KFP UI renders, plus Markdown."""
    import os
    import shutil

    from nacd.report import write_report

    files = [os.path.join(a.path, "scores.json") for group in (distilled, random, less, full, none)
             for a in group]
    path = write_report(files, bundle.path)
    shutil.copyfile(path, html.path)
    shutil.copyfile(os.path.join(bundle.path, "report.md"), markdown.path)
