"""The nacd CLI: bad config -> one clear line naming the key, non-zero exit, no run folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def nacd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nacd.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("content, override, needle", [
    ("distill:\n  iterationz: 3\n", [], "unknown key 'distill.iterationz'"),
    ("experts:\n  lr: fast\n", [], "'experts.lr'"),
    ("budget: 500\ndata:\n  sources: [{name: arc_easy, max_rows: 20}]\n", [],
     "budget: 500 samples asked but the pool has only 20"),
    ("budget: 0.01\ndata:\n  pool_size: 30\n", [], "selects no sample"),
    ("name: ok\n", ["--set", "distill.beta=-1"], "'distill.beta'"),
    ("name: ok\n", ["--data-dir", "/nonexistent/data"], "--data-dir: folder not found"),
    ("selection:\n  less: {target_benchmark: arc_easy, target_split: validation}\n", [],
     "selection.less.target_split"),
])
def test_bad_config_is_one_line_and_makes_no_run_folder(tmp_path, content, override, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(content)
    proc = nacd("run", "--config", str(cfg), *override, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nacd: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nacd-runs").exists()


def test_missing_config_file(tmp_path):
    proc = nacd("run", "--config", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "nacd: error: config file not found: nope.yaml"
    assert not (tmp_path / "nacd-runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = nacd("--debug", "run", "--config", "nope.yaml", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_step_needs_its_inputs(tmp_path):
    proc = nacd("step", "distill", "--config", str(REPO / "configs" / "tiny.yaml"),
                "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "needs --dataset, --seeds, --store" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_submit_arguments_from_config_and_params():
    from nacd.cli import submit_arguments

    args = submit_arguments(str(REPO / "configs" / "opt-to-llama.yaml"),
                            ["distill.iterations=20", "storage.root=s3://b/p"])
    assert args["distill"]["iterations"] == 20
    assert args["storage"]["root"] == "s3://b/p"
    assert args["source"]["name"] == "facebook/opt-1.3b"
    assert args["budget"] == 0.05
    from nacd.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'distill.nope'"):
        submit_arguments(None, ["distill.nope=1"])


def test_library_does_not_import_kfp():
    code = ("import sys, nacd.cli, nacd.pipeline_params, nacd.report, nacd.config; "
            "print('kfp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_submit_and_compile_need_neither_torch_nor_numpy(tmp_path):
    """The CI job that submits a run installs only kfp, pydantic and PyYAML: the config's checks
    (budget, LESS targets against the evaluation set) and compiling must not need the ML stack."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'numpy', 'transformers', 'datasets', 'pyarrow'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from nacd.cli import main, submit_arguments
args = submit_arguments('configs/opt-to-llama.yaml', ['storage.root=s3://b/p'])
assert args['storage']['root'] == 's3://b/p'
sys.exit(main(['compile', '-o', {str(tmp_path / 'p.yaml')!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "p.yaml").is_file()


def test_a_step_refuses_an_out_folder_it_did_not_write(tmp_path, shared_data):
    """`--out` naming a user's folder: exit 1 naming it, and its files kept (a stage's rerun
    replaces only its own earlier output)."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    proc = nacd("step", "prepare-data", "--config", str(REPO / "configs" / "tiny.yaml"),
                "--data-dir", str(shared_data), "--out", str(user), cwd=tmp_path)
    assert proc.returncode == 1
    assert str(user) in proc.stderr and "choose another output path" in proc.stderr
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_upload_names_each_bad_input(tmp_path, capsys):
    from nacd.cli import main

    package = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(package)]) == 0
    upload = ["upload", "--host", "http://unused", "--version", "v1", "--dry-run"]
    (tmp_path / "notes.txt").write_text("a: b: c\n")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00")
    cases = [
        (["--package", str(tmp_path / "notes.txt")], f"{tmp_path / 'notes.txt'}: not a compiled nacd pipeline (not YAML"),
        (["--package", str(tmp_path / "blob.bin")], f"--package {tmp_path / 'blob.bin'}: not a compiled nacd pipeline"),
        (["--package", str(package), "--param", "distill.iterations=[1,"],
         "--param 'distill.iterations=[1,': the value is not valid YAML"),
        (["--package", str(REPO / "configs" / "quickstart.yaml")],
         f"{REPO / 'configs' / 'quickstart.yaml'}: not a compiled nacd pipeline"),
        (["--package", str(package), "--tolerations", "{bad"], "--tolerations: not valid JSON"),
        (["--package", str(package), "--tolerations", "[1]"], "--tolerations: expected a JSON list of toleration objects"),
        (["--package", str(package), "--param", "gpus_per_expert=abc"],
         "--param 'gpus_per_expert=abc': gpus_per_expert is a positive whole number of GPUs"),
        (["--package", str(package), "--param", "distil.iterations=3"], "--param: unknown key 'distil'"),
        (["--package", str(package), "--param", "distill.iterations=0"], "--param: 'distill.iterations'"),
    ]
    capsys.readouterr()
    for extra, needle in cases:
        assert main(upload + extra) == 1, extra
        err = capsys.readouterr().err
        assert needle in err, (extra, err)
    assert main(upload + ["--package", str(package), "--param", "distill.iterations=7"]) == 0
    assert "iterations: 7" in capsys.readouterr().out
