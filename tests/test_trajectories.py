"""The trajectory store on local disk and on a real S3 endpoint (moto over HTTP)."""
from __future__ import annotations

import http.client
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
import torch

from nacd import storage
from nacd.config import StorageConfig
from nacd.models import ParamSpace
from nacd.trajectories import (ChecksumError, TrajectoryError, TrajectoryWriter, WriterState,
                               expert_uri, open_store)

SPACE = ParamSpace(("a.lora_A.weight", "a.lora_B.weight", "b.lora_A.weight"),
                   ((4, 32), (32, 4), (4, 40)), "lora", {"r": 4})


def _vectors(n: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) for _ in range(n)]


def _write(root: str, name: str, vectors, cfg=None, space=SPACE, **kw) -> dict:
    w = TrajectoryWriter(root, name, space, storage=cfg, source_model="tiny-llama", seed=7,
                         optimizer={"name": "sgd", "lr": 0.1}, data_fingerprint="abc", **kw)
    for k, v in enumerate(vectors):
        w.append(step=k * 5, epoch=k / 10, lr=0.1, vector=v)
    return w.commit()


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/r1", StorageConfig(endpoint_url=endpoint)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bitwise(store_root, dtype):
    root, cfg = store_root
    vectors = _vectors(7, SPACE.numel)
    # shards of 3 rows: several shards, the last one partial
    manifest = _write(root, "expert-000", vectors, cfg, storage_dtype=dtype,
                      shard_max_bytes=3 * SPACE.numel * (4 if dtype == "float32" else 2))
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1]
    traj = open_store(root, cfg).expert("expert-000")
    assert len(traj) == 7 and traj.steps == [0, 5, 10, 15, 20, 25, 30]
    assert traj.manifest["param_space"] == SPACE.describe()
    assert traj.manifest["seed"] == 7 and traj.manifest["data_fingerprint"] == "abc"
    assert traj.record(3) == {"step": 15, "epoch": 0.3, "lr": 0.1}
    for i, v in enumerate(vectors):
        got = traj.read(i)
        want = v if dtype == "float32" else v.to(torch.bfloat16).to(torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, want), i
    everything = traj.read_all()
    assert len(everything) == 7
    for got, v in zip(everything, vectors):
        assert torch.equal(got, v if dtype == "float32" else v.to(torch.bfloat16).to(torch.float32))
    # tensors read zero-copy are still the caller's own: changing one leaves the store as it was
    traj.read(2).add_(1.0)
    everything[2].add_(1.0)
    assert torch.equal(traj.read(2), traj.read_all()[2]) and not torch.equal(traj.read(2), everything[2])
    traj.verify()
    traj.check_matches(SPACE)


def test_shards_are_plain_arrow_ipc_files(tmp_path):
    vectors = _vectors(3, SPACE.numel)
    _write(str(tmp_path), "expert-001", vectors)
    path = tmp_path / "experts" / "expert-001" / "shard-00000.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    assert table.column_names == ["step", "epoch", "lr", "params"]
    assert table.column("step").to_pylist() == [0, 5, 10]
    assert torch.equal(torch.tensor(table.column("params")[1].values.to_numpy()), vectors[1])


def test_uncommitted_expert_is_invisible(store_root):
    root, cfg = store_root
    _write(root, "expert-000", _vectors(2, SPACE.numel), cfg)
    w = TrajectoryWriter(root, "expert-001", SPACE, storage=cfg, shard_max_bytes=1)
    for k, v in enumerate(_vectors(3, SPACE.numel)):
        w.append(k, 0.0, 0.1, v)  # shard_max_bytes=1: shards are written as rows arrive
    assert storage.list_names(expert_uri(root, "expert-001"), cfg) == ["shard-00000.arrow", "shard-00001.arrow"]
    store = open_store(root, cfg)
    assert [e.name for e in store.experts()] == ["expert-000"]
    with pytest.raises(TrajectoryError, match="no manifest: expert 'expert-001' was never committed"):
        store.expert("expert-001")
    with pytest.raises(TrajectoryError, match="no manifest"):
        store.expert(5)


def test_flipped_byte_is_a_checksum_error(tmp_path):
    _write(str(tmp_path), "expert-000", _vectors(4, SPACE.numel))
    traj = open_store(str(tmp_path)).expert("expert-000")
    ckpt = traj.manifest["checkpoints"][2]
    path = tmp_path / "experts" / "expert-000" / ckpt["shard"]
    data = bytearray(path.read_bytes())
    data[ckpt["offset"] + 17] ^= 0x01
    path.write_bytes(bytes(data))
    traj.read(1)  # other rows still read (per-row checksums)
    with pytest.raises(ChecksumError, match="checksum mismatch for checkpoint 2"):
        traj.read(2)
    with pytest.raises(ChecksumError, match="shard sha256 mismatch"):
        traj.verify()
    with pytest.raises(ChecksumError, match="shard sha256 mismatch"):
        traj.read_all()


