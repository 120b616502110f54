"""Request dependencies: the database session (one unit of work) and the authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import aio_reads
from shared import limits, logs
from shared.db import read_scope, session_scope
from shared.errors import Forbidden, Unauthorized
from shared.tenants import authenticate, cached_tenant_name, hash_key, is_admin, tenant_name

# Our keys are about 50 characters; anything much longer is not one, and is refused before any lookup.
MAX_KEY_LENGTH = 256


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def bearer_key(request: Request) -> str:
    """The request's API key as sent (401 without one); not yet checked."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`", headers={"WWW-Authenticate": "Bearer"}
        )
    return key.strip()


def key_hash(request: Request) -> str | None:
    """What to look the request's key up by (401 without a key); None for a key too long to be one of ours,
    refused without a lookup."""
    key = bearer_key(request)
    return hash_key(key) if len(key) <= MAX_KEY_LENGTH else None


def invalid_key() -> Unauthorized:
    # The key is never echoed, in a message or a log: "invalid" says all the client needs.
    return Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})


def admit(request: Request, tenant_id: str) -> str:
    """Mark the request as the tenant's, for the access log and every log line after this."""
    request.state.tenant = tenant_id
    logs.tenant.set(tenant_id)
    return tenant_id


def authenticate_request(request: Request) -> str:
    """The tenant of the request's API key (401 without a valid one); not counted against its rate."""
    key = bearer_key(request)
    tenant_id = None
    if len(key) <= MAX_KEY_LENGTH:
        with read_scope() as session:
            tenant_id = authenticate(session, key)
    if tenant_id is None:
        raise invalid_key()
    return admit(request, tenant_id)


async def get_tenant(request: Request) -> str:
    """The authenticated tenant, with this request counted against its rate limit (429 past it)."""
    if not aio_reads.enabled():
        return await run_in_threadpool(get_tenant_sync, request)
    digest = key_hash(request)
    tenant_id = await aio_reads.tenant_for(digest) if digest else None
    if tenant_id is None:
        raise invalid_key()
    await check_rate(admit(request, tenant_id))
    return tenant_id


@dataclass
class Submitter:
    """Who submits a job: the tenant of the request's key and, until confirmed live, the key's hash."""

    tenant_id: str
    unconfirmed: str | None = None


async def get_submitter(request: Request) -> Submitter:
    """For POST /v1/jobs: `get_tenant`, except that a key this process has found live before is not looked
    up again. Its revocation is checked where it counts, atomically, by the insert that makes the job
    (api.group_commit); any other way a submit goes confirms the key first (`confirm`). On the busiest
    route, that is one database round trip fewer per request."""
    if aio_reads.enabled():
        digest = key_hash(request)
        tenant_id = aio_reads.seen_tenant(digest) if digest else None
        if tenant_id is not None:
            await check_rate(admit(request, tenant_id))
            return Submitter(tenant_id, digest)
    return Submitter(await get_tenant(request))


async def confirm(submitter: Submitter) -> None:
    """Check now that the submitter's key is live, if it was not checked yet (401 if not)."""
    if submitter.unconfirmed is None:
        return
    tenant_id = await aio_reads.tenant_for(submitter.unconfirmed)
    if tenant_id != submitter.tenant_id:
        aio_reads.forget_key(submitter.unconfirmed)
        raise invalid_key()
    submitter.unconfirmed = None


def get_tenant_sync(request: Request) -> str:
    tenant_id = authenticate_request(request)
    limits.check_rate(tenant_id, limits.limits_for(tenant_name(tenant_id)))
    return tenant_id


async def check_rate(tenant_id: str) -> None:
    """Count one request against the tenant's rate (429 past it), from the event loop."""
    name = cached_tenant_name(tenant_id)
    if name is None:
        name = await run_in_threadpool(tenant_name, tenant_id)
    tenant_limits = limits.limits_for(name)
    if tenant_limits.rate_per_minute:
        await run_in_threadpool(limits.check_rate, tenant_id, tenant_limits)


TenantDep = Annotated[str, Depends(get_tenant)]
SubmitterDep = Annotated[Submitter, Depends(get_submitter)]
# For GET /v1/usage: a tenant told it is rate limited must still be able to see why and until when.
UnmeteredTenantDep = Annotated[str, Depends(authenticate_request)]


def get_admin(tenant_id: TenantDep) -> str:
    with session_scope() as session:
        admin = is_admin(session, tenant_id)
    if not admin:
        raise Forbidden("this route is for admin keys only (darkroom keys create --admin)", code="admin_only")
    return tenant_id


AdminDep = Annotated[str, Depends(get_admin)]
