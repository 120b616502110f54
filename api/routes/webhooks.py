"""Webhooks: the tenant's signing secret, the deliveries of a job, and replaying one delivery."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Body, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, TenantDep
from api.errors import responses
from api.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader
from api.schemas import (
    WebhookDeliveryList,
    WebhookDeliveryRead,
    WebhookSecretRead,
    WebhookSecretRotate,
)
from shared import idempotency, jobs, webhook_secrets, webhooks
from shared.db import session_scope
from shared.errors import NotFound
from shared.settings import get_settings
from shared.tables import WebhookAttempt, WebhookDelivery

router = APIRouter(tags=["webhooks"])


def _secret_read(session: Any, tenant_id: str) -> WebhookSecretRead:
    current = webhook_secrets.current_secret(session, tenant_id)
    return WebhookSecretRead(
        secret=current.secret,
        created_at=current.created_at,
        previous_secret_expires_at=webhook_secrets.previous_expiry(session, tenant_id),
    )


@router.get("/v1/webhook-secret", response_model=WebhookSecretRead, responses=responses(401))
def get_webhook_secret(session: SessionDep, tenant_id: TenantDep) -> WebhookSecretRead:
    """Your webhook signing secret (made on first use); verify deliveries with it."""
    return _secret_read(session, tenant_id)


def _rotate(tenant_id: str, grace_seconds: int | None, key: str | None) -> tuple[WebhookSecretRead, bool]:
    if key is not None:
        fingerprint = idempotency.fingerprint("POST", "/v1/webhook-secret", {"grace_period_seconds": grace_seconds})
        replay = idempotency.claim(tenant_id, key, fingerprint)
        if replay is not None and replay.body is not None:
            return WebhookSecretRead.model_validate(replay.body), True
    if grace_seconds is None:
        grace = timedelta(hours=get_settings().webhook_secret_grace_hours)
    else:
        grace = timedelta(seconds=grace_seconds)
    try:
        with session_scope() as session:
            webhook_secrets.rotate(session, tenant_id, grace)
            result = _secret_read(session, tenant_id)
            if key is not None:
                body = result.model_dump(mode="json")
                idempotency.complete(session, tenant_id, key, status=200, body=body, job_id=None)
    except BaseException:
        idempotency.release_after_failure(tenant_id, key)
        raise
    return result, False


@router.post("/v1/webhook-secret", response_model=WebhookSecretRead, responses=responses(401, 409, 422))
async def rotate_webhook_secret(
    tenant_id: TenantDep,
    response: Response,
    body: WebhookSecretRotate | None = Body(None),
    idempotency_key: IdempotencyKeyHeader = None,
) -> WebhookSecretRead:
    """Rotate the signing secret. The previous one keeps signing (both signatures sent) for a grace period."""
    grace = body.grace_period_seconds if body is not None else None
    result, replayed = await run_in_threadpool(_rotate, tenant_id, grace, idempotency_key)
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return result


def delivery_read(session: Any, delivery: WebhookDelivery) -> WebhookDeliveryRead:
    attempts = session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery.id)
        .order_by(WebhookAttempt.attempted_at, WebhookAttempt.id)
    ).all()
    return WebhookDeliveryRead.model_validate(
        {
            **{
                name: getattr(delivery, name)
                for name in (
                    "id",
                    "job_id",
                    "batch_id",
                    "event",
                    "url",
                    "status",
                    "attempts",
                    "created_at",
                    "next_attempt_at",
                    "delivered_at",
                    "last_status_code",
                    "last_latency_ms",
                    "last_error",
                )
            },
            "attempt_log": [
                {
                    "attempted_at": a.attempted_at,
                    "status_code": a.status_code,
                    "latency_ms": a.latency_ms,
                    "error": a.error,
                }
                for a in attempts
            ],
        }
    )


def deliveries_read(session: Any, *where: Any) -> WebhookDeliveryList:
    """The deliveries matching `where` (one job's, or one batch's), oldest first, each with its attempts."""
    deliveries = session.scalars(
        select(WebhookDelivery).where(*where).order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    ).all()
    return WebhookDeliveryList(data=[delivery_read(session, d) for d in deliveries])


@router.get("/v1/jobs/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=responses(401, 404))
def list_job_webhooks(job_id: str, session: SessionDep, tenant_id: TenantDep) -> WebhookDeliveryList:
    """The job's webhook deliveries, oldest first, each with its attempts (time, status code, latency, error)."""
    jobs.get_job(session, job_id, tenant_id)
    return deliveries_read(session, WebhookDelivery.job_id == job_id)


@router.post(
    "/v1/webhooks/{delivery_id}/retry",
    status_code=202,
    response_model=WebhookDeliveryRead,
    responses=responses(401, 404),
)
def retry_webhook(delivery_id: str, tenant_id: TenantDep) -> WebhookDeliveryRead:
    """Send a delivery again now (same webhook-id and body), with a fresh retry budget.

    If a 410 Gone had disabled its URL, this re-enables the URL. Safe to repeat, so it takes no
    Idempotency-Key: a replay while one is pending sends one more attempt, never a different message.
    """
    with session_scope() as session:
        delivery = webhooks.retry(session, delivery_id, tenant_id)
        if delivery is None:
            raise NotFound(f"webhook delivery {delivery_id!r} not found")
        result = delivery_read(session, delivery)
    with contextlib.suppress(Exception):  # the reconciler sends it if Redis is down
        webhooks.publish_delivery(delivery_id)
    return result
