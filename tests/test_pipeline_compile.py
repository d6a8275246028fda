"""The compiled IR: every stage present, GPU/shm/secret settings on the right tasks, defaults
from the schema, and per-stage config inputs that keep KFP's cache right."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nacd.config import RunConfig, load_config
from nacd.pipeline_params import (STAGE_SECTIONS, config_from_sections, config_to_params,
                                  eval_items, stage_params)

REPO = Path(__file__).resolve().parents[1]
STAGES = ["check-config", "prepare-data", "expert-indices", "train-experts", "select-seeds", "distill",
          "project-ids", "select-random", "select-less", "full-variant", "eval-plan", "evaluate",
          "report"]


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ir") / "nacd_pipeline.yaml"
    proc = subprocess.run([sys.executable, "-m", "nacd.cli", "compile", "-o", str(out),
                           "--s3-secret", "my-s3"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 2, "pipeline spec + platform spec"
    return {"spec": docs[0], "platform": docs[1]}


def _tasks(spec: dict) -> dict[str, dict]:
    """Every container task in every DAG (root and loop bodies), by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return {n: t for n, t in tasks.items()
            if "executorLabel" in spec["components"][t["componentRef"]["name"]]}


def _executor_of(spec: dict, task: dict) -> dict:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]


def test_every_component_is_present(ir):
    names = {c.removeprefix("comp-").rstrip("-0123456789") for c in ir["spec"]["components"]}
    for stage in STAGES:
        assert stage in names, f"component {stage} missing from the IR"
    # the project image everywhere, no pip install of kfp at run time
    for ex in ir["spec"]["deploymentSpec"]["executors"].values():
        assert ex["container"]["image"].startswith("ghcr.io/nacd-project/nacd:")
        assert "pip install" not in " ".join(ex["container"]["command"])


def test_loops_over_experts_and_target_variant(ir):
    spec = ir["spec"]
    tasks = spec["root"]["dag"]["tasks"]
    bodies = {}
    for name, task in tasks.items():
        if "parameterIterator" in task:
            body = spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]
            source = task["parameterIterator"]["items"]["inputParameter"]
            bodies[name] = (sorted(b.rstrip("-0123456789") for b in body), source)
    assert sorted(b for b, _ in bodies.values()) == [["evaluate"]] * 5 + [["train-experts"]]
    # each evaluate loop iterates over the items of the eval-plan task of one variant
    planned = set()
    for name, (body, source) in bodies.items():
        if body == ["evaluate"]:
            producer = tasks[name]["inputs"]["parameters"][source]["taskOutputParameter"]["producerTask"]
            variant = tasks[producer]["inputs"]["parameters"]["variant"]["runtimeValue"]["constant"]
            planned.add(variant)
    assert planned == {"distilled", "random", "less", "full", "none"}


def test_seeds_can_be_less_rows_so_they_follow_select_less(ir):
    tasks = ir["spec"]["root"]["dag"]["tasks"]
    source = tasks["select-seeds"]["inputs"]["artifacts"]["less_variant"]["taskOutputArtifact"]
    assert source == {"producerTask": "select-less", "outputArtifactKey": "variant"}
    assert tasks["distill"]["inputs"]["artifacts"]["seeds"]["taskOutputArtifact"]["producerTask"] == "select-seeds"


