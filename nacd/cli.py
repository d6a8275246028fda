"""``nacd``: run the whole pipeline locally, one stage by hand, compile or submit to Kubeflow.

    nacd run [--config FILE] [--data-dir DIR] [--set key=value ...]
    nacd step NAME --config FILE [stage inputs] --out DIR
    nacd evaluate --model NAME_OR_PATH --benchmark arc_easy --split validation --json OUT.json
    nacd compile -o nacd_pipeline.yaml
    nacd submit --host URL --experiment NAME [--run-name NAME] [--config FILE] [--param k=v ...]

KFP is imported only by the commands that need it (run, compile, submit), inside their
functions: the library itself never imports kfp, and ``nacd step`` works without it. The
pipeline definition lives in the checkout (``pipelines/``, ``components/``); the project image
carries the checkout too.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

from nacd.config import MAX_LOGITS_GIB, ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
DEFAULT_RUNS = "./nacd-runs"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CliError(RuntimeError):
    """A user-facing failure: printed as one line, exit status 1."""


# --------------------------------------------------------------------------- config
def resolve_config(path: str | None, overrides: Sequence[str], data_dir: str | None) -> RunConfig:
    """Load, override and validate; every check that can fail without data runs here, before
    anything is written."""
    from nacd.pipeline_params import preflight

    if path is None:
        if not QUICKSTART.is_file():
            raise CliError(f"no --config given and the built-in quickstart config is missing "
                           f"({QUICKSTART}); pass --config FILE")
        path = str(QUICKSTART)
    items = list(overrides)
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise CliError(f"--data-dir: folder not found: {data_dir}")
        items.append(f"data.data_dir={Path(data_dir).resolve()}")
    cfg = load_config(path, items)
    if cfg.data.data_dir and not Path(cfg.data.data_dir).is_dir():
        raise ConfigError(f"{path}: 'data.data_dir': folder not found: {cfg.data.data_dir}")
    preflight(cfg)
    return cfg


def _absolute_local_root(cfg: RunConfig) -> RunConfig:
    """Component subprocesses get absolute paths: a relative root would depend on their cwd."""
    if cfg.storage.root.startswith("s3://"):
        return cfg
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"root": str(Path(cfg.storage.root).resolve())})})


def _pipeline_module():
    if not (REPO / "pipelines" / "nacd_pipeline.py").is_file():
        raise CliError(f"the pipeline definition is not beside the package ({REPO}/pipelines): "
                       f"run nacd from a checkout or the project image")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from pipelines import nacd_pipeline

    return nacd_pipeline


# --------------------------------------------------------------------------- nacd run
class _TaskLog(logging.Filter):
    """Collects kfp.local's task events so the CLI can summarise executed vs cached steps.

    A filter on the root logger, not a handler: kfp.local swaps the root handlers while a task
    runs, and logger filters survive that."""

    def __init__(self) -> None:
        super().__init__()
        self.cached: list[str] = []
        self.executed: list[str] = []
        self.failed: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self._collect(_ANSI.sub("", record.getMessage()))
        return True

    def _collect(self, msg: str) -> None:
        if m := re.match(r"Task (\S+) cache hit", msg):
            self.cached.append(m.group(1))
        elif m := re.match(r"Task '([^']+)' finished with status (SUCCESS|FAILURE)", msg):
            (self.executed if m.group(2) == "SUCCESS" else self.failed).append(m.group(1))
        elif m := re.match(r"Task (\S+) failed with exception: (.*)", msg):
            self.failed.append(f"{m.group(1)}: {m.group(2)}")


def run_local(cfg: RunConfig, *, root: str | None = None, quiet: bool = False) -> dict:
    """Run the whole DAG through kfp.local; return the run folder, report path and score rows."""
    from kfp import local

    from nacd.pipeline_params import config_to_params
    from nacd.report import format_table, read_scores

    cfg = _absolute_local_root(cfg)
    pipeline_root = Path(root or (cfg.storage.root if not cfg.storage.root.startswith("s3://")
                                  else DEFAULT_RUNS)).resolve()
    module = _pipeline_module()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())

    # kfp.local's own cache (kfp 2.17: key = component, image, command, input values and
    # input artifact URIs); cached outputs keep their URIs, so unchanged downstream steps hit too.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               enable_caching=True, raise_on_error=True)
    tasks = _TaskLog()
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addFilter(tasks)
    root_logger.setLevel(logging.INFO)
    if not quiet and not any(isinstance(h, logging.StreamHandler) and h.stream is sys.stderr
                             for h in root_logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(lambda r: r.levelno >= logging.WARNING or "cache hit" in r.getMessage())
        console.setFormatter(logging.Formatter("%(asctime)s - %(message)s", "%H:%M:%S"))
        root_logger.addHandler(console)
    else:
        console = None
    start = time.time()
    try:
        with warnings.catch_warnings():
            # Locally every component runs in this environment, not its image, and GPU
            # requests are cluster-only: kfp.local's warnings about both are expected.
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
            module.build_pipeline(gpus=False)(**config_to_params(cfg))
    except RuntimeError as e:
        # kfp.local's message names the innermost loop iterations; the task that failed (its
        # traceback is in the streamed log above) is what the user needs.
        if tasks.failed:
            raise CliError(f"step '{tasks.failed[0]}' failed (its log is above); run folders "
                           f"under {pipeline_root}") from e
        raise CliError(_ANSI.sub("", str(e)).splitlines()[0]) from e
    finally:
        root_logger.removeFilter(tasks)
        if console is not None:
            root_logger.removeHandler(console)
        root_logger.setLevel(old_level)

    new = sorted((p for p in set(pipeline_root.iterdir()) - before if p.is_dir()),
                 key=lambda p: p.stat().st_mtime)
    if not new:
        raise CliError(f"kfp.local made no run folder under {pipeline_root}")
    run_dir = new[-1]
    report = run_dir / "report" / "bundle" / "report.html"
    if not report.is_file():
        raise CliError(f"the run finished but wrote no report at {report}")
    rows = read_scores([report.parent / "scores.json"])
    table = format_table(rows)
    return {"run_dir": str(run_dir), "report": str(report), "table": table,
            "rows": [r.__dict__ for r in rows], "executed": tasks.executed,
            "cached": tasks.cached, "wall_s": round(time.time() - start, 1)}


def cmd_run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.config, args.set, args.data_dir)
    result = run_local(cfg, root=args.root)
    print(f"\nsteps executed: {len(result['executed'])}, from cache: {len(result['cached'])}, "
          f"wall time {result['wall_s']} s")
    print("\n" + result["table"])
    print(f"\nreport: {result['report']}")
    return 0


# --------------------------------------------------------------------------- nacd step
def _step_prepare(cfg, a):
    from nacd.data.prepare import prepare_data

    return prepare_data(cfg, a.out)


def _step_train_experts(cfg, a):
    from nacd.experts import train_experts

    return train_experts(cfg, a.dataset, a.out, a.expert_index)


def _step_select_seeds(cfg, a):
    from nacd.selection.seeds import select_seeds

    return select_seeds(cfg, a.dataset, a.out, less_dir=a.variant_dir)


def _step_distill(cfg, a):
    from nacd.distill.run import distill

    return distill(cfg, a.dataset, a.seeds, a.store, a.out)


def _step_project(cfg, a):
    from nacd.projection import project_ids

    return project_ids(cfg, a.synthetic, a.out)


def _step_random(cfg, a):
    from nacd.selection.random import select_random

    return select_random(cfg, a.dataset, a.out)


def _step_less(cfg, a):
    from nacd.selection.less import select_less

    return select_less(cfg, a.dataset, a.out)


def _step_full(cfg, a):
    from nacd.data.variants import full_variant

    return full_variant(a.dataset, a.out)


def _step_evaluate(cfg, a):
    from nacd.evaluation.run import evaluate
    from nacd.pipeline_params import write_json

    rows = evaluate(cfg, a.target, a.variant, a.variant_dir, a.out)
    write_json(Path(a.out) / "scores.json", rows)
    return {"rows": len(rows)}


def _step_report(cfg, a):
    from nacd.report import write_report

    return {"report": write_report(a.scores, a.out)}


STEPS: dict[str, Callable] = {
    "prepare-data": _step_prepare, "train-experts": _step_train_experts,
    "select-seeds": _step_select_seeds, "distill": _step_distill, "project-ids": _step_project,
    "select-random": _step_random, "select-less": _step_less, "full-variant": _step_full,
    "evaluate": _step_evaluate, "report": _step_report,
}


# Inputs each step needs, checked before any import or write.
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "prepare-data": (), "train-experts": ("dataset",), "select-seeds": ("dataset",),
    "distill": ("dataset", "seeds", "store"), "project-ids": ("synthetic",),
    "select-random": ("dataset",), "select-less": ("dataset",), "full-variant": ("dataset",),
    "evaluate": ("target", "variant"), "report": ("scores",),
}


def cmd_step(args: argparse.Namespace) -> int:
    missing = [f"--{n.replace('_', '-')}" for n in STEP_INPUTS[args.name]
               if getattr(args, n) in (None, [])]
    if missing:
        raise CliError(f"nacd step {args.name} needs {', '.join(missing)}")
    cfg = resolve_config(args.config, args.set, args.data_dir)
    summary = STEPS[args.name](cfg, args)
    text = json.dumps(summary, indent=2, default=str)
    if args.summary:
        Path(args.summary).write_text(text)
    print(text)
    return 0


# --------------------------------------------------------------------------- evaluate / compile / submit
def cmd_evaluate(args: argparse.Namespace) -> int:
    from nacd.evaluation.run import evaluate_model

    result = evaluate_model(model=args.model, adapter=args.adapter, benchmark=args.benchmark,
                            split=args.split, data_dir=args.data_dir, shots=args.shots,
                            limit=args.limit, batch_size=args.batch_size, method=args.method,
                            json_out=args.json, max_logits_gib=args.max_logits_gib)
    acc = result.get("acc") if isinstance(result, dict) else None
    print(f"{args.benchmark} {args.split}: acc = {acc:.4f}" if isinstance(acc, float)
          else json.dumps(result, indent=2, default=str))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    module = _pipeline_module()
    path = module.compile_pipeline(args.output, s3_secret=args.s3_secret)
    print(f"wrote {path}")
    return 0


def submit_arguments(config: str | None, params: Sequence[str], data_dir: str | None = None) -> dict:
    """Pipeline arguments for a cluster run: a config file (optional) plus ``--param`` overrides."""
    from nacd.pipeline_params import config_to_params

    cfg = resolve_config(config, params, data_dir) if config else load_config(None, list(params))
    return config_to_params(cfg)


def cmd_submit(args: argparse.Namespace) -> int:
    import tempfile

    import kfp

    arguments = submit_arguments(args.config, args.param)
    arguments.update({k: v for k, v in (("accelerator", args.accelerator),
                                        ("gpus_per_expert", args.gpus_per_expert),
                                        ("gpus_per_step", args.gpus_per_step)) if v is not None})
    module = _pipeline_module()
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or module.compile_pipeline(str(Path(tmp) / "nacd_pipeline.yaml"),
                                                          s3_secret=args.s3_secret)
        client = kfp.Client(host=args.host, namespace=args.namespace)
        run = client.create_run_from_pipeline_package(
            package, arguments=arguments, experiment_name=args.experiment,
            run_name=args.run_name, enable_caching=True)
    print(f"submitted run {run.run_id} to {args.host} (experiment {args.experiment})")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    import tempfile

    module = _pipeline_module()
    package = Path(args.package)
    if not package.is_file():
        raise CliError(f"--package: file not found: {package}")
    try:
        tolerations = json.loads(args.tolerations) if args.tolerations else []
    except json.JSONDecodeError as e:
        raise CliError(f"--tolerations: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
        raise CliError("--tolerations: expected a JSON list of toleration objects")
    try:
        ir_text = package.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"--package {package}: not a compiled nacd pipeline (not UTF-8 text)") from None
    text = module.customize_ir(ir_text, args.param, tolerations, origin=str(package))
    with tempfile.TemporaryDirectory() as tmp:
        final = Path(tmp) / "nacd_pipeline.yaml"
        final.write_text(text)
        if args.dry_run:
            print(text)
            return 0
        made = module.upload(args.host, str(final), args.pipeline_name, args.version)
    print(f"uploaded {made} to {args.host}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nacd", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp):
        sp.add_argument("--config", help="run config YAML (default: configs/quickstart.yaml)")
        sp.add_argument("--data-dir", help="local folder laid out like shared/data (offline)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. distill.iterations=20")

    r = sub.add_parser("run", help="run the whole pipeline locally through kfp.local")
    config_args(r)
    r.add_argument("--root", help="pipeline root (default: storage.root, ./nacd-runs)")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("step", help="run one stage by hand (no KFP)")
    s.add_argument("name", choices=sorted(STEPS))
    config_args(s)
    s.add_argument("--out", required=True, help="output folder (or store URI for train-experts)")
    s.add_argument("--dataset", help="tokenised dataset folder (prepare-data output)")
    s.add_argument("--seeds", help="select-seeds output folder")
    s.add_argument("--store", help="trajectory store URI (folder or s3://...)")
    s.add_argument("--synthetic", help="distill output folder")
    s.add_argument("--expert-index", type=int, help="train only this expert")
    s.add_argument("--target", help="evaluate: target model")
    s.add_argument("--variant", help="evaluate: data variant name")
    s.add_argument("--variant-dir", help="evaluate: variant dataset folder (omit for 'none'); "
                                         "select-seeds with seed_selection.method=less: the select-less output")
    s.add_argument("--scores", nargs="*", default=[], help="report: scores.json files")
    s.add_argument("--summary", help="also write the step's JSON summary here")
    s.set_defaults(func=cmd_step)

    e = sub.add_parser("evaluate", help="score a model (optionally with a LoRA adapter)")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter")
    e.add_argument("--benchmark", required=True, choices=["arc_easy", "mmlu"])
    e.add_argument("--split", default="validation")
    e.add_argument("--data-dir")
    e.add_argument("--shots", type=int, default=0)
    e.add_argument("--limit", type=int)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-logits-gib", type=float, default=MAX_LOGITS_GIB,
                   help="shrink the batch where its logits would take more (large vocabularies, long prompts)")
    e.add_argument("--method", choices=["lm_eval", "direct"], default="lm_eval",
                   help="lm_eval: the harness's tasks; direct: nacd's scorer, the output layer only where scored")
    e.add_argument("--json", help="write the result JSON here")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compile", help="write the KFP pipeline IR YAML")
    c.add_argument("-o", "--output", default="nacd_pipeline.yaml")
    c.add_argument("--s3-secret", default="nacd-s3", help="Kubernetes Secret with S3 credentials")
    c.set_defaults(func=cmd_compile)

    u = sub.add_parser("submit", help="upload and run the pipeline on a Kubeflow Pipelines host")
    u.add_argument("--host", required=True)
    u.add_argument("--experiment", required=True)
    u.add_argument("--run-name")
    u.add_argument("--namespace")
    u.add_argument("--config", help="run config YAML whose values become the run's parameters")
    u.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. distill.iterations=200 or budget=0.05")
    u.add_argument("--package", help="submit this compiled YAML instead of compiling")
    u.add_argument("--s3-secret", default="nacd-s3")
    u.add_argument("--accelerator")
    u.add_argument("--gpus-per-expert", type=int)
    u.add_argument("--gpus-per-step", type=int)
    u.set_defaults(func=cmd_submit)

    up = sub.add_parser("upload", help="upload a compiled pipeline as a new version (Helm hook)")
    up.add_argument("--host", required=True)
    up.add_argument("--package", required=True, help="compiled pipeline YAML")
    up.add_argument("--pipeline-name", default="nacd")
    up.add_argument("--version", required=True,
                    help="version name, e.g. the chart revision (KFP names a new pipeline's first "
                         "version after the pipeline)")
    up.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="default of the uploaded version, e.g. storage.root=s3://bucket/nacd")
    up.add_argument("--tolerations", help="JSON list of tolerations added to the GPU tasks")
    up.add_argument("--dry-run", action="store_true", help="print the customised YAML instead")
    up.set_defaults(func=cmd_upload)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("nacd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        msg = _ANSI.sub("", str(e)).strip().splitlines()
        print(f"nacd: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
