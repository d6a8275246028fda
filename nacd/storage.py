"""URI-based I/O for local folders (plain paths, ``file://``) and S3 (``s3://bucket/prefix``).

One small API for every stage: ``write_bytes``, ``read_bytes``, ``read_range``, ``exists``,
``list_names``, ``size``, ``delete_prefix``, ``download_prefix``. Data moves through
``pyarrow.fs`` (``S3FileSystem`` for any S3 API: AWS, MinIO, Ceph; ``LocalFileSystem`` locally).

Settings: the endpoint and region come from :class:`nacd.config.StorageConfig` or the standard
AWS variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``). Credentials come
only from the standard AWS credential chain (environment, shared files, web identity, a
Kubernetes Secret mounted as environment): never from config or pipeline parameters, and their
values are scrubbed from every error message this module raises or logs.

Atomicity: one ``write_bytes`` is all-or-nothing for a reader (local: temp file + rename; S3: a
single PUT is atomic). Multi-object artifacts (a trajectory) write their data objects first and a
small commit record (the manifest) last; readers only trust what a commit record names.

Transient failures (network, throttling, 5xx) are retried ``StorageConfig.retries`` times with
exponential backoff, then raise :class:`StorageError` naming the operation and the URI.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from nacd.atomic import temp_file_beside
from nacd.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
# Substrings of pyarrow/AWS SDK messages that mean "retrying cannot help".
_NO_BUCKET = ("NoSuchBucket", "NO_SUCH_BUCKET")
_PERMANENT = _NO_BUCKET + ("NoSuchKey", "AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId",
              "SignatureDoesNotMatch", "RESOURCE_NOT_FOUND", "Path does not exist",
              "bucket does not exist", "HTTP status 403", "HTTP status 404", "InvalidBucketName")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the operation and the URI, never secrets."""


def redact(text: str) -> str:
    """Replace any credential value present in the environment by ``***``."""
    for var in _SECRET_ENV:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


# --------------------------------------------------------------------------- URIs
@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``file`` or ``s3``; ``path`` is what the filesystem takes
    (an absolute local path, or ``bucket/key``)."""

    scheme: str
    path: str

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]


def parse_uri(uri: str | Path) -> Location:
    text = str(uri)
    if text.startswith("s3://"):
        path = text[len("s3://"):].strip("/")
        if not path:
            raise StorageError(f"{text!r}: an s3:// URI needs a bucket name")
        return Location("s3", path)
    if "://" in text and not text.startswith("file://"):
        raise StorageError(f"{text!r}: unsupported URI scheme (use a path, file:// or s3://)")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Location("file", os.path.abspath(text))


def join(uri: str, *parts: str) -> str:
    """Join URI segments with ``/`` (also for local paths, which keeps URIs uniform)."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


# --------------------------------------------------------------------------- S3 settings
@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    region: str
    retries: int

    @classmethod
    def resolve(cls, cfg: StorageConfig | None) -> S3Settings:
        cfg = cfg or StorageConfig()
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(endpoint or None, region, cfg.retries)


_CHAIN_ENV = _SECRET_ENV + ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                            "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_EC2_METADATA_DISABLED")


@lru_cache(maxsize=4)
def _credential_source(env_key: str):
    """botocore's credential object for one state of the environment (resolving the chain costs
    ~30 ms; the object refreshes expiring credentials by itself)."""
    import botocore.session

    return botocore.session.get_session().get_credentials()


def _credentials() -> tuple[str, str, str | None]:
    """The standard AWS credential chain (botocore): environment, shared files, web identity..."""
    env_key = hashlib.sha256(repr([os.environ.get(v) for v in _CHAIN_ENV]).encode()).hexdigest()
    creds = _credential_source(env_key)
    if creds is None:
        raise StorageError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           "(or AWS_PROFILE / a mounted Kubernetes Secret) in the environment")
    frozen = creds.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


@lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings, creds: tuple[str, str, str | None]) -> pafs.S3FileSystem:
    kwargs: dict = {"region": settings.region, "connect_timeout": 5.0, "request_timeout": 60.0,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
    if settings.endpoint_url:
        scheme, _, host = settings.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(access_key=creds[0], secret_key=creds[1], session_token=creds[2], **kwargs)


def filesystem(uri: str | Path, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, Location]:
    loc = parse_uri(uri)
    if loc.scheme == "file":
        return pafs.LocalFileSystem(), loc
    settings = S3Settings.resolve(cfg)
    log.debug("s3 endpoint=%s region=%s bucket=%s", settings.endpoint_url or "aws", settings.region, loc.bucket)
    return _s3_filesystem(settings, _credentials()), loc


def boto3_client(cfg: StorageConfig | None = None):
    """A boto3 S3 client with the same settings, for operations pyarrow lacks."""
    import boto3
    from botocore.config import Config

    settings = S3Settings.resolve(cfg)
    access, secret, token = _credentials()
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                        aws_access_key_id=access, aws_secret_access_key=secret, aws_session_token=token,
                        config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                      connect_timeout=5, read_timeout=60))


