"""Fixtures for the shared/ tests: tenants and jobs committed through the real unit of work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shared.broker import queue_for_model
from shared.db import session_scope
from shared.jobs import create_job
from shared.tenants import get_or_create_tenant


@pytest.fixture
def tenants(darkroom_env: dict[str, Any]) -> tuple[str, str]:
    """Two tenants' ids: the one under test and a stranger."""
    with session_scope() as session:
        ours = get_or_create_tenant(session, "acme").id
        theirs = get_or_create_tenant(session, "globex").id
    return ours, theirs


@pytest.fixture
def new_job(tenants: tuple[str, str]) -> Callable[..., str]:
    """Create and commit a queued tiny-sd job; returns its id."""

    def make(tenant_id: str | None = None, prompt: str = "a lighthouse") -> str:
        with session_scope() as session:
            job = create_job(
                session,
                tenant_id=tenant_id or tenants[0],
                model="tiny-sd",
                queue=queue_for_model("tiny-sd"),
                request={"prompt": prompt},
                metadata=None,
            )
            return job.id

    return make
