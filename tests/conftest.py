"""Fixtures: real PostgreSQL, Redis and an S3 server over HTTP; the tiny model built once per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import create_pg_database, delete_redis_prefix, drop_pg_database, reset_caches

BUCKET = "darkroom-test"


@pytest.fixture(scope="session")
def session_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny models and LoRA, built once for the whole session (workers find them through the cache dir)."""
    from worker.tiny import BUILDERS, make_tiny

    directory = tmp_path_factory.mktemp("models")
    for kind in BUILDERS:
        make_tiny(directory / kind, kind=kind)
    return directory


@pytest.fixture(scope="session")
def pg_url(session_id: str) -> Iterator[str]:
    from shared.migrate import upgrade

    name = f"darkroom_test_{session_id}"
    url = create_pg_database(name)
    upgrade(url)
    yield url
    reset_caches()
    drop_pg_database(name)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, spoken to over real HTTP by boto3."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.support import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    ).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _aws_credentials() -> None:
    # Dummy credentials for moto; never real ones, and never a network lookup for them.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        from shared.migrate import upgrade

        url = f"sqlite:///{tmp_path / 'darkroom.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("pg_url")
    yield url
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, api_keys, tenants CASCADE"))
    engine.dispose()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"darkroom-test:{uuid.uuid4().hex[:8]}:"
    yield prefix
    delete_redis_prefix(prefix)


@pytest.fixture
def darkroom_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str, redis_prefix: str, models_dir: Path
) -> Iterator[dict[str, Any]]:
    """darkroom configured in this process: a migrated database, a Redis prefix, local storage."""
    env = {
        "DARKROOM_DATA_DIR": str(tmp_path / "data"),
        "DARKROOM_DATABASE_URL": database_url,
        "DARKROOM_REDIS_URL": "redis://127.0.0.1:6379/0",
        "DARKROOM_REDIS_PREFIX": redis_prefix,
        "DARKROOM_STORAGE_URL": (tmp_path / "storage").as_uri(),
        "DARKROOM_MODEL_CACHE_DIR": str(models_dir),
        "DARKROOM_SECRET_KEY": "test-secret",
        "DARKROOM_PUBLIC_URL": "http://testserver",
        "DARKROOM_PROGRESS_INTERVAL": "0",
        # Images are encoded in this process: tests patch the encoding, which encoder processes would not see
        # (tests/worker/test_store.py runs the processes themselves).
        "DARKROOM_ENCODE_PROCESSES": "0",
        "DARKROOM_ENV_FILE": "",
    }
    for key in [k for k in os.environ if k.startswith("DARKROOM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    yield env
    reset_caches()