def test_unknown_version_bad_manifest_and_layout_mismatch(tmp_path):
    root = str(tmp_path)
    _write(root, "expert-000", _vectors(2, SPACE.numel))
    mpath = tmp_path / "experts" / "expert-000" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    store = open_store(root)
    other = ParamSpace(SPACE.names, ((4, 32), (32, 4), (4, 41)), "lora")
    with pytest.raises(TrajectoryError, match=r"'b.lora_A.weight' has shape \[4, 40\], the model's is \[4, 41\]"):
        store.expert("expert-000", expect=other)
    with pytest.raises(TrajectoryError, match="parameter space is 'lora', the model's is 'full'"):
        store.expert("expert-000").check_matches(ParamSpace(SPACE.names, SPACE.shapes, "full"))
    mpath.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(TrajectoryError, match="format version 99 is not supported"):
        store.expert("expert-000")
    mpath.write_text("{not json")
    with pytest.raises(TrajectoryError, match="manifest.json: manifest is not valid JSON"):
        store.expert("expert-000")


def test_writer_rejects_bad_rows(tmp_path):
    w = TrajectoryWriter(str(tmp_path), "expert-000", SPACE)
    with pytest.raises(TrajectoryError, match="vector has 3 elements"):
        w.append(0, 0.0, 0.1, torch.zeros(3))
    w.append(0, 0.0, 0.1, torch.zeros(SPACE.numel))
    with pytest.raises(TrajectoryError, match="step 0 is not after"):
        w.append(0, 0.0, 0.1, torch.zeros(SPACE.numel))
    with pytest.raises(TrajectoryError, match="non-finite"):
        w.append(1, 0.0, 0.1, torch.full((SPACE.numel,), float("nan")))
    with pytest.raises(TrajectoryError, match="nothing to commit"):
        TrajectoryWriter(str(tmp_path), "expert-001", SPACE).commit()


def test_writer_state_resumes_to_the_same_trajectory(tmp_path):
    vectors = _vectors(6, SPACE.numel)
    row = SPACE.numel * 4
    straight = _write(str(tmp_path / "a"), "expert-000", vectors, shard_max_bytes=2 * row)
    w = TrajectoryWriter(str(tmp_path / "b"), "expert-000", SPACE, source_model="tiny-llama", seed=7,
                         optimizer={"name": "sgd", "lr": 0.1}, data_fingerprint="abc", shard_max_bytes=2 * row)
    for k in range(3):
        w.append(k * 5, k / 10, 0.1, vectors[k])
    meta, tensors = json.loads(json.dumps(w.state.to_json())), w.state.pending_tensors()
    del w  # "crash": a new writer continues from the saved state
    w2 = TrajectoryWriter(str(tmp_path / "b"), "expert-000", SPACE, source_model="tiny-llama", seed=7,
                          optimizer={"name": "sgd", "lr": 0.1}, data_fingerprint="abc", shard_max_bytes=2 * row,
                          state=WriterState.from_json(meta, tensors))
    for k in range(3, 6):
        w2.append(k * 5, k / 10, 0.1, vectors[k])
    resumed = w2.commit()
    for key in ("shards", "checkpoints"):
        assert resumed[key] == straight[key]


# --------------------------------------------------------------------------- range requests
class _CountingProxy:
    """An HTTP proxy in front of the S3 endpoint that counts GET requests and body bytes."""

    def __init__(self, upstream: str):
        host, port = upstream.split("//")[1].split(":")
        self.requests: list[tuple[str, str | None]] = []
        self.body_bytes = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(host, int(port))
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                proxy.requests.append((self.command, self.headers.get("Range")))
                proxy.body_bytes += len(data)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", resp.getheader("Content-Length") or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_single_checkpoint_read_is_one_range_request(s3_bucket):
    endpoint, bucket = s3_bucket
    numel = 64 * 1024  # 256 KiB per row, 24 rows: a 6 MiB shard
    space = ParamSpace(("w",), ((numel,),), "full")
    root = f"s3://{bucket}/big"
    vectors = _vectors(24, numel, seed=3)
    _write(root, "expert-000", vectors, StorageConfig(endpoint_url=endpoint), space=space)
    proxy = _CountingProxy(endpoint)
    try:
        traj = open_store(root, StorageConfig(endpoint_url=proxy.url)).expert("expert-000")
        shard_bytes = traj.manifest["shards"][0]["bytes"]
        assert shard_bytes > 24 * numel * 4
        before_bytes, before_reqs = proxy.body_bytes, len(proxy.requests)
        got = traj.read(12)
        assert torch.equal(got, vectors[12])
        ranged = [r for r in proxy.requests[before_reqs:] if r[0] == "GET"]
        assert len(ranged) == 1 and ranged[0][1] is not None and ranged[0][1].startswith("bytes=")
        # only the checkpoint's own bytes crossed the wire, not the shard
        assert proxy.body_bytes - before_bytes == numel * 4
    finally:
        proxy.server.shutdown()


