"""Pack what bench/quality_gpu.sh needs on a GPU host that has no registry and no model hub, in
parts that a size-capped transfer carries one at a time.

    python bench/gpu_bundle.py OUT_DIR --data-dir ../shared/data [--part-mib 58 --first-part-mib 32]

writes

    OUT_DIR/host.tar.xz      whl/ (bench/gpu_wheels.txt, fetched for the host's Python), data/ (the
                             --data-dir folder) and tok/ (the source model's tokenizer and config):
                             enough for a smoke run of every stage on the tiny models
    OUT_DIR/models.part-NN   models.tar.xz cut in parts: the two GGUF files and gguf.sha256
    OUT_DIR/bundle.json      sha256 of both archives and the parts in order

The first part is smaller so that it travels with host.tar.xz. On the host:

    cat models.part-* > models.tar.xz && sha256sum models.tar.xz   # as in bundle.json
    mkdir x && tar xJf host.tar.xz -C x && tar xJf models.tar.xz -C x && (cd x && sha256sum -c gguf.sha256)
    NACD_WHEELS=x/whl NACD_GGUF=x NACD_DATA=x/data bench/quality_gpu.sh RUN_DIR
    # smoke, without the GGUF files: NACD_CACHE=C with x/tok copied to C/models/smollm2-135m-instruct-tokenizer
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
# The files of a converted model folder that loading its tokenizer and config needs (no weights)
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json")


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def split_parts(path: Path, out_dir: Path, prefix: str, first_bytes: int, part_bytes: int) -> list[Path]:
    """Cut ``path`` into ``prefix.part-00``, ``-01``...: the first ``first_bytes`` long, the rest
    ``part_bytes`` (the last shorter). Joined in name order they are the file again."""
    if first_bytes <= 0 or part_bytes <= 0:
        raise ValueError(f"part sizes must be positive (first {first_bytes}, others {part_bytes})")
    parts = []
    with path.open("rb") as f:
        size = first_bytes
        while block := f.read(size):
            part = out_dir / f"{prefix}.part-{len(parts):02d}"
            part.write_bytes(block)
            parts.append(part)
            size = part_bytes
    return parts


def xz_tar(out: Path, root: Path, names: list[str]) -> None:
    """``tar -ch`` (links followed) of ``names`` under ``root``, through ``xz`` on every core."""
    with out.open("wb") as f:
        tar = subprocess.Popen(["tar", "-chf", "-", "-C", str(root), *names], stdout=subprocess.PIPE)
        xz = subprocess.run(["xz", "-6", "-T0"], stdin=tar.stdout, stdout=f, check=False)
        tar.stdout.close()
        if tar.wait() != 0 or xz.returncode != 0:
            raise SystemExit(f"gpu_bundle.py: packing {out.name} failed (tar {tar.returncode}, xz {xz.returncode})")


def fetch_wheels(dest: Path, python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(dest),
           "-r", str(REPO / "bench" / "gpu_wheels.txt")]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise SystemExit("gpu_bundle.py: pip could not fetch bench/gpu_wheels.txt (see its message above)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-dir", type=Path, required=True, help="folder laid out like shared/data")
    ap.add_argument("--python-version", default="3.12", help="the GPU host's Python, for the wheels")
    ap.add_argument("--no-wheels", action="store_true", help="the host has every package already")
    ap.add_argument("--part-mib", type=float, default=58)
    ap.add_argument("--first-part-mib", type=float, default=32)
    a = ap.parse_args(argv)
    if not (a.data_dir / "arc_easy").is_dir():
        raise SystemExit(f"gpu_bundle.py: --data-dir {a.data_dir}: no arc_easy folder (expected shared/data's layout)")
    from nacd.models import GEMMA3, SMOLLM2, gemma3_gguf, resolve, smollm2_gguf

    ggufs = [smollm2_gguf(), gemma3_gguf()]
    tokenizer_dir = Path(resolve(SMOLLM2))
    a.out.mkdir(parents=True, exist_ok=True)
    # Built beside the outputs and moved in at the end: a stopped run leaves no half bundle.
    with tempfile.TemporaryDirectory(dir=a.out, prefix=".bundle-") as tmp:
        stage = Path(tmp)
        if not a.no_wheels:
            fetch_wheels(stage / "whl", a.python_version)
        (stage / "data").symlink_to(a.data_dir.resolve(), target_is_directory=True)
        (stage / "tok").mkdir()
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, stage / "tok" / name)
        xz_tar(stage / "host.tar.xz", stage, [n for n in ("whl", "data", "tok") if (stage / n).exists()])
        for g in ggufs:
            (stage / g.name).symlink_to(g.resolve())
        (stage / "gguf.sha256").write_text("".join(f"{sha256(g)}  {g.name}\n" for g in ggufs))
        xz_tar(stage / "models.tar.xz", stage, [g.name for g in ggufs] + ["gguf.sha256"])
        parts = split_parts(stage / "models.tar.xz", stage, "models", int(a.first_part_mib * MIB),
                            int(a.part_mib * MIB))
        manifest = {"host.tar.xz": describe(stage / "host.tar.xz"),
                    "models.tar.xz": {**describe(stage / "models.tar.xz"), "parts": [p.name for p in parts]},
                    "models": {SMOLLM2: ggufs[0].name, GEMMA3: ggufs[1].name}}
        (stage / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for old in a.out.glob("models.part-*"):
            old.unlink()
        for f in [stage / "host.tar.xz", *parts, stage / "bundle.json"]:
            f.replace(a.out / f.name)
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