def test_gpu_shm_and_secret_settings(ir):
    spec, platform = ir["spec"], ir["platform"]
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu_tasks = {"train-experts", "distill", "select-less", "evaluate"}
    seen, seen_secret = set(), set()
    for name, task in _tasks(spec).items():
        base = name.rstrip("-0123456789")
        ex = _executor_of(spec, task)
        resources = ex["container"].get("resources", {})
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        k8s = execs.get(label, {})
        if base in gpu_tasks:
            seen.add(base)
            acc = resources["accelerator"]
            assert "accelerator" in acc["resourceType"], acc
            assert "gpus_per" in acc["resourceCount"], acc  # from a pipeline parameter
            shm = k8s["emptyDirMounts"][0]
            assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
        else:
            assert "accelerator" not in resources, f"{name} should not ask for a GPU"
        # every step that may read S3 (the store, or an s3:// model or data source) gets the Secret
        if base in {"prepare-data", "train-experts", "distill", "project-ids", "select-less", "evaluate"}:
            secret = k8s["secretAsEnv"][0]
            assert secret["secretNameParameter"]["runtimeValue"]["constant"] == "my-s3"
            assert secret["optional"] is True, "a local-folder store needs no Secret"
            envs = {m["envVar"] for m in secret["keyToEnv"]}
            assert envs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
            seen_secret.add(base)
        else:
            assert "secretAsEnv" not in k8s, f"{name} reads no S3 and should not get the Secret"
    assert seen == gpu_tasks
    assert len(seen_secret) == 6


def test_parameters_have_schema_defaults_and_no_credentials(ir):
    params = ir["spec"]["root"]["inputDefinitions"]["parameters"]
    expected = config_to_params(RunConfig())
    for key, value in expected.items():
        assert params[key]["defaultValue"] == value, key
    assert config_from_sections(**{k: params[k]["defaultValue"] for k in expected}) == RunConfig()
    text = yaml.safe_dump(ir)
    assert "secret_access_key" not in text.lower().replace("aws_secret_access_key", "")


def test_report_is_never_cached(ir):
    tasks = ir["spec"]["root"]["dag"]["tasks"]
    assert not tasks["report"].get("cachingOptions", {}).get("enableCache", False)
    assert tasks["prepare-data"]["cachingOptions"]["enableCache"] is True


def test_changing_distill_changes_only_distill_inputs():
    base = load_config(REPO / "configs" / "tiny.yaml")
    changed = load_config(REPO / "configs" / "tiny.yaml", ["distill.iterations=7"])
    differing = {s for s in STAGE_SECTIONS if stage_params(base, s) != stage_params(changed, s)}
    assert differing == {"distill", "project_ids"}
    base = load_config(REPO / "configs" / "tiny.yaml", ["evaluation.targets=[tiny-llama, tiny-gemma3]"])
    more_targets = load_config(REPO / "configs" / "tiny.yaml",
                               ["evaluation.targets=[tiny-llama, tiny-gemma3, tiny-opt]"])
    for variant in ("random", "none"):
        old = eval_items(stage_params(base, "eval_plan")["evaluation"], {}, variant)
        new = eval_items(stage_params(more_targets, "eval_plan")["evaluation"], {}, variant)
        assert new[:2] == old, "existing (target, variant) items keep their value: cache hits"
        assert new[2]["target"] == "tiny-opt"


def test_unrequested_variant_is_a_single_skip_item():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["evaluation.variants=[none]",
                                                       "evaluation.targets=[tiny-llama, tiny-gemma3]"])
    params = config_to_params(cfg)
    assert eval_items(params["evaluation"], params["data"], "less") == [
        {"skip": True, "variant": "less"}]
    items = eval_items(params["evaluation"], params["data"], "none")
    assert [i["target"] for i in items] == ["tiny-llama", "tiny-gemma3"]


def test_the_first_step_runs_the_whole_config_checks():
    """A run started from the KFP UI never passes through the CLI: the pipeline's check-config
    step refuses what the CLI refuses, on the whole config (the select-less step alone cannot
    see the evaluation set)."""
    from components import stages as c
    from nacd.config import ConfigError
    from nacd.pipeline_params import params_from_overrides

    check = c.check_config.python_func
    check(**params_from_overrides([]))
    leak = params_from_overrides(["selection.less.target_split=validation"])
    with pytest.raises(ConfigError, match=r"evaluation.benchmarks\[0\]"):
        check(**leak)
    # the same LESS targets, scored on MMLU only, leak nothing
    check(**params_from_overrides(["selection.less.target_split=validation",
                                   "evaluation.benchmarks=[{name: mmlu, split: val}]"]))
    with pytest.raises(ConfigError, match="budget"):
        check(**params_from_overrides(["budget=500", "data.pool_size=100"]))
