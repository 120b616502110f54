from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import delete_redis_prefix, reset_caches


@pytest.fixture(scope="module")
def sqlite_env(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[dict[str, str]]:
    """darkroom configured in this process for a whole module: SQLite, the shared Redis under a prefix."""
    from shared.migrate import upgrade

    tmp = tmp_path_factory.mktemp("security")
    prefix = f"darkroom-security:{uuid.uuid4().hex[:8]}:"
    env = {
        "DARKROOM_DATA_DIR": str(tmp / "data"),
        "DARKROOM_DATABASE_URL": f"sqlite:///{tmp / 'darkroom.db'}",
        "DARKROOM_REDIS_URL": "redis://127.0.0.1:6379/0",
        "DARKROOM_REDIS_PREFIX": prefix,
        "DARKROOM_STORAGE_URL": (tmp / "storage").as_uri(),
        "DARKROOM_MODEL_CACHE_DIR": str(models_dir),
        "DARKROOM_SECRET_KEY": "test-secret",
        "DARKROOM_PUBLIC_URL": "http://testserver",
        "DARKROOM_ENV_FILE": "",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("DARKROOM_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        reset_caches()
        upgrade(env["DARKROOM_DATABASE_URL"])
        yield env
        reset_caches()
    delete_redis_prefix(prefix)


@pytest.fixture(scope="module")
def app(sqlite_env: dict[str, str]) -> Any:
    from api.app import create_app

    return create_app()


def make_key(tenant: str, admin: bool = False) -> dict[str, str]:
    from shared.db import session_scope
    from shared.tenants import create_key

    with session_scope() as session:
        key = create_key(session, tenant, admin=admin)
    return {"Authorization": f"Bearer {key}"}