# --------------------------------------------------------------------------- retries
def _is_permanent(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    text = str(err)
    return any(marker in text for marker in _PERMANENT)


def with_retries(op: str, uri: str, fn: Callable[[], T], cfg: StorageConfig | None = None) -> T:
    """Run ``fn``; retry transient errors with exponential backoff; raise StorageError at the end."""
    retries = (cfg or StorageConfig()).retries
    delay = 0.2
    for attempt in range(retries + 1):
        try:
            return fn()
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as err:
            reason = redact(f"{type(err).__name__}: {err}")
            if _is_permanent(err):
                if any(marker in reason for marker in _NO_BUCKET):
                    raise StorageNotFound(f"{op} {uri}: the bucket does not exist ({reason})") from None
                if isinstance(err, FileNotFoundError) or "NoSuchKey" in reason or "Path does not exist" in reason:
                    raise StorageNotFound(f"{op} {uri}: not found ({reason})") from None
                raise StorageError(f"{op} {uri}: {reason}") from None
            if attempt == retries:
                raise StorageError(f"{op} {uri}: failed after {retries + 1} attempts "
                                   f"(endpoint unreachable or unstable?): {reason}") from None
            log.warning("%s %s: transient error (attempt %d/%d), retrying in %.1fs: %s",
                        op, uri, attempt + 1, retries + 1, delay, reason)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


class StorageNotFound(StorageError, FileNotFoundError):
    """The object or folder does not exist."""


# --------------------------------------------------------------------------- operations
def write_bytes(uri: str, data: bytes | bytearray | memoryview | pa.Buffer,
                cfg: StorageConfig | None = None) -> None:
    """Write one object atomically: a reader sees the old content (or nothing) or the new one."""
    fs, loc = filesystem(uri, cfg)
    if loc.scheme == "file":
        def local() -> None:
            fd, tmp = temp_file_beside(Path(loc.path))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(memoryview(data))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, loc.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        with_retries("write", uri, local, cfg)
        return

    def s3() -> None:
        with fs.open_output_stream(loc.path) as out:  # one PUT (multipart for large): atomic on close
            out.write(data)
    with_retries("write", uri, s3, cfg)


def write_json(uri: str, obj: Any, cfg: StorageConfig | None = None) -> None:
    """``obj`` as indented UTF-8 JSON through :func:`write_bytes` (atomic)."""
    write_bytes(uri, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode(), cfg)


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> pa.Buffer:
    fs, loc = filesystem(uri, cfg)

    def read() -> pa.Buffer:
        with fs.open_input_file(loc.path) as f:
            return f.read_buffer()
    return with_retries("read", uri, read, cfg)


def read_range(uri: str, offset: int, length: int, cfg: StorageConfig | None = None,
               out: bytearray | memoryview | None = None) -> memoryview:
    """Bytes ``[offset, offset + length)`` of an object: one ranged GET on S3, one pread or map locally.

    The result is a writable buffer (``out`` when given) so callers can wrap it zero-copy,
    e.g. ``torch.frombuffer``. Without ``out``, a local file is mapped copy-on-write instead of
    copied: the pages come straight from the page cache, a write to the buffer changes only this
    process's copy, and the mapping lives as long as the buffer. Objects are never rewritten in
    place (every write is temp file + rename), so a mapping cannot see its file shrink."""
    if offset < 0 or length < 0:
        raise StorageError(f"read_range {uri}: negative offset/length ({offset}, {length})")
    fs, loc = filesystem(uri, cfg)
    if out is not None and len(out) < length:
        raise StorageError(f"read_range {uri}: output buffer of {len(out)} bytes < {length}")

    def short(got: int) -> StorageError:
        return StorageError(f"read_range {uri}: wanted {length} bytes at {offset}, got {got} "
                            f"(object shorter than expected)")

    def read() -> memoryview:
        if loc.scheme == "file" and out is None:
            with open(loc.path, "rb") as fh:
                available = max(0, os.fstat(fh.fileno()).st_size - offset)
                if available < length:  # checked first: touching a mapped page past EOF is SIGBUS
                    raise short(available)
                return _map_private(fh.fileno(), offset, length)
        # np.empty, not bytearray: zero-filling a buffer that is overwritten at once costs a pass.
        view = memoryview(out if out is not None else np.empty(length, dtype=np.uint8))[:length]
        if loc.scheme == "file":
            with open(loc.path, "rb") as fh:
                got = os.preadv(fh.fileno(), [view], offset)
        else:
            with fs.open_input_file(loc.path) as f:
                f.seek(offset)
                got = f.readinto(view)
        if got != length:
            raise short(got)
        return view
    return with_retries("read_range", uri, read, cfg)


def _map_private(fd: int, offset: int, length: int) -> memoryview:
    """A copy-on-write mapping of ``length`` bytes at ``offset`` (no MAP_POPULATE: pre-faulting a
    writable private mapping copies every page, which is the copy this avoids)."""
    if length == 0:
        return memoryview(np.empty(0, dtype=np.uint8))
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fd, length + offset - start, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    return memoryview(mapped)[offset - start:offset - start + length]


def size(uri: str, cfg: StorageConfig | None = None) -> int:
    fs, loc = filesystem(uri, cfg)
    info = with_retries("stat", uri, lambda: fs.get_file_info(loc.path), cfg)
    if info.type != pafs.FileType.File:
        raise StorageNotFound(f"stat {uri}: not found")
    return int(info.size)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, loc = filesystem(uri, cfg)
    info = with_retries("stat", uri, lambda: fs.get_file_info(loc.path), cfg)
    return info.type == pafs.FileType.File


def list_names(uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """Names of the direct children of a folder/prefix (files and sub-folders), sorted.

    A missing folder is an empty list; a missing bucket is an error."""
    fs, loc = filesystem(uri, cfg)
    if loc.scheme == "s3":
        check_bucket(uri, cfg)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=False)
    infos = with_retries("list", uri, lambda: fs.get_file_info(selector), cfg)
    return sorted(i.base_name for i in infos)


def list_files(uri: str, cfg: StorageConfig | None = None) -> list[tuple[str, int]]:
    """All files below a folder/prefix as (relative path, size), sorted."""
    fs, loc = filesystem(uri, cfg)
    if loc.scheme == "s3":
        check_bucket(uri, cfg)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=True)
    infos = with_retries("list", uri, lambda: fs.get_file_info(selector), cfg)
    root = loc.path.rstrip("/") + "/"
    return sorted((i.path[len(root):], int(i.size)) for i in infos if i.type == pafs.FileType.File)


