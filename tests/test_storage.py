"""nacd.storage against local disk and a real S3 endpoint (moto's server over HTTP)."""
from __future__ import annotations

import logging
import time

import pytest

from nacd import storage
from nacd.config import StorageConfig


def _cfg(endpoint: str, retries: int = 2) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, retries=retries)


def test_local_round_trip_and_atomic_write(tmp_path):
    uri = f"file://{tmp_path}/a/b/obj.bin"
    storage.write_bytes(uri, b"0123456789")
    storage.write_bytes(uri, b"abcdefghij")  # replace in place
    assert storage.read_bytes(uri).to_pybytes() == b"abcdefghij"
    assert bytes(storage.read_range(str(tmp_path / "a/b/obj.bin"), 3, 4)) == b"defg"
    assert storage.size(uri) == 10 and storage.exists(uri)
    # no temp file is left beside the object
    assert sorted(p.name for p in (tmp_path / "a/b").iterdir()) == ["obj.bin"]
    assert storage.list_names(str(tmp_path / "a")) == ["b"]
    assert storage.list_names(str(tmp_path / "missing")) == []


def test_local_read_past_end_and_missing_file(tmp_path):
    storage.write_bytes(str(tmp_path / "x"), b"abc")
    with pytest.raises(storage.StorageError, match="wanted 10 bytes"):
        storage.read_range(str(tmp_path / "x"), 0, 10)
    with pytest.raises(storage.StorageNotFound, match="not found"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_local_range_is_a_private_mapping(tmp_path):
    """Without ``out`` a local range is mapped copy-on-write: writes stay in this process, the
    object's bytes do not change, and a range past the end is refused before anything is touched."""
    uri = str(tmp_path / "blob")
    payload = bytes(range(256)) * 64 + b"tail"
    storage.write_bytes(uri, payload)
    view = storage.read_range(uri, 5000, 1000)  # offset not page aligned
    assert not view.readonly and bytes(view) == payload[5000:6000]
    view[:4] = b"XXXX"
    assert storage.read_bytes(uri).to_pybytes() == payload
    assert bytes(storage.read_range(uri, 5000, 4)) == payload[5000:5004]
    assert len(storage.read_range(uri, len(payload), 0)) == 0
    with pytest.raises(storage.StorageError, match="wanted 5 bytes at 16386, got 2"):
        storage.read_range(uri, len(payload) - 2, 5)
    storage.write_bytes(uri, b"new")  # an object replaced later leaves the old mapping intact
    assert bytes(view[4:8]) == payload[5004:5008]


def test_bad_uri_scheme():
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.parse_uri("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.parse_uri("s3://")


def test_s3_round_trip_list_range_and_download(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    cfg = _cfg(endpoint)
    root = f"s3://{bucket}/run/model"
    payload = bytes(range(256)) * 40
    storage.write_bytes(f"{root}/weights.bin", payload, cfg)
    storage.write_bytes(f"{root}/sub/config.json", b'{"a": 1}', cfg)
    assert storage.read_bytes(f"{root}/weights.bin", cfg).to_pybytes() == payload
    assert bytes(storage.read_range(f"{root}/weights.bin", 1000, 300, cfg)) == payload[1000:1300]
    assert storage.list_names(root, cfg) == ["sub", "weights.bin"]
    assert storage.list_files(root, cfg) == [("sub/config.json", 8), ("weights.bin", len(payload))]
    out = storage.download_prefix(root, tmp_path / "dl", cfg)
    assert (out / "weights.bin").read_bytes() == payload
    assert (out / "sub" / "config.json").read_bytes() == b'{"a": 1}'
    storage.delete_prefix(root, cfg)
    assert storage.list_names(root, cfg) == []


def test_endpoint_from_aws_env(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage.write_bytes(f"s3://{bucket}/env.txt", b"via env", StorageConfig())
    assert storage.read_bytes(f"s3://{bucket}/env.txt").to_pybytes() == b"via env"


def test_missing_bucket_is_a_clear_error(s3_server):
    cfg = _cfg(s3_server)
    with pytest.raises(storage.StorageNotFound, match="bucket does not exist"):
        storage.list_names("s3://no-such-bucket-here/x", cfg)
    with pytest.raises(storage.StorageNotFound, match="bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket-here/x", b"1", cfg)


def test_unreachable_endpoint_retries_then_fails(s3_server, caplog):
    cfg = _cfg("http://127.0.0.1:9", retries=2)  # discard port: nothing listens
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="nacd.storage"):
        with pytest.raises(storage.StorageError, match="failed after 3 attempts"):
            storage.read_bytes("s3://bucket/key", cfg)
    assert time.monotonic() - start < 30
    assert sum("transient error" in r.message for r in caplog.records) == 2


def remove_aws_credentials(monkeypatch, tmp_path) -> None:
    """No credential anywhere in the AWS chain (env, shared files, instance metadata)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_credentials(monkeypatch, tmp_path, s3_server):
    remove_aws_credentials(monkeypatch, tmp_path)
    with pytest.raises(storage.StorageError, match="no S3 credentials"):
        storage.read_bytes("s3://bucket/key", _cfg(s3_server))


def test_transient_errors_are_retried_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION: connection reset")
        return "ok"
    assert storage.with_retries("read", "s3://b/k", flaky, StorageConfig(retries=3)) == "ok"
    assert len(calls) == 3

    calls.clear()

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during GetObject")
    with pytest.raises(storage.StorageError, match="ACCESS_DENIED"):
        storage.with_retries("read", "s3://b/k", denied, StorageConfig(retries=3))
    assert len(calls) == 1


def test_credentials_never_appear_in_logs_or_errors(s3_bucket, caplog, monkeypatch):
    endpoint, bucket = s3_bucket
    import os

    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    messages = []
    with caplog.at_level(logging.DEBUG):
        storage.write_bytes(f"s3://{bucket}/k", b"x", _cfg(endpoint))
        failing = [
            lambda: storage.read_bytes(f"s3://{bucket}/missing", _cfg(endpoint)),
            lambda: storage.list_names("s3://absent-bucket-zz/x", _cfg(endpoint)),
            lambda: storage.read_bytes(f"s3://{bucket}/k", _cfg("http://127.0.0.1:9", retries=1)),
            # an underlying error that quotes the secret must come out redacted
            lambda: storage.with_retries("read", "s3://b/k", lambda: (_ for _ in ()).throw(
                OSError(f"AWS Error ACCESS_DENIED for key {key_id} secret {secret}")), StorageConfig()),
        ]
        for fn in failing:
            with pytest.raises(storage.StorageError) as info:
                fn()
            messages.append(str(info.value))
    text = caplog.text + "\n".join(messages)
    assert "***" in messages[-1]
    assert secret not in text and key_id not in text
