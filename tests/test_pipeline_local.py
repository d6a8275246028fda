"""The whole DAG through kfp.local on tiny models and real ARC-Easy rows, via the `nacd` CLI:
a distilled dataset, scores for every (target, variant), the report; a second identical run
executes only the (never cached) report; a changed distill setting re-runs only distill and what
follows; a single step re-run by hand reproduces the pipeline's output."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nacd.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


def nacd(*args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nacd.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    report = Path(re.search(r"^report: (.+)$", proc.stdout, re.M).group(1))
    assert report.is_file() and report.name == "report.html"
    return report.parents[2]  # <run>/report/bundle/report.html


def executed_dirs(run_dir: Path) -> tuple[set[str], list[str]]:
    """Task folders kfp.local made in this run (a cached task makes none): plain tasks and
    loop iterations."""
    names = [p.name for p in run_dir.iterdir() if p.is_dir()]
    return {n for n in names if "-iteration-" not in n}, sorted(n for n in names if "-iteration-" in n)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shared_data):
    work = tmp_path_factory.mktemp("e2e")
    proc = nacd("run", "--config", str(TINY), "--data-dir", str(shared_data), "--root",
                str(work / "runs"), cwd=work)
    return work, proc, run_dir_of(proc)


def test_first_run_produces_everything(first_run):
    work, proc, run_dir = first_run
    cfg = load_config(TINY)
    distilled = [json.loads(line) for line in
                 (run_dir / "project-ids" / "distilled" / "data.jsonl").read_text().splitlines()]
    assert len(distilled) == int(cfg.budget)
    for row in distilled:
        assert row["text"] == row["prompt"] + row["response"]
        assert len(row["projected_ids"]) == cfg.distill.prompt_len
    rows = json.loads((run_dir / "report" / "bundle" / "scores.json").read_text())
    cells = {(r["target"], r["variant"]) for r in rows}
    assert cells == {(t, v) for t in cfg.evaluation.targets for v in cfg.evaluation.variants}
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and r["n"] == cfg.evaluation.benchmarks[0].limit
    # the printed table carries the same numbers
    for r in rows:
        assert f"{r['acc']:.4f}" in proc.stdout
    assert "from cache: 0" in proc.stdout
    assert (run_dir / "report" / "html").is_file()


def test_rerun_and_changed_distill(first_run, shared_data):
    work, first, first_dir = first_run
    again = nacd("run", "--config", str(TINY), "--data-dir", str(shared_data), "--root",
                 str(work / "runs"), cwd=work)
    plain, loops = executed_dirs(run_dir_of(again))
    assert plain == {"report"} and loops == [], (plain, loops)  # report is never cached
    assert re.search(r"steps executed: 1, from cache: [1-9]\d*", again.stdout)

    changed = nacd("run", "--config", str(TINY), "--data-dir", str(shared_data), "--root",
                   str(work / "runs"), "--set", "distill.iterations=4", cwd=work)
    plain, loops = executed_dirs(run_dir_of(changed))
    # check-config reads the whole config, so any change reruns it (seconds, and it must check it)
    assert plain == {"check-config", "distill", "project-ids", "report"}, plain
    targets = load_config(TINY).evaluation.targets
    assert len(loops) == len(targets) and len({name.split("-iteration-")[0] for name in loops}) == 1
    # the unchanged variants' scores are the first run's, the distilled ones were recomputed
    old = {(r["target"], r["variant"]): r for r in
           json.loads((first_dir / "report" / "bundle" / "scores.json").read_text())}
    new = {(r["target"], r["variant"]): r for r in
           json.loads((run_dir_of(changed) / "report" / "bundle" / "scores.json").read_text())}
    for key, row in new.items():
        if key[1] != "distilled":
            assert row == old[key]


def test_less_seeds_run_through_the_dag(first_run, shared_data):
    work, _, first_dir = first_run
    less = nacd("run", "--config", str(TINY), "--data-dir", str(shared_data), "--root",
                str(work / "runs"), "--set", "seed_selection.method=less", cwd=work)
    run_dir = run_dir_of(less)
    plain, _ = executed_dirs(run_dir)
    assert plain == {"check-config", "select-seeds", "distill", "project-ids", "report"}, plain
    picked = json.loads((run_dir / "select-seeds" / "seeds" / "seeds.json").read_text())
    less_ids = [json.loads(line)["id"] for line in
                (first_dir / "select-less" / "variant" / "data.jsonl").read_text().splitlines()]
    assert picked["method"] == "less" and sorted(picked["ids"]) == sorted(less_ids)


def test_single_step_rerun_reproduces_the_output(first_run, tmp_path, shared_data):
    work, _, run_dir = first_run
    out = tmp_path / "random"
    nacd("step", "select-random", "--config", str(TINY), "--data-dir", str(shared_data),
         "--dataset", str(run_dir / "prepare-data" / "dataset"), "--out", str(out), cwd=tmp_path)
    expected = (run_dir / "select-random" / "variant" / "data.jsonl").read_text()
    assert (out / "data.jsonl").read_text() == expected
