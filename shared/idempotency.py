"""Idempotency keys (IETF draft `Idempotency-Key`, with Stripe's semantics), kept in the database.

A creating request with a key first claims it in a transaction of its own: the unique (tenant, key) pair
lets exactly one of many concurrent requests, in any API process, insert the row. The winner does its work
and marks the key completed in the same transaction that creates the job, so "job exists" and "key
completed" commit together. The others are told, depending on what they find:

* a different request (method, path or body) under that key: 422 `idempotency_key_reused`;
* the first request still running: 409 `idempotency_key_in_flight` (retry shortly);
* the first request finished: its result is replayed, and nothing runs twice.

Keys are remembered for `DARKROOM_IDEMPOTENCY_TTL_HOURS` (at least 24 h); the reconciler deletes older ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.errors import Conflict, InvalidRequest
from shared.settings import get_settings
from shared.tables import IdempotencyKey, utcnow

log = logging.getLogger("darkroom.idempotency")

IN_FLIGHT, COMPLETED = "in_flight", "completed"
MAX_KEY_LENGTH = 255
# A key left in flight this long belongs to a request that died between its claim and its commit; a
# retry may take it over. Real work under a key (creating one row) takes milliseconds.
STALE_IN_FLIGHT = timedelta(seconds=60)


@dataclass
class Replay:
    """What the first request under a key returned."""

    status: int
    body: dict[str, Any] | None
    job_id: str | None


def fingerprint(method: str, path: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method.upper()} {path}\n{canonical}".encode()).hexdigest()


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(f"Idempotency-Key: must be 1 to {MAX_KEY_LENGTH} printable characters")
    return key


def claim(tenant_id: str, key: str, print_: str) -> Replay | None:
    """Own `key` for this request (None), or learn what the first request with it did (a Replay)."""
    check_key(key)
    for _ in range(3):  # a row can vanish (expired, released) between our INSERT and our SELECT
        now = utcnow()
        try:
            with session_scope() as session:
                expires = now + timedelta(hours=get_settings().idempotency_ttl_hours)
                session.add(
                    IdempotencyKey(
                        tenant_id=tenant_id,
                        key=key,
                        fingerprint=print_,
                        state=IN_FLIGHT,
                        created_at=now,
                        expires_at=expires,
                    )
                )
                session.flush()
            return None
        except IntegrityError:
            pass
        with session_scope() as session:
            row = session.scalar(
                select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
            )
            if row is None:
                continue
            if row.expires_at <= now:
                session.execute(delete(IdempotencyKey).where(IdempotencyKey.id == row.id))
                continue
            if row.fingerprint != print_:
                raise InvalidRequest(
                    "Idempotency-Key: this key was already used with a different request; use a new key",
                    code="idempotency_key_reused",
                )
            if row.state == COMPLETED:
                return Replay(row.response_status or 200, row.response_body, row.job_id)
            if row.created_at < now - STALE_IN_FLIGHT and _take_over(session, row.id, row.created_at):
                return None
        raise Conflict(
            "Idempotency-Key: a request with this key is still in progress; retry shortly",
            code="idempotency_key_in_flight",
            headers={"Retry-After": "1"},
        )
    raise Conflict("Idempotency-Key: the key changed state repeatedly; retry", code="idempotency_key_in_flight")


def _take_over(session: Session, row_id: str, seen_created: Any) -> bool:
    stmt = (
        update(IdempotencyKey)
        .where(
            IdempotencyKey.id == row_id, IdempotencyKey.state == IN_FLIGHT, IdempotencyKey.created_at == seen_created
        )
        .values(created_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def complete(
    session: Session, tenant_id: str, key: str, *, status: int, body: dict[str, Any] | None, job_id: str | None
) -> None:
    """Record the result, in the caller's transaction (the one that did the work)."""
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
        .values(state=COMPLETED, response_status=status, response_body=body, job_id=job_id)
        .execution_options(synchronize_session=False)
    )


def release(tenant_id: str, key: str) -> None:
    """The request failed before doing its work: free the key so a retry can run it."""
    with session_scope() as session:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key, IdempotencyKey.state == IN_FLIGHT
            )
        )


def release_after_failure(tenant_id: str, key: str | None) -> None:
    """`release` from a request's error path (no-op without a key). Never raises: the request's own error
    is what the client must see, and a key left in flight is taken over once it is stale."""
    if key is None:
        return
    try:
        release(tenant_id, key)
    except Exception as exc:
        log.warning("idempotency key not released: %s", type(exc).__name__)


def delete_expired(session: Session, limit: int = 1000) -> int:
    ids = session.scalars(select(IdempotencyKey.id).where(IdempotencyKey.expires_at < utcnow()).limit(limit)).all()
    if ids:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id.in_(ids)))
    return len(ids)