# --------------------------------------------------------------------------- malformed manifests
def _drop(*path):
    def mutate(m):
        *parents, key = path
        for p in parents:
            m = m[p]
        del m[key]
    return mutate


def _set(value, *path):
    def mutate(m):
        *parents, key = path
        for p in parents:
            m = m[p]
        m[key] = value
    return mutate


@pytest.mark.parametrize("mutate, field", [
    (_drop("param_space", "names"), r"param_space\.names: missing"),
    (_set([1], "param_space"), r"param_space: should be an object"),
    (_drop("checkpoints", 1, "offset"), r"checkpoints\[1\]\.offset: missing"),
    (_drop("checkpoints", 2, "crc32c"), r"checkpoints\[2\]\.crc32c: missing"),
    (_drop("shards", 0, "sha256"), r"shards\[0\]\.sha256: missing"),
    (_set(7, "checkpoints", 1, "row"), r"checkpoints\[1\]\.row: 7 is out of range \(shard 'shard-00000\.arrow' has 3 rows\)"),
    (_set({"a": 1}, "checkpoints"), r"checkpoints: input should be a valid list"),
    (_set("12", "checkpoints", 0, "offset"), r"checkpoints\[0\]\.offset: input should be a valid integer \(got '12'\)"),
    (_set(True, "checkpoints", 0, "row"), r"checkpoints\[0\]\.row: input should be a valid integer"),
    (_set(99, "numel"), rf"numel: 99, but param_space's shapes hold {SPACE.numel} parameters"),
    (_set([[4, 32], [32, 4], [4, 41]], "param_space", "shapes"), r"param_space\.numel: \d+, but the shapes hold"),
    (_set("shard-00009.arrow", "checkpoints", 0, "shard"), r"checkpoints\[0\]\.shard: 'shard-00009\.arrow' is not in shards"),
    (_set("../../x.arrow", "shards", 0, "name"), r"shards\[0\]\.name: string should match pattern"),
    (_set(10**9, "checkpoints", 0, "nbytes"), r"checkpoints\[0\]\.nbytes: 1000000000, but"),
    (_set(10**9, "checkpoints", 0, "offset"), r"checkpoints\[0\]\.offset: bytes 1000000000\.\.\d+ lie past the end"),
    (_set(0, "checkpoints", 1, "row"), r"checkpoints\[1\]\.row: row 0 of 'shard-00000\.arrow' is already checkpoints\[0\]"),
    (_set(4, "shards", 0, "rows"), r"shards\[0\]\.rows: 4, but checkpoints name 3 rows of it"),
    (_set([], "checkpoints"), r"checkpoints: empty"),
    (_set("float16", "dtype"), r"dtype: unknown storage dtype 'float16'"),
], ids=["names-missing", "param-space-not-object", "offset-missing", "crc32c-missing", "sha256-missing", "row-out-of-range", "checkpoints-not-list", "offset-str", "row-bool", "numel-contradicts", "shapes-contradict-numel", "unknown-shard", "shard-name-is-a-path", "nbytes-wrong", "offset-past-end", "row-twice", "rows-contradict", "no-checkpoints", "unknown-dtype"])
def test_malformed_manifest_names_the_file_and_the_field(tmp_path, mutate, field):
    root = str(tmp_path)
    _write(root, "expert-000", _vectors(3, SPACE.numel))
    mpath = tmp_path / "experts" / "expert-000" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    mutate(manifest)
    mpath.write_text(json.dumps(manifest))
    # refused when the manifest is read, before any checkpoint is: one error, file and field named
    with pytest.raises(TrajectoryError, match=re.escape(f"{mpath}: ") + field) as err:
        open_store(root).expert("expert-000")
    assert type(err.value) is TrajectoryError
    with pytest.raises(TrajectoryError, match=field):
        open_store(root).experts()


def test_verify_catches_a_shard_with_fewer_rows_than_the_manifest(tmp_path):
    # a self-consistent manifest (it passes the reader's checks) claiming a row its shard lacks
    _write(str(tmp_path), "expert-000", _vectors(1, SPACE.numel))
    mpath = tmp_path / "experts" / "expert-000" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["shards"][0]["rows"] = 2
    manifest["checkpoints"].append({**manifest["checkpoints"][0], "index": 1, "step": 5, "row": 1})
    mpath.write_text(json.dumps(manifest))
    traj = open_store(str(tmp_path)).expert("expert-000")
    with pytest.raises(TrajectoryError, match=r"shard-00000\.arrow: holds 1 rows, the manifest says 2"):
        traj.verify()
