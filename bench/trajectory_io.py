"""Trajectory store I/O: write/read throughput and single-checkpoint latency, local disk and S3.

For each backend (a local folder; a loopback S3 endpoint served by moto, talked to over HTTP)
it writes ``--checkpoints`` flat float32 vectors of ``--numel`` elements three ways and reads
them back:

- ``store``: ``TrajectoryWriter`` (one Arrow IPC shard, manifest last) and ``ExpertTrajectory.read``
  (one range request per checkpoint, per-row crc32c verified; locally the range is mapped
  copy-on-write from the page cache, not copied);
- ``store.read_all``: the same store read by ``ExpertTrajectory.read_all`` (one request per shard,
  shard sha256 verified, zero-copy views);
- ``torch.save``: ``torch.save`` of the list of tensors as one object, ``torch.load`` of all of it;
- ``raw``: the same number of bytes as one plain object, copied into a fresh buffer by one
  pread (local) or one GET (S3): no format, no checksum.

``one_checkpoint_ms`` is the latency of getting checkpoint ``checkpoints // 2`` (store: one range
read; torch: load everything then index; raw: one range read of that slice). Rows
``{backend, impl, bytes, write_mb_s, read_mb_s, one_checkpoint_ms}`` go to ``--json``; a table is
printed. Target: local ``store`` read at least 80 % of ``raw`` read.

    .venv/bin/python bench/trajectory_io.py --json /tmp/trajectory_io.json
    .venv/bin/python bench/trajectory_io.py --numel 4194304 --checkpoints 32 --json out.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np
import torch

from nacd import storage
from nacd.config import StorageConfig
from nacd.models import ParamSpace
from nacd.trajectories import TrajectoryWriter, open_store

from _table import print_table  # bench/ is on sys.path when this script runs


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds over ``repeats`` runs (the first run also warms caches)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def bench_backend(backend: str, root: str, cfg: StorageConfig | None, numel: int, n: int,
                  repeats: int) -> list[dict]:
    space = ParamSpace(("w",), ((numel,),), "full")
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(numel, generator=g) for _ in range(n)]
    total = numel * 4 * n
    mid = n // 2
    rows = []

    # --- store
    def write_store() -> None:
        w = TrajectoryWriter(root, "expert-000", space, storage=cfg, shard_max_bytes=total + 1)
        for k, v in enumerate(vectors):
            w.append(k, 0.0, 0.1, v)
        w.commit()
    write_s = _timed(write_store, repeats)
    traj = open_store(root, cfg).expert("expert-000")
    read_s = _timed(lambda: [traj.read(i) for i in range(n)], repeats)
    one_s = _timed(lambda: traj.read(mid), repeats * 3)
    assert torch.equal(traj.read(mid), vectors[mid])
    rows.append(_row(backend, "store", total, write_s, read_s, one_s))
    read_all_s = _timed(traj.read_all, repeats)
    assert torch.equal(traj.read_all()[mid], vectors[mid])
    rows.append(_row(backend, "store.read_all", total, write_s, read_all_s, one_s))

    # --- torch.save / torch.load of the same tensors
    turi = storage.join(root, "torch", "all.pt")

    def write_torch() -> None:
        buf = io.BytesIO()
        torch.save(vectors, buf)
        storage.write_bytes(turi, buf.getbuffer(), cfg)

    def read_torch() -> list[torch.Tensor]:
        return torch.load(io.BytesIO(storage.read_bytes(turi, cfg)), weights_only=True)
    write_s = _timed(write_torch, repeats)
    read_s = _timed(read_torch, repeats)
    one_s = _timed(lambda: read_torch()[mid], repeats)
    rows.append(_row(backend, "torch.save", total, write_s, read_s, one_s))

    # --- raw bytes of the same size
    raw = torch.cat(vectors).numpy().tobytes()
    ruri = storage.join(root, "raw", "blob.bin")
    write_s = _timed(lambda: storage.write_bytes(ruri, raw, cfg), repeats)
    read_s = _timed(lambda: _copy_range(ruri, 0, total, cfg), repeats)
    one_s = _timed(lambda: _copy_range(ruri, mid * numel * 4, numel * 4, cfg), repeats * 3)
    rows.append(_row(backend, "raw", total, write_s, read_s, one_s))
    return rows


def _copy_range(uri: str, offset: int, length: int, cfg: StorageConfig | None) -> np.ndarray:
    """The raw baseline: the bytes copied into a fresh buffer (one pread or one ranged GET)."""
    buf = np.empty(length, dtype=np.uint8)
    storage.read_range(uri, offset, length, cfg, out=memoryview(buf))
    return buf


def _row(backend: str, impl: str, nbytes: int, write_s: float, read_s: float, one_s: float) -> dict:
    mb = nbytes / 2**20
    return {"backend": backend, "impl": impl, "bytes": nbytes, "write_mb_s": round(mb / write_s, 1),
            "read_mb_s": round(mb / read_s, 1), "one_checkpoint_ms": round(one_s * 1000, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=1 << 20, help="elements per checkpoint (float32)")
    p.add_argument("--checkpoints", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="local,s3")
    p.add_argument("--json", required=True)
    args = p.parse_args()

    rows = []
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory(prefix="nacd-bench-io-") as tmp:
        if "local" in backends:
            rows += bench_backend("local", str(Path(tmp) / "store"), None, args.numel, args.checkpoints, args.repeats)
        if "s3" in backends:
            import boto3
            from moto.server import ThreadedMotoServer

            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench-key")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
            port = _free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            try:
                endpoint = f"http://127.0.0.1:{port}"
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench-io")
                rows += bench_backend("s3-loopback", "s3://bench-io/store", StorageConfig(endpoint_url=endpoint),
                                      args.numel, args.checkpoints, args.repeats)
            finally:
                server.stop()

    print_table(rows, [("backend", lambda r: r["backend"]), ("impl", lambda r: r["impl"]),
                       ("MiB", lambda r: f"{r['bytes'] / 2**20:.1f}"), ("write MB/s", lambda r: f"{r['write_mb_s']:.1f}"),
                       ("read MB/s", lambda r: f"{r['read_mb_s']:.1f}"),
                       ("1 ckpt ms", lambda r: f"{r['one_checkpoint_ms']:.2f}")])
    for backend in {r["backend"] for r in rows}:
        by = {r["impl"]: r for r in rows if r["backend"] == backend}
        print(f"{backend}: store read / raw read = {by['store']['read_mb_s'] / by['raw']['read_mb_s']:.2f}")
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
