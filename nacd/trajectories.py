"""The trajectory store: expert checkpoints as Arrow IPC file shards plus a manifest.

Layout (DESIGN.md "Data contracts")::

    <root>/experts/expert-NNN/shard-NNNNN.arrow   Arrow IPC *file* format, one record batch per
                                                  checkpoint: step int64, epoch float64,
                                                  lr float64, params fixed_size_list<float32|uint16>
    <root>/experts/expert-NNN/manifest.json       written last: no manifest, no trajectory

``params`` is the flat vector in the :class:`~nacd.models.ParamSpace` layout; bfloat16 storage
keeps the raw bfloat16 bits in a ``uint16`` list (Arrow has no bfloat16 type) and the schema
metadata says so (``nacd.dtype``).

Checksums: the manifest holds the sha256 of every whole shard (``verify()`` and ``read_all()``
check it) and, per checkpoint, the byte offset, length and CRC32C of that row's ``params`` bytes
inside its shard. ``read(i)`` fetches exactly those bytes with one range request (a ranged GET on
S3, a pread locally), checks their CRC32C and wraps them as a tensor without a copy (float32). A
range read cannot check a whole-shard hash cheaply, which is why the per-row checksum exists; it
guards against corruption, not tampering, so it is CRC32C (hardware-accelerated, ~10 GB/s) rather
than sha256 (~1.7 GB/s here, slower than reading from the page cache: it halved read
throughput). The offsets are a cache of what any Arrow reader finds through the file footer, and
``verify()`` checks that they agree.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import google_crc32c
import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nacd import storage as sio
from nacd.config import StorageConfig
from nacd.models import ParamSpace

log = logging.getLogger(__name__)

FORMAT = "nacd-trajectory"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float32": (pa.float32(), np.float32, 4), "bfloat16": (pa.uint16(), np.uint16, 2)}


class TrajectoryError(ValueError):
    """A trajectory is missing, corrupt, of an unknown version or of another layout."""


class ChecksumError(TrajectoryError):
    pass


def expert_name(index: int) -> str:
    return f"expert-{index:03d}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def experts_uri(root: str) -> str:
    return sio.join(root, "experts")


def expert_uri(root: str, name: str) -> str:
    return sio.join(root, "experts", name)


def _schema(numel: int, dtype: str) -> pa.Schema:
    arrow_type = STORAGE_DTYPES[dtype][0]
    return pa.schema([("step", pa.int64()), ("epoch", pa.float64()), ("lr", pa.float64()),
                      ("params", pa.list_(arrow_type, numel))],
                     metadata={"nacd.format": FORMAT, "nacd.format_version": str(FORMAT_VERSION),
                               "nacd.dtype": dtype})


def _to_storage_array(vector: torch.Tensor, dtype: str) -> np.ndarray:
    vec = vector.detach().reshape(-1).cpu()
    if dtype == "float32":
        return vec.to(torch.float32).contiguous().numpy()
    return vec.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def _sha256(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def _crc32c(data) -> str:
    # The C extension takes any buffer through numpy without a copy (it refuses bytearray directly).
    return f"{google_crc32c.value(np.frombuffer(memoryview(data), dtype=np.uint8)):08x}"


@dataclass
class _Row:
    step: int
    epoch: float
    lr: float
    values: np.ndarray  # storage dtype, flat


@dataclass
class _Shard:
    name: str
    data: pa.Buffer
    sha256: str
    rows: list[dict]  # per row: offset, nbytes, crc32c of the params bytes


def encode_shard(name: str, rows: list[_Row], numel: int, dtype: str) -> _Shard:
    """Serialise rows as one Arrow IPC file (one record batch per row) and locate each row's
    params bytes inside it (the buffers of a file read from memory are zero-copy slices of it)."""
    schema = _schema(numel, dtype)
    arrow_type = STORAGE_DTYPES[dtype][0]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        for row in rows:
            values = pa.Array.from_buffers(arrow_type, numel, [None, pa.py_buffer(row.values)])
            params = pa.FixedSizeListArray.from_arrays(values, numel)
            writer.write_batch(pa.record_batch(
                [pa.array([row.step], pa.int64()), pa.array([row.epoch], pa.float64()),
                 pa.array([row.lr], pa.float64()), params], schema=schema))
    data = sink.getvalue()
    located = locate_rows(data, with_hash=False)
    for row, loc in zip(rows, located):
        if loc["nbytes"] != row.values.nbytes:
            raise AssertionError(f"{name}: params buffer is {loc['nbytes']} bytes, expected {row.values.nbytes}")
        loc["crc32c"] = _crc32c(row.values)  # the same bytes the shard holds at [offset, offset+nbytes)
    return _Shard(name, data, _sha256(data), located)


def locate_rows(data: pa.Buffer, with_hash: bool = True) -> list[dict]:
    """Offset, length (and crc32c) of each record batch's params bytes in an in-memory shard."""
    reader = pa.ipc.open_file(pa.BufferReader(data))
    out = []
    for j in range(reader.num_record_batches):
        column = reader.get_batch(j).column("params")
        values = column.values
        width = values.type.bit_width // 8
        buf = values.buffers()[1]
        offset = buf.address - data.address + (values.offset + column.offset * column.type.list_size) * width
        nbytes = column.type.list_size * width
        if not 0 <= offset <= data.size - nbytes:
            raise TrajectoryError("params buffer is not inside the shard (compressed or foreign shard?)")
        loc = {"offset": int(offset), "nbytes": int(nbytes)}
        if with_hash:
            loc["crc32c"] = _crc32c(memoryview(data)[offset:offset + nbytes])
        out.append(loc)
    return out


