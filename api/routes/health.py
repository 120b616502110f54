"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from shared import broker
from shared.db import get_engine
from shared.storage import get_storage

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable"}})
def readyz() -> JSONResponse:
    """Database, Redis and storage are all reachable."""
    checks: dict[str, str] = {}
    for name, probe in (("database", _database), ("redis", _redis), ("storage", _storage)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


def _database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _redis() -> None:
    broker.get_redis().ping()


def _storage() -> None:
    get_storage().ping()
