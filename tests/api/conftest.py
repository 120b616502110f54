from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.db import session_scope
from shared.tenants import create_key


@pytest.fixture
def api(darkroom_env: dict[str, Any]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture
def make_key(darkroom_env: dict[str, Any]) -> Callable[[str], dict[str, str]]:
    """Create an API key for a tenant; returns the Authorization header."""

    def make(tenant: str = "acme") -> dict[str, str]:
        with session_scope() as session:
            key = create_key(session, tenant)
        return {"Authorization": f"Bearer {key}"}

    return make


@pytest.fixture
def auth(make_key: Callable[[str], dict[str, str]]) -> dict[str, str]:
    return make_key("acme")