# --------------------------------------------------------------------------- writer
@dataclass
class WriterState:
    """Everything a resumed writer needs: JSON-able part plus the rows not yet in a shard."""

    shards: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    pending: list[_Row] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"shards": self.shards, "checkpoints": self.checkpoints,
                "pending": [{"step": r.step, "epoch": r.epoch, "lr": r.lr} for r in self.pending]}

    def pending_tensors(self) -> list[torch.Tensor]:
        return [torch.from_numpy(r.values.copy()) for r in self.pending]

    @classmethod
    def from_json(cls, meta: dict, tensors: list[torch.Tensor]) -> WriterState:
        pending = [_Row(int(m["step"]), float(m["epoch"]), float(m["lr"]), t.numpy())
                   for m, t in zip(meta["pending"], tensors)]
        return cls(list(meta["shards"]), list(meta["checkpoints"]), pending)


class TrajectoryWriter:
    """Append checkpoints of one expert; shards go out as they fill, the manifest on ``commit``.

    Re-creating a writer for an expert that has a manifest removes the manifest first (the old
    trajectory stops being visible before any of its shards is replaced)."""

    def __init__(self, store_uri: str, expert_name: str, param_space: ParamSpace, *,
                 storage: StorageConfig | None = None, storage_dtype: str = "float32",
                 shard_max_bytes: int = 256 * 2**20, source_model: str = "",
                 source_revision: str | None = None, optimizer: dict | None = None,
                 seed: int | None = None, data_fingerprint: str | None = None,
                 extra: dict | None = None, state: WriterState | None = None):
        if storage_dtype not in STORAGE_DTYPES:
            raise TrajectoryError(f"storage dtype '{storage_dtype}' unknown (use {sorted(STORAGE_DTYPES)})")
        if shard_max_bytes <= 0:
            raise TrajectoryError("shard_max_bytes must be positive")
        self.store_uri = store_uri
        self.name = expert_name
        self.uri = expert_uri(store_uri, expert_name)
        self.space = param_space
        self.cfg = storage
        self.dtype = storage_dtype
        self.shard_max_bytes = shard_max_bytes
        self.meta = {"source_model": {"name": source_model, "revision": source_revision},
                     "optimizer": optimizer or {}, "seed": seed, "data_fingerprint": data_fingerprint,
                     "extra": extra or {}}
        self.state = state or WriterState()
        self.committed = False
        sio.check_bucket(self.uri, self.cfg)
        # Uncommit an older trajectory before touching its shards.
        sio.delete(sio.join(self.uri, MANIFEST), self.cfg)

    @property
    def row_bytes(self) -> int:
        return self.space.numel * STORAGE_DTYPES[self.dtype][2]

    def __len__(self) -> int:
        return len(self.state.checkpoints) + len(self.state.pending)

    def append(self, step: int, epoch: float, lr: float, vector: torch.Tensor) -> None:
        if self.committed:
            raise TrajectoryError(f"{self.uri}: already committed")
        if vector.numel() != self.space.numel:
            raise TrajectoryError(f"{self.uri}: vector has {vector.numel()} elements, the parameter "
                                  f"space has {self.space.numel}")
        values = _to_storage_array(vector, self.dtype)
        finite = vector.detach().reshape(-1).cpu().float().numpy()  # numpy: ~50x faster than torch here
        if not np.isfinite(finite).all():
            raise TrajectoryError(f"{self.uri}: checkpoint at step {step} has non-finite parameters")
        last = self.state.pending[-1].step if self.state.pending else (
            self.state.checkpoints[-1]["step"] if self.state.checkpoints else None)
        if last is not None and step <= last:
            raise TrajectoryError(f"{self.uri}: step {step} is not after the previous checkpoint ({last})")
        if self.state.pending and (len(self.state.pending) + 1) * self.row_bytes > self.shard_max_bytes:
            self.flush()
        self.state.pending.append(_Row(int(step), float(epoch), float(lr), values))

    def flush(self) -> None:
        """Write the pending rows as the next shard (no manifest yet)."""
        if not self.state.pending:
            return
        name = shard_name(len(self.state.shards))
        shard = encode_shard(name, self.state.pending, self.space.numel, self.dtype)
        sio.write_bytes(sio.join(self.uri, name), shard.data, self.cfg)
        for row, (j, loc) in zip(self.state.pending, enumerate(shard.rows)):
            self.state.checkpoints.append({"index": len(self.state.checkpoints), "step": row.step,
                                           "epoch": row.epoch, "lr": row.lr, "shard": name, "row": j, **loc})
        self.state.shards.append({"name": name, "bytes": shard.data.size, "sha256": shard.sha256,
                                  "rows": len(self.state.pending)})
        log.debug("%s: wrote %s (%d rows, %d bytes)", self.uri, name, len(self.state.pending), shard.data.size)
        self.state.pending = []

    def manifest(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "expert": self.name,
                **self.meta, "param_space": self.space.describe(), "dtype": self.dtype,
                "numel": self.space.numel, "shards": self.state.shards,
                "checkpoints": self.state.checkpoints,
                "checksums": "sha256 per shard file; crc32c per checkpoint over its params bytes "
                             "[offset, offset+nbytes) in its shard (verified on every range read)",
                "created_unix": time.time()}

    def commit(self) -> dict:
        """Write the last shard, then the manifest: the trajectory becomes visible at once."""
        self.flush()
        if not self.state.checkpoints:
            raise TrajectoryError(f"{self.uri}: nothing to commit (no checkpoint appended)")
        manifest = self.manifest()
        sio.write_bytes(sio.join(self.uri, MANIFEST),
                            json.dumps(manifest, indent=1).encode(), self.cfg)
        self.committed = True
        return manifest


