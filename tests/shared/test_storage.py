"""Storage backends: local files behind signed, expiring URLs, and an S3 server spoken to over HTTP."""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import botocore.exceptions
import httpx
import pytest

from shared.errors import Forbidden, NotFound
from shared.settings import Settings
from shared.storage import LocalStorage, S3Storage, make_storage, output_key, sign
from tests.conftest import BUCKET

SECRET = "test-secret"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
BAD_KEYS = ["../escape.png", "jobs/../../escape.png", "/etc/passwd", "jobs\\x\\0.png", "jobs//0.png", ""]


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage", "http://testserver/", SECRET, ttl=600)


def signed_parts(url: str) -> tuple[str, int, str]:
    """(key, expires, sig) as the API's /files route reads them from a signed URL."""
    parts = urlsplit(url)
    assert parts.path.startswith("/files/")
    query = parse_qs(parts.query)
    return unquote(parts.path.removeprefix("/files/")), int(query["expires"][0]), query["sig"][0]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# Local storage


def test_local_signed_url_opens_the_file(local: LocalStorage) -> None:
    key = output_key("abc123", 0)
    local.put(key, PNG, "image/png")

    url = local.url(key)
    assert url.startswith("http://testserver/files/jobs/abc123/0.png?")
    key_in_url, expires, sig = signed_parts(url)
    assert key_in_url == key
    assert time.time() < expires <= time.time() + 600
    assert local.open_signed(key_in_url, expires, sig).read_bytes() == PNG


def test_local_tampered_url_is_forbidden(local: LocalStorage) -> None:
    local.put(output_key("abc123", 0), PNG, "image/png")
    local.put(output_key("abc123", 1), b"other", "image/png")
    key, expires, sig = signed_parts(local.url(output_key("abc123", 0)))
    forged = ("0" if sig[0] != "0" else "1") + sig[1:]

    for args in [(key, expires, forged), (key, expires + 3600, sig), (output_key("abc123", 1), expires, sig)]:
        with pytest.raises(Forbidden) as excinfo:
            local.open_signed(*args)
        assert excinfo.value.code == "invalid_signature"
        assert excinfo.value.status_code == 403

    other_secret = LocalStorage(local.root, "http://testserver", "another-secret", ttl=600)
    with pytest.raises(Forbidden):
        other_secret.open_signed(key, expires, sig)


def test_local_expired_url_is_forbidden(local: LocalStorage) -> None:
    key = output_key("abc123", 0)
    local.put(key, PNG, "image/png")
    expired = int(time.time()) - 60

    with pytest.raises(Forbidden) as excinfo:
        local.open_signed(key, expired, sign(SECRET, key, expired))
    assert excinfo.value.code == "url_expired"


def test_local_signed_url_for_a_missing_file_is_not_found(local: LocalStorage) -> None:
    key = output_key("gone", 0)
    key, expires, sig = signed_parts(local.url(key))
    with pytest.raises(NotFound):
        local.open_signed(key, expires, sig)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_local_refuses_keys_outside_its_root(local: LocalStorage, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        local.put(key, PNG, "image/png")
    with pytest.raises(ValueError):
        local.path(key)
    # Even correctly signed, such a key never reaches the filesystem.
    expires = int(time.time()) + 600
    with pytest.raises(NotFound):
        local.open_signed(key, expires, sign(SECRET, key, expires))
    assert not (tmp_path / "escape.png").exists()


def test_local_put_replaces_whole_files_and_leaves_no_temp_files(local: LocalStorage) -> None:
    key = output_key("abc123", 0)
    local.put(key, b"first version", "image/png")
    local.put(key, PNG, "image/png")
    local.put(output_key("abc123", 1), b"second image", "image/png")

    assert files_under(local.root) == ["jobs/abc123/0.png", "jobs/abc123/1.png"]
    assert local.path(key).read_bytes() == PNG


def test_local_failed_put_keeps_the_old_file_and_no_temp_file(local: LocalStorage) -> None:
    key = output_key("abc123", 0)
    local.put(key, b"complete image", "image/png")

    # A real short write: the kernel refuses to grow any file past 1 KiB (as on a full disk).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with pytest.raises(OSError):
            local.put(key, PNG * 4, "image/png")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)

    assert local.path(key).read_bytes() == b"complete image"
    assert files_under(local.root) == ["jobs/abc123/0.png"]


def test_local_delete_prefix_removes_one_jobs_files(local: LocalStorage) -> None:
    for job_id in ("abc", "abcd"):
        for index in range(2):
            local.put(output_key(job_id, index), PNG, "image/png")

    local.delete_prefix("jobs/abc")
    assert files_under(local.root) == ["jobs/abcd/0.png", "jobs/abcd/1.png"]
    local.delete_prefix("jobs/never-existed")


def test_output_key_is_deterministic() -> None:
    assert output_key("abc123", 0) == output_key("abc123", 0) == "jobs/abc123/0.png"
    assert output_key("abc123", 1, "webp") == "jobs/abc123/1.webp"
    assert len({output_key("abc123", i) for i in range(4)}) == 4
    assert output_key("abc123", 0) != output_key("abc124", 0)


# S3 storage


def s3_settings(endpoint: str, bucket: str = BUCKET) -> Settings:
    return Settings(storage_url=f"s3://{bucket}/prefix", s3_endpoint_url=endpoint)


@pytest.fixture
def s3(s3_endpoint: str) -> S3Storage:
    storage = make_storage(s3_settings(s3_endpoint))
    assert isinstance(storage, S3Storage)
    return storage


def bucket_keys(endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_s3_presigned_url_serves_the_bytes(s3: S3Storage, s3_endpoint: str) -> None:
    key = output_key("s3job1", 0)
    s3.put(key, PNG, "image/png")

    response = httpx.get(s3.url(key))
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert "prefix/jobs/s3job1/0.png" in bucket_keys(s3_endpoint)


def test_s3_retry_overwrites_its_own_object(s3: S3Storage, s3_endpoint: str) -> None:
    key = output_key("s3job2", 0)
    s3.put(key, b"first attempt", "image/png")
    s3.put(output_key("s3job2", 0), PNG, "image/png")

    assert [k for k in bucket_keys(s3_endpoint) if "s3job2" in k] == ["prefix/jobs/s3job2/0.png"]
    assert httpx.get(s3.url(key)).content == PNG


def test_s3_delete_prefix_removes_one_jobs_objects(s3: S3Storage, s3_endpoint: str) -> None:
    for job_id in ("s3del", "s3delx"):
        for index in range(3):
            s3.put(output_key(job_id, index), PNG, "image/png")
    url = s3.url(output_key("s3del", 0))
    assert httpx.get(url).status_code == 200

    s3.delete_prefix("jobs/s3del")
    keys = [k for k in bucket_keys(s3_endpoint) if "s3del" in k]
    assert keys == [f"prefix/jobs/s3delx/{i}.png" for i in range(3)]
    assert httpx.get(url).status_code == 404


def test_s3_refuses_bad_keys(s3: S3Storage) -> None:
    for key in BAD_KEYS:
        with pytest.raises(ValueError):
            s3.put(key, PNG, "image/png")


def test_s3_ping(s3: S3Storage, s3_endpoint: str) -> None:
    s3.ping()
    missing = make_storage(s3_settings(s3_endpoint, bucket="no-such-bucket"))
    with pytest.raises(botocore.exceptions.ClientError):
        missing.ping()
