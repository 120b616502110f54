"""Where images live: a local directory (served by the API through signed, expiring URLs) or any
S3-compatible bucket (presigned GET URLs). Keys are chosen by darkroom, never by clients."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlparse

from tenacity import RetryCallState, retry_if_exception, stop_after_delay, wait_exponential_jitter
from tenacity import Retrying as _Retrying

from shared.errors import Forbidden, NotFound
from shared.settings import Settings, get_settings

log = logging.getLogger("darkroom.storage")


class StorageUnavailable(Exception):
    """Storage kept refusing or not answering for the whole retry budget."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def url(self, key: str) -> str: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def ping(self) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}")
    return key


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def sign(secret: str, key: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


class LocalStorage:
    def __init__(self, root: Path, public_url: str, secret: str, ttl: int):
        self.root = root.resolve()
        self.public_url = public_url.rstrip("/")
        self.secret = secret
        self.ttl = ttl

    def path(self, key: str) -> Path:
        path = (self.root / _check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid storage key {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            # A failed write (disk full, file too large) must not leave its half file behind.
            os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        return self.path(key).read_bytes()

    def url(self, key: str) -> str:
        expires = int(time.time()) + self.ttl
        query = urlencode({"expires": expires, "sig": sign(self.secret, key, expires)})
        return f"{self.public_url}/files/{quote(key)}?{query}"

    def open_signed(self, key: str, expires: int, sig: str) -> Path:
        """The file behind a signed URL; Forbidden if tampered or expired, NotFound if gone."""
        try:
            path = self.path(key)
        except ValueError as exc:
            raise NotFound("no such file") from exc
        # compare_digest refuses non-ASCII text (TypeError), so anything but a hex digest is refused first.
        if not _HEX_DIGEST.fullmatch(sig) or not hmac.compare_digest(sign(self.secret, key, expires), sig):
            raise Forbidden("invalid signature", code="invalid_signature")
        if expires < time.time():
            raise Forbidden("this URL has expired", code="url_expired")
        if not path.is_file():
            raise NotFound("no such file")
        return path

    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error (deletes are retried)."""
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        base = self.path(prefix.rstrip("/"))
        if base.is_dir():
            for child in sorted(base.rglob("*"), reverse=True):
                child.unlink() if child.is_file() else child.rmdir()
            base.rmdir()

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise OSError(f"storage directory {self.root} is not writable")


class S3Storage:
    def __init__(self, bucket: str, prefix: str, settings: Settings):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.ttl = settings.url_ttl_seconds
        # A session of its own: boto3's default session is not safe to share between the API's threads.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            config=Config(
                signature_version="s3v4",
                # Few quick tries here: put_with_retry owns the longer backoff, bounded in time.
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=3,
                read_timeout=30,
            ),
        )

    def _full(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(key) from exc
        return bytes(response["Body"].read())

    def url(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=self.ttl
        )

    def delete(self, key: str) -> None:
        """Remove one object; S3 answers a missing one with success too."""
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_prefix(self, prefix: str) -> None:
        full = self._full(prefix.rstrip("/")) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        for page in pages:
            keys: Any = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def make_storage(settings: Settings) -> LocalStorage | S3Storage:
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        return LocalStorage(Path(url.path), settings.public_url, settings.secret_key, settings.url_ttl_seconds)
    if url.scheme == "s3":
        return S3Storage(url.netloc, url.path, settings)
    raise ValueError(f"DARKROOM_STORAGE_URL must start with file:// or s3://, got {settings.storage_url!r}")


@lru_cache
def get_storage() -> LocalStorage | S3Storage:
    return make_storage(get_settings())


def is_transient(exc: BaseException) -> bool:
    """An error worth retrying: the server is unreachable, timing out, or answering 5xx / SlowDown."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ClientError):
        response: Any = exc.response
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        return status >= 500 or response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
    return isinstance(exc, BotoCoreError) and "Connection" in type(exc).__name__


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("storage upload failed (%s); retry %d", type(exc).__name__, state.attempt_number)


def put_with_retry(storage: Storage, key: str, data: bytes, content_type: str, *, seconds: float) -> None:
    """`storage.put`, retried with jittered exponential backoff for up to `seconds` on transient errors.

    A put is idempotent (same key, same bytes) and each object appears whole or not at all, so retrying
    never leaves a partial object behind. Raises StorageUnavailable once the budget is spent.
    """
    retrying = _Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(seconds),
        wait=wait_exponential_jitter(initial=0.2, max=5.0),
        before_sleep=_log_retry,
        reraise=True,
    )
    try:
        retrying(storage.put, key, data, content_type)
    except Exception as exc:
        if is_transient(exc):
            message = f"storage did not accept {key} within {seconds:g} s: {type(exc).__name__}"
            raise StorageUnavailable(message) from exc
        raise


def output_key(job_id: str, index: int, extension: str = "png") -> str:
    """Deterministic: a retried job overwrites its own objects, never adds more."""
    return f"jobs/{job_id}/{index}.{extension}"


def input_key(job_id: str, name: str) -> str:
    """Where the API keeps a job's normalised input image (`image`, `mask`) for the worker to read."""
    return f"inputs/{job_id}/{name}.png"