# --------------------------------------------------------------------------- reader
class ExpertTrajectory:
    """One committed expert: ``len()`` checkpoints, ``read(i)`` -> flat float32 tensor."""

    def __init__(self, uri: str, manifest: dict, storage: StorageConfig | None = None):
        self.uri = uri
        self.manifest = manifest
        self.cfg = storage
        self.name = manifest.get("expert", uri.rstrip("/").rsplit("/", 1)[-1])
        self.param_space = ParamSpace.from_description(manifest["param_space"])

    def __len__(self) -> int:
        return len(self.manifest["checkpoints"])

    def __repr__(self) -> str:
        return f"ExpertTrajectory({self.uri!r}, checkpoints={len(self)}, numel={self.manifest['numel']})"

    @property
    def steps(self) -> list[int]:
        return [c["step"] for c in self.manifest["checkpoints"]]

    def check_matches(self, space: ParamSpace) -> None:
        """Raise TrajectoryError when the trajectory's layout is not the model's."""
        try:
            space.check_matches(self.manifest["param_space"], where=sio.join(self.uri, MANIFEST))
        except ValueError as e:
            raise TrajectoryError(str(e)) from None

    def read(self, i: int) -> torch.Tensor:
        """Checkpoint ``i`` as a flat float32 tensor (one range read, checksum verified)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.uri}: checkpoint {i} out of range (0..{n - 1})")
        ckpt = self.manifest["checkpoints"][i]
        shard_uri = sio.join(self.uri, ckpt["shard"])
        buf = _read(shard_uri, ckpt["offset"], ckpt["nbytes"], self.cfg)
        if _crc32c(buf) != ckpt["crc32c"]:
            raise ChecksumError(f"{shard_uri}: checksum mismatch for checkpoint {i} (step {ckpt['step']}, "
                                f"bytes {ckpt['offset']}..{ckpt['offset'] + ckpt['nbytes']}): the shard is corrupt")
        if self.manifest["dtype"] == "float32":
            return torch.frombuffer(buf, dtype=torch.float32)  # zero-copy: the tensor owns buf
        return torch.frombuffer(buf, dtype=torch.bfloat16).to(torch.float32)

    def read_all(self) -> list[torch.Tensor]:
        """Every checkpoint, fetching each shard whole once (one request per shard) and checking
        its sha256; float32 tensors are zero-copy views into the shard's bytes."""
        out: list[torch.Tensor] = []
        shards = {s["name"]: s for s in self.manifest["shards"]}
        current, data = None, bytearray()
        for c in self.manifest["checkpoints"]:
            if c["shard"] != current:
                current, shard = c["shard"], shards[c["shard"]]
                uri = sio.join(self.uri, current)
                data = _read(uri, 0, shard["bytes"], self.cfg)
                if _sha256(data) != shard["sha256"]:
                    raise ChecksumError(f"{uri}: shard sha256 mismatch: the shard is corrupt")
            if self.manifest["dtype"] == "float32":
                out.append(torch.frombuffer(data, dtype=torch.float32, count=c["nbytes"] // 4, offset=c["offset"]))
            else:
                out.append(torch.frombuffer(data, dtype=torch.bfloat16, count=c["nbytes"] // 2,
                                            offset=c["offset"]).to(torch.float32))
        return out

    def record(self, i: int) -> dict:
        """step, epoch and lr of checkpoint ``i``."""
        c = self.manifest["checkpoints"][i]
        return {"step": c["step"], "epoch": c["epoch"], "lr": c["lr"]}

    def verify(self) -> None:
        """Read every shard whole: file sha256, Arrow structure, and row offsets/hashes."""
        by_shard: dict[str, list[dict]] = {}
        for c in self.manifest["checkpoints"]:
            by_shard.setdefault(c["shard"], []).append(c)
        for shard in self.manifest["shards"]:
            uri = sio.join(self.uri, shard["name"])
            data = sio.read_bytes(uri, self.cfg)
            if _sha256(data) != shard["sha256"]:
                raise ChecksumError(f"{uri}: shard sha256 mismatch: the shard is corrupt")
            located = locate_rows(data)
            if len(located) != shard["rows"]:  # the manifest's rows were checked against itself, not the file
                raise TrajectoryError(f"{uri}: holds {len(located)} rows, the manifest says {shard['rows']}")
            for c in by_shard.get(shard["name"], []):
                if located[c["row"]] != {k: c[k] for k in ("offset", "nbytes", "crc32c")}:
                    raise TrajectoryError(f"{uri}: row {c['row']} does not match the manifest")


def _read(uri: str, offset: int, nbytes: int, cfg: StorageConfig | None) -> np.ndarray:
    """``nbytes`` at ``offset`` as a writable array the tensor will own: one range request on S3,
    a copy-on-write mapping of the page cache locally (no copy; see ``storage.read_range``)."""
    return np.frombuffer(sio.read_range(uri, offset, nbytes, cfg), dtype=np.uint8)


# --------------------------------------------------------------------------- manifest schema
# Every manifest field the reader uses, checked once when the manifest is read: a malformed
# manifest is then one TrajectoryError naming the file and the field, not a KeyError or TypeError
# from deep inside read() or verify(). Strict types: the writer never emits "12" for an offset or
# true for a count, so coercing them would only hide a foreign or hand-edited manifest. Other keys
# (source model, optimizer, seed, ...) are the writer's metadata and pass through unchecked.
_Count = Annotated[int, Field(ge=0)]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _ParamSpaceEntry(_Schema):
    kind: str = "lora"
    lora: dict | None = None
    names: list[str]
    shapes: list[list[_Count]]
    offsets: list[_Count] | None = None  # derived from shapes; cross-checked when present
    numel: _Count | None = None


class _ShardEntry(_Schema):
    # A fixed name pattern: the name is joined to the expert's URI, so it must not be a path.
    name: Annotated[str, Field(pattern=r"^shard-[0-9]{5,}\.arrow$")]
    bytes: _Count
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    rows: _Count


class _CheckpointEntry(_Schema):
    step: int
    epoch: float
    lr: float
    shard: str
    row: _Count
    offset: _Count
    nbytes: _Count
    crc32c: Annotated[str, Field(pattern=r"^[0-9a-f]{8}$")]


class _ManifestSchema(_Schema):
    format: str
    format_version: int
    expert: str = ""
    extra: dict = {}  # experts.py reads its run fingerprint and summary from here
    param_space: _ParamSpaceEntry
    dtype: str
    numel: _Count
    shards: list[_ShardEntry]
    checkpoints: list[_CheckpointEntry]


_MAX_PROBLEMS = 5  # a manifest broken everywhere would otherwise give a message per checkpoint


def _field_path(loc: tuple) -> str:
    """pydantic's ``('checkpoints', 3, 'offset')`` as ``checkpoints[3].offset``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


def _schema_problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        if e["type"] == "missing":
            out.append(f"{_field_path(e['loc'])}: missing")
        elif e["type"] == "model_type":  # pydantic would name our private class here
            out.append(f"{_field_path(e['loc'])}: should be an object (got {type(e['input']).__name__})")
        else:
            got = repr(e["input"])
            got = got if len(got) <= 60 else got[:57] + "..."
            out.append(f"{_field_path(e['loc'])}: {e['msg'][:1].lower()}{e['msg'][1:]} (got {got})")
    return out


def _consistency_problems(manifest: dict) -> Iterator[str]:
    """Contradictions between fields that each have the right type (runs after the schema)."""
    desc = manifest["param_space"]
    if len(desc["shapes"]) != len(desc["names"]):
        yield f"param_space.shapes: {len(desc['shapes'])} shapes for {len(desc['names'])} names"
        return  # the layout below would be meaningless
    if len(set(desc["names"])) != len(desc["names"]):
        yield "param_space.names: a name appears twice"
    space = ParamSpace.from_description(desc)
    if desc.get("offsets") is not None and desc["offsets"] != space.offsets:
        yield f"param_space.offsets: {desc['offsets']} do not follow from the shapes ({space.offsets})"
    if desc.get("numel") is not None and desc["numel"] != space.numel:
        yield f"param_space.numel: {desc['numel']}, but the shapes hold {space.numel} parameters"
    if manifest["numel"] != space.numel:
        yield f"numel: {manifest['numel']}, but param_space's shapes hold {space.numel} parameters"
    if manifest["dtype"] not in STORAGE_DTYPES:
        yield f"dtype: unknown storage dtype {manifest['dtype']!r} (knows {sorted(STORAGE_DTYPES)})"
        return  # row sizes below depend on it
    row_bytes = space.numel * STORAGE_DTYPES[manifest["dtype"]][2]
    shards: dict[str, dict] = {}
    for j, shard in enumerate(manifest["shards"]):
        if shard["name"] in shards:
            yield f"shards[{j}].name: '{shard['name']}' is listed twice"
        shards[shard["name"]] = shard
    if not manifest["checkpoints"]:
        yield "checkpoints: empty (a committed trajectory has at least one checkpoint)"
    claimed: dict[tuple[str, int], int] = {}  # (shard, row) -> first checkpoint naming it
    for i, c in enumerate(manifest["checkpoints"]):
        where, shard = f"checkpoints[{i}]", shards.get(c["shard"])
        if shard is None:
            yield f"{where}.shard: '{c['shard']}' is not in shards"
            continue
        if c["row"] >= shard["rows"]:
            yield f"{where}.row: {c['row']} is out of range (shard '{c['shard']}' has {shard['rows']} rows)"
        elif (c["shard"], c["row"]) in claimed:
            first = claimed[c["shard"], c["row"]]
            yield f"{where}.row: row {c['row']} of '{c['shard']}' is already checkpoints[{first}]"
        claimed.setdefault((c["shard"], c["row"]), i)
        if c["nbytes"] != row_bytes:
            yield f"{where}.nbytes: {c['nbytes']}, but {space.numel} {manifest['dtype']} parameters take {row_bytes}"
        elif c["offset"] + c["nbytes"] > shard["bytes"]:
            yield (f"{where}.offset: bytes {c['offset']}..{c['offset'] + c['nbytes']} lie past the end of "
                   f"'{c['shard']}' ({shard['bytes']} bytes)")
    named = Counter(name for name, _ in claimed)
    for j, shard in enumerate(manifest["shards"]):
        if named[shard["name"]] != shard["rows"]:
            yield f"shards[{j}].rows: {shard['rows']}, but checkpoints name {named[shard['name']]} rows of it"


def _check_manifest(uri: str, manifest: Any) -> dict:
    """The parsed manifest, unchanged, once its structure is known good; else a TrajectoryError
    naming ``uri`` and the first few bad fields (``checkpoints[3].offset: missing``)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrajectoryError(f"{uri}: not a trajectory manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise TrajectoryError(f"{uri}: trajectory format version {version!r} is not supported by this "
                              f"nacd (knows {sorted(SUPPORTED_VERSIONS)}): upgrade nacd or rewrite the store")
    try:
        _ManifestSchema.model_validate(manifest)
        problems = []
    except ValidationError as e:
        problems = _schema_problems(e)
    if not problems:
        problems = list(itertools.islice(_consistency_problems(manifest), _MAX_PROBLEMS + 1))
    if problems:
        more = "; and more" if len(problems) > _MAX_PROBLEMS else ""
        raise TrajectoryError(f"{uri}: " + "; ".join(problems[:_MAX_PROBLEMS]) + more)
    return manifest


class TrajectoryStore:
    """``<root>/experts/*``: only experts with a manifest exist for readers."""

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri = str(uri).rstrip("/")
        self.cfg = storage

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.uri!r})"

    def expert_names(self) -> list[str]:
        names = [n for n in sio.list_names(experts_uri(self.uri), self.cfg) if n.startswith("expert-")]
        return [n for n in names if sio.exists(sio.join(expert_uri(self.uri, n), MANIFEST), self.cfg)]

    def experts(self) -> list[ExpertTrajectory]:
        return [self.expert(n) for n in self.expert_names()]

    def expert(self, name: str | int, expect: ParamSpace | None = None) -> ExpertTrajectory:
        """A committed expert by name (``expert-003``) or index; ``expect`` checks the layout."""
        name = expert_name(name) if isinstance(name, int) else name
        uri = expert_uri(self.uri, name)
        manifest_uri = sio.join(uri, MANIFEST)
        try:
            raw = sio.read_bytes(manifest_uri, self.cfg)
        except sio.StorageNotFound:
            raise TrajectoryError(f"{manifest_uri}: no manifest: expert '{name}' was never committed "
                                  f"(shards without a manifest are an unfinished write)") from None
        try:
            manifest = json.loads(raw.to_pybytes())
        except ValueError as e:
            raise TrajectoryError(f"{manifest_uri}: manifest is not valid JSON: {e}") from None
        traj = ExpertTrajectory(uri, _check_manifest(manifest_uri, manifest), self.cfg)
        if expect is not None:
            traj.check_matches(expect)
        return traj


def open_store(uri: str, storage: StorageConfig | None = None) -> TrajectoryStore:
    """The store at ``uri`` (a folder or s3://bucket/prefix); fails clearly on a missing bucket."""
    sio.check_bucket(uri, storage)
    return TrajectoryStore(uri, storage)
