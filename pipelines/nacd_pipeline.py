"""The nacd DAG (DESIGN.md "Stages and the DAG"), compiled for a cluster or run by kfp.local.

check_config -> prepare_data -> train_experts (ParallelFor over expert seeds) -> distill -> project_ids
                             -> select_less -> select_seeds --------------------^
                             -> select_random, select_less, full_variant
every variant -> evaluate (ParallelFor over targets, per variant) -> report

Pipeline parameters: ``name``, ``budget`` and one dict per config section, defaults from
``nacd.config`` (see ``nacd.pipeline_params``), plus the GPU settings of the GPU steps.
S3 credentials come from a Kubernetes Secret (``s3_secret``) on the cluster and from the
standard AWS environment locally; they are never parameters.
"""

from kfp import dsl, kubernetes

from components import stages as c
from nacd.pipeline_params import default_params

PIPELINE_NAME = "nacd"
DEFAULT_S3_SECRET = "nacd-s3"
# Secret data key -> environment variable read by boto3 / pyarrow inside the steps. The endpoint
# (optional, for MinIO) is what `s3://` model and data URIs are read from: the steps that load
# them are not given the `storage` section, whose endpoint_url is for the run's store.
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                  "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}
GPU_TASKS = ("train-experts", "distill", "select-less", "evaluate")
SHM_SIZE = "16Gi"

_D = default_params()


def _on_gpu(task: dsl.PipelineTask, accelerator: str, count, enabled: bool = True) -> dsl.PipelineTask:
    """GPUs from parameters, and a RAM-backed /dev/shm (NCCL and DataLoader workers need more
    than the container default of 64 MiB)."""
    if not enabled:
        return task
    task.set_accelerator_type(accelerator).set_accelerator_limit(count)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=SHM_SIZE)
    return task


def _with_s3(task: dsl.PipelineTask, secret: str) -> dsl.PipelineTask:
    """For every step that may read S3: the store, or an `s3://` model or data source."""
    # optional: a run against a local-folder store needs no Secret at all.
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=S3_SECRET_KEYS,
                                 optional=True)
    return task


def build_pipeline(s3_secret: str = DEFAULT_S3_SECRET, gpus: bool = True):
    """The pipeline function; ``s3_secret`` names the Kubernetes Secret with S3 credentials.

    ``gpus=False`` (the kfp.local run) leaves out the accelerator requests: they are no-ops
    locally, and kfp 2.17's local runner cannot resolve a resource placeholder that refers to a
    pipeline parameter inside a ParallelFor body."""

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Neighbour-aware corpus distillation: experts, trajectory "
                              "matching, ID projection, baselines, per-architecture evaluation.")
    def nacd_pipeline(
        name: str = _D["name"],
        budget: float = _D["budget"],
        storage: dict = _D["storage"],
        data: dict = _D["data"],
        source: dict = _D["source"],
        experts: dict = _D["experts"],
        seed_selection: dict = _D["seed_selection"],
        distill: dict = _D["distill"],
        selection: dict = _D["selection"],
        evaluation: dict = _D["evaluation"],
        accelerator: str = "nvidia.com/gpu",
        gpus_per_expert: int = 1,
        gpus_per_step: int = 1,
    ):
        # Checks that need the whole config (budget against the pool, LESS targets against the
        # evaluation set) fail the run here, before any step that reads data starts.
        check = c.check_config(name=name, budget=budget, storage=storage, data=data, source=source,
                               experts=experts, seed_selection=seed_selection, distill=distill,
                               selection=selection, evaluation=evaluation)
        check.set_display_name("check config")
        prep = c.prepare_data(data=data, source=source).set_display_name("prepare data").after(check)
        _with_s3(prep, s3_secret)
        dataset = prep.outputs["dataset"]

        plan = c.expert_indices(experts=experts).set_display_name("plan experts").after(check)
        with dsl.ParallelFor(plan.output, name="experts") as index:
            expert = c.train_experts(source=source, experts=experts, storage=storage,
                                     expert_index=index, num_gpus=gpus_per_expert,
                                     dataset=dataset).set_display_name("train expert")
            _with_s3(_on_gpu(expert, accelerator, gpus_per_expert, gpus), s3_secret)

        rand = c.select_random(budget=budget, selection=selection, dataset=dataset)
        less = c.select_less(budget=budget, source=source, selection=selection, data=data,
                             num_gpus=gpus_per_step, dataset=dataset)
        _with_s3(_on_gpu(less, accelerator, gpus_per_step, gpus), s3_secret)
        full = c.full_variant(dataset=dataset)

        # The seeds may be LESS's rows (seed_selection.method is a run parameter, so the edge is
        # always there): distill waits for select_less, which runs beside the longer experts. Cost:
        # a changed `selection` re-runs select_seeds and so distill even with method=random (the
        # cache keys on the input artifact). A dsl.If on the method, joined by dsl.OneOf, would avoid
        # it on a cluster, but kfp.local (2.17) cannot resolve an artifact OneOf ("Expected 1
        # artifact in ArtifactSelectorSpec. Got: 2"), and the laptop run must be the same DAG.
        seeds = c.select_seeds(budget=budget, seed_selection=seed_selection, dataset=dataset,
                               less_variant=less.outputs["variant"])
        dist = c.distill(budget=budget, source=source, distill=distill, storage=storage,
                         num_gpus=gpus_per_step, dataset=dataset, seeds=seeds.outputs["seeds"],
                         stores=dsl.Collected(expert.outputs["store"]))
        _with_s3(_on_gpu(dist, accelerator, gpus_per_step, gpus), s3_secret)
        proj = c.project_ids(source=source, distill=distill, synthetic=dist.outputs["synthetic"])
        _with_s3(proj, s3_secret)

        variant_data = {"distilled": proj.outputs["distilled"], "random": rand.outputs["variant"],
                        "less": less.outputs["variant"], "full": full.outputs["variant"],
                        "none": None}
        collected = {}
        for variant, artifact in variant_data.items():
            items = c.eval_plan(evaluation=evaluation, data=data, variant=variant)
            items.set_display_name(f"plan {variant}").after(check)
            with dsl.ParallelFor(items.output, name=f"evaluate-{variant}") as item:
                kwargs = {} if artifact is None else {"variant_data": artifact}
                ev = c.evaluate(item=item, num_gpus=gpus_per_step, **kwargs)
                ev.set_display_name(f"evaluate {variant}")
                _with_s3(_on_gpu(ev, accelerator, gpus_per_step, gpus), s3_secret)
            collected[variant] = dsl.Collected(ev.outputs["scores"])

        rep = c.report(**collected).set_display_name("report")
        rep.set_caching_options(False)  # always re-rendered from the current scores

    return nacd_pipeline


