"""The Helm chart, linted strictly and rendered offline with helm-python-sdk (Helm's Go SDK)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "nacd"


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory) -> Path:
    """A copy of the chart with a freshly compiled pipeline in files/ (what CI packages)."""
    dst = tmp_path_factory.mktemp("chart") / "nacd"
    shutil.copytree(CHART, dst)
    proc = subprocess.run([sys.executable, "-m", "nacd.cli", "compile", "-o",
                           str(dst / "files" / "nacd_pipeline.yaml")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dst


def _values(name: str | None) -> dict | None:
    return None if name is None else yaml.safe_load((CHART / "ci" / name).read_text())


def _render(chart_dir: Path, values: dict | None, revision: int = 3) -> dict[str, dict]:
    chart = helm.Chart.load(chart_dir)
    out = chart.render(values, name="demo", namespace="kubeflow", revision=revision,
                       is_upgrade=revision > 1)
    docs = {}
    for path, text in out.items():
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.mark.parametrize("values_file", [None, "minio-values.yaml", "aws-values.yaml"])
def test_lint_strict(chart_dir, values_file):
    report = helm.lint(chart_dir, _values(values_file), strict=True)
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


def test_default_render(chart_dir):
    docs = _render(chart_dir, None)
    assert "Secret/nacd-s3" not in docs, "existing Secret by default: the chart must not make one"
    cm = docs["ConfigMap/demo-nacd-pipeline"]
    compiled = (chart_dir / "files" / "nacd_pipeline.yaml").read_text()
    assert cm["data"]["nacd_pipeline.yaml"].strip() == compiled.strip()
    job = docs["Job/demo-nacd-upload-r3"]
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "post-install,post-upgrade"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/nacd-project/nacd:0.1.0"
    assert container["command"] == ["nacd", "upload"]
    args = container["args"]
    assert "--version=demo-r3" in args
    assert "--param=storage.root=s3://nacd/runs" in args
    assert "--param=gpus_per_expert=1" in args
    assert pod["volumes"][0]["configMap"]["name"] == "demo-nacd-pipeline"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_minio_values_make_the_secret_and_tolerations(chart_dir):
    docs = _render(chart_dir, _values("minio-values.yaml"))
    secret = docs["Secret/nacd-s3"]
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "minio", "AWS_SECRET_ACCESS_KEY": "minio123",
                                    "AWS_ENDPOINT_URL": "http://minio.kubeflow.svc.cluster.local:9000"}
    args = docs["Job/demo-nacd-upload-r3"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--param=storage.endpoint_url=http://minio.kubeflow.svc.cluster.local:9000" in args
    assert "--param=storage.root=s3://mlpipeline/nacd" in args
    assert "--param=gpus_per_expert=2" in args
    tol = [a for a in args if a.startswith("--tolerations=")]
    assert json.loads(tol[0].split("=", 1)[1]) == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]


def test_aws_values_image_and_existing_secret(chart_dir):
    docs = _render(chart_dir, _values("aws-values.yaml"))
    assert not any(k.startswith("Secret/") for k in docs)
    container = docs["Job/demo-nacd-upload-r3"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/nacd:0.1.0-cuda"
    assert "--version=v0.1.0" in container["args"]
    assert "--pipeline-name=nacd-prod" in container["args"]
    assert "--param=storage.root=s3://team-nacd" in container["args"]
    assert not any(a.startswith("--param=storage.endpoint_url") for a in container["args"])
    # The Secret the compiled pipeline reads is the one these values name.
    platform = list(yaml.safe_load_all((chart_dir / "files" / "nacd_pipeline.yaml").read_text()))[1]
    names = {s["secretNameParameter"]["runtimeValue"]["constant"]
             for e in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
             for s in e.get("secretAsEnv", [])}
    assert names == {"nacd-s3"}


def test_upload_args_produce_a_valid_customised_pipeline(chart_dir, tmp_path):
    """The hook's exact arguments, run through `nacd upload --dry-run`."""
    docs = _render(chart_dir, _values("minio-values.yaml"))
    args = docs["Job/demo-nacd-upload-r3"]["spec"]["template"]["spec"]["containers"][0]["args"]
    args = [a.replace("/pipeline/", str(chart_dir / "files") + "/") for a in args]
    proc = subprocess.run([sys.executable, "-m", "nacd.cli", "upload", *args, "--dry-run"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    spec, platform = list(yaml.safe_load_all(proc.stdout))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["storage"]["defaultValue"]["root"] == "s3://mlpipeline/nacd"
    assert params["gpus_per_expert"]["defaultValue"] == 2
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert execs["exec-train-experts"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "tolerations" not in execs.get("exec-prepare-data", {})


def test_secret_required_fields(chart_dir):
    with pytest.raises(helm.HelmError, match="s3.accessKeyId is required"):
        _render(chart_dir, {"s3": {"create": True}})


def test_missing_compiled_pipeline_fails_clearly(tmp_path):
    dst = tmp_path / "nacd"
    shutil.copytree(CHART, dst)
    (dst / "files" / "nacd_pipeline.yaml").unlink(missing_ok=True)
    with pytest.raises(helm.HelmError, match="nacd compile -o charts/nacd/files"):
        _render(dst, None)


def test_upload_names_what_it_made(monkeypatch, tmp_path):
    """No KFP server here: a recording client stands in for kfp.Client to check which API call each
    case makes (a first upload cannot name its version) and that the log line says so."""
    import kfp

    from pipelines import nacd_pipeline

    calls = []

    class RecordingClient:
        def __init__(self, host):
            self.known = host.endswith("known")

        def get_pipeline_id(self, name):
            return "pid-1" if self.known else None

        def upload_pipeline(self, package, pipeline_name, description):
            calls.append(("upload_pipeline", pipeline_name))
            return SimpleNamespace(pipeline_id="pid-new")

        def upload_pipeline_version(self, package, pipeline_version_name, pipeline_id):
            calls.append(("upload_pipeline_version", pipeline_version_name, pipeline_id))
            return SimpleNamespace(pipeline_version_id="vid-2")

    monkeypatch.setattr(kfp, "Client", RecordingClient)
    first = nacd_pipeline.upload("http://fresh", "p.yaml", "nacd", "demo-r1")
    later = nacd_pipeline.upload("http://known", "p.yaml", "nacd", "demo-r2")
    assert calls == [("upload_pipeline", "nacd"), ("upload_pipeline_version", "demo-r2", "pid-1")]
    assert "new pipeline nacd (pid-new)" in first and "demo-r1" not in first
    assert later == "nacd version demo-r2 (vid-2)"