def check_bucket(uri: str, cfg: StorageConfig | None = None) -> None:
    """Fail clearly when the bucket of an s3:// URI does not exist (pyarrow would list nothing)."""
    if not is_s3(uri):
        return
    fs, loc = filesystem(uri, cfg)
    info = with_retries("stat bucket", f"s3://{loc.bucket}", lambda: fs.get_file_info(loc.bucket), cfg)
    if info.type != pafs.FileType.Directory:
        raise StorageNotFound(f"s3://{loc.bucket}: bucket does not exist (create it first, "
                              f"or fix storage.root / the URI)")


def delete(uri: str, cfg: StorageConfig | None = None) -> None:
    fs, loc = filesystem(uri, cfg)

    def rm() -> None:
        try:
            fs.delete_file(loc.path)
        except FileNotFoundError:
            pass
    with_retries("delete", uri, rm, cfg)


def delete_prefix(uri: str, cfg: StorageConfig | None = None) -> None:
    """Remove a folder/prefix and everything below it (missing is fine)."""
    fs, loc = filesystem(uri, cfg)

    def rm() -> None:
        info = fs.get_file_info(loc.path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(loc.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(loc.path)
    with_retries("delete", uri, rm, cfg)


def download_prefix(uri: str, dest: Path, cfg: StorageConfig | None = None) -> Path:
    """Copy every object below ``uri`` into the local folder ``dest`` (keeps relative paths)."""
    dest = Path(dest)
    files = list_files(uri, cfg)
    if not files:
        raise StorageNotFound(f"download {uri}: no objects under this prefix")
    for rel, _ in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(join(uri, rel), cfg).to_pybytes())
    return dest


def upload_folder(src: Path, uri: str, cfg: StorageConfig | None = None) -> None:
    """Copy a local folder to ``uri`` file by file (each object written atomically)."""
    for path in sorted(Path(src).rglob("*")):
        if path.is_file():
            write_bytes(join(uri, path.relative_to(src).as_posix()), path.read_bytes(), cfg)