def compile_pipeline(path: str, s3_secret: str = DEFAULT_S3_SECRET) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(s3_secret), package_path=path)
    return path


# --------------------------------------------------------------------------- deploy-time edits
RUN_SETTINGS = ("accelerator", "gpus_per_expert", "gpus_per_step")


def customize_ir(ir_text: str, params: list[str], tolerations: list[dict] | None = None,
                 origin: str = "the pipeline") -> str:
    """A compiled pipeline with site settings applied, as the Helm hook uploads it.

    ``params`` (``storage.root=s3://b/p``, ``gpus_per_expert=4`` ...) become the defaults of the
    uploaded version, validated against the config schema; ``tolerations`` are added to every
    GPU task (Kubernetes toleration dicts)."""
    import yaml

    from nacd.config import ConfigError
    from nacd.pipeline_params import params_from_overrides

    try:
        docs = list(yaml.safe_load_all(ir_text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not a compiled nacd pipeline (not YAML: {str(e).splitlines()[0]})") from None
    try:
        spec = docs[0]
        inputs = spec["root"]["inputDefinitions"]["parameters"]
        spec["deploymentSpec"]["executors"]
    except (IndexError, KeyError, TypeError):
        raise ConfigError(f"{origin}: not a compiled nacd pipeline (no root.inputDefinitions.parameters "
                          f"or deploymentSpec.executors); make one with `nacd compile`") from None
    if missing := [k for k in (*RUN_SETTINGS, "storage", "distill") if k not in inputs]:
        raise ConfigError(f"{origin}: not a compiled nacd pipeline: parameter(s) {missing} missing")
    run_items = [p for p in params if p.split("=", 1)[0] in RUN_SETTINGS]
    config_items = [p for p in params if p not in run_items]
    current = {k: v["defaultValue"] for k, v in inputs.items() if k not in RUN_SETTINGS}
    for key, value in params_from_overrides(config_items, base=current).items():
        inputs[key]["defaultValue"] = value
    for item in run_items:
        key, raw = item.split("=", 1)
        if key != "accelerator" and not (raw.isdigit() and int(raw) > 0):
            raise ConfigError(f"--param {item!r}: {key} is a positive whole number of GPUs")
        inputs[key]["defaultValue"] = raw if key == "accelerator" else int(raw)
    if tolerations:
        if len(docs) < 2:
            docs.append({"platforms": {"kubernetes": {"deploymentSpec": {"executors": {}}}}})
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for label in spec["deploymentSpec"]["executors"]:
            if label.removeprefix("exec-").rstrip("-0123456789") in GPU_TASKS:
                executors.setdefault(label, {}).setdefault("tolerations", []).extend(
                    dict(t) for t in tolerations)
    return yaml.safe_dump_all(docs, sort_keys=False)


def upload(host: str, package: str, pipeline_name: str, version: str,
           description: str = "") -> str:
    """Upload ``package`` as version ``version`` of ``pipeline_name``; returns what was made, for
    the log. The first upload creates the pipeline, and KFP names that first version after the
    pipeline: ``version`` names the later ones."""
    import kfp

    client = kfp.Client(host=host)
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(package, pipeline_name=pipeline_name,
                                          description=description)
        return f"new pipeline {pipeline_name} ({pipeline.pipeline_id}), first version named after it"
    result = client.upload_pipeline_version(package, pipeline_version_name=version,
                                            pipeline_id=pipeline_id)
    return f"{pipeline_name} version {version} ({result.pipeline_version_id})"
