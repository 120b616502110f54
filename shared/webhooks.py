"""Webhooks: the outbox of notifications, and sending them (the `webhooks.deliver` task's body).

A delivery row is written in the transaction of the job change it reports (shared.events), so it is sent
at least once: by the task published after commit, by a retry scheduled after a failed attempt, or by the
reconciler when Redis lost the message. Each attempt is a POST signed per Standard Webhooks, with the same
`webhook-id` every time; redirects are not followed, 2xx is success, 410 Gone disables the URL for the
tenant, anything else is retried on `RETRY_SCHEDULE` until `DARKROOM_WEBHOOK_MAX_ATTEMPTS`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import broker, metrics
from shared.db import session_scope
from shared.errors import InvalidRequest
from shared.job_view import job_view
from shared.settings import get_settings
from shared.tables import DisabledWebhookEndpoint, Job, WebhookAttempt, WebhookDelivery, utcnow
from shared.webhook_secrets import signature_header, signing_secrets

log = logging.getLogger("darkroom.webhooks")

TASK_DELIVER = "webhooks.deliver"
QUEUE = "webhooks"
EVENTS = ("started", "progress", "succeeded", "failed", "canceled", "expired")
BATCH_COMPLETED = "batch.completed"
DEFAULT_EVENTS = ("succeeded", "failed", "canceled")
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# Seconds before retry n (after attempt n failed), times DARKROOM_WEBHOOK_BACKOFF_SCALE, +-20 % jitter:
# 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 3 h, 6 h, 12 h, 24 h -- about 47 hours in all with 11 attempts.
RETRY_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
JITTER = 0.2
# Retries sooner than this ride on a Celery countdown; later ones are left to the reconciler, because a
# message held back for hours would outlive the broker's visibility timeout and be delivered twice.
MAX_COUNTDOWN = 300
# The reconciler re-sends a due delivery only if no message was sent for it this recently.
BACKSTOP_AFTER = timedelta(seconds=30)
USER_AGENT = "darkroom-webhooks/1"


def validate_webhook_url(url: str, *, allow_private: bool) -> str:
    """Refuse URLs that are not http(s) or that point into private networks (SSRF).

    Minimal on purpose: every resolved address must be public unless `allow_private`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook_url: must be an http or https URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise InvalidRequest("webhook_url: must not carry credentials")
    if allow_private:
        return url
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise InvalidRequest(f"webhook_url: host {host!r} does not resolve") from exc
        addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    for address in addresses:
        if not address.is_global or address.is_multicast:
            raise InvalidRequest(f"webhook_url: {host!r} is a private, loopback or reserved address ({address})")
    return url


def is_disabled(session: Session, tenant_id: str, url: str) -> bool:
    found = session.scalar(
        select(DisabledWebhookEndpoint.id).where(
            DisabledWebhookEndpoint.tenant_id == tenant_id, DisabledWebhookEndpoint.url == url
        )
    )
    return found is not None


def add_delivery(session: Session, job: Job, event: str) -> str | None:
    """Write the outbox row for `event`; returns its id when it is to be sent (None: URL disabled)."""
    assert job.webhook_url is not None
    return add_row(
        session, tenant_id=job.tenant_id, url=job.webhook_url, event=event, data=job_view(None, job), job_id=job.id
    )


def add_row(
    session: Session,
    *,
    tenant_id: str,
    url: str,
    event: str,
    data: dict[str, Any],
    job_id: str | None = None,
    batch_id: str | None = None,
) -> str | None:
    """The outbox row of a job event (`job.<event>`) or a batch one (`batch.completed`); its id unless disabled."""
    now = utcnow()
    kind = event if event.startswith("batch.") else f"job.{event}"
    body = {"type": kind, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data}
    disabled = is_disabled(session, tenant_id, url)
    delivery = WebhookDelivery(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=job_id,
        batch_id=batch_id,
        tenant_id=tenant_id,
        event=event,
        url=url,
        payload=json.dumps(body, separators=(",", ":")),
        status=FAILED if disabled else PENDING,
        attempts=0,
        next_attempt_at=None if disabled else now,
        enqueued_at=now,
        last_error="not sent: the endpoint was disabled after it answered 410 Gone" if disabled else None,
        created_at=now,
    )
    session.add(delivery)
    session.flush()
    return None if disabled else delivery.id


def publish_delivery(delivery_id: str, countdown: float | None = None) -> None:
    broker.get_celery().send_task(TASK_DELIVER, args=[delivery_id], queue=QUEUE, countdown=countdown)


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed attempt."""
    base = RETRY_SCHEDULE[min(attempts, len(RETRY_SCHEDULE)) - 1]
    return base * get_settings().webhook_backoff_scale * random.uniform(1 - JITTER, 1 + JITTER)


@dataclass
class Outcome:
    status_code: int | None
    latency_ms: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _claim(delivery_id: str) -> tuple[WebhookDelivery, list[str]] | None:
    """Take the delivery for one attempt, so two messages for it never send at the same time."""
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        won = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == PENDING,
                or_(
                    WebhookDelivery.next_attempt_at.is_(None),
                    WebhookDelivery.next_attempt_at <= now + timedelta(seconds=1),
                ),
                or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
            )
            .values(
                attempts=WebhookDelivery.attempts + 1,
                locked_until=now + timedelta(seconds=settings.webhook_timeout + 60),
            )
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if won != 1:
            return None
        delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
        if delivery is None:
            return None
        return delivery, signing_secrets(session, delivery.tenant_id)


def _send(delivery: WebhookDelivery, all_secrets: list[str]) -> Outcome:
    settings = get_settings()
    try:
        validate_webhook_url(delivery.url, allow_private=settings.webhook_allow_private)
    except InvalidRequest as exc:  # checked again at send time: DNS may have changed since submit
        return Outcome(None, 0, exc.message)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": delivery.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(all_secrets, delivery.id, timestamp, delivery.payload),
    }
    started = time.monotonic()
    try:
        with httpx.Client(follow_redirects=False, timeout=settings.webhook_timeout) as http:
            response = http.post(delivery.url, content=delivery.payload.encode(), headers=headers)
    except httpx.TimeoutException:
        return Outcome(None, _ms(started), f"timed out after {settings.webhook_timeout:g} s")
    except httpx.HTTPError as exc:
        return Outcome(None, _ms(started), f"{type(exc).__name__}: {exc}"[:500])
    error = None
    if response.is_redirect:
        error = f"redirect to {response.headers.get('location', '?')!r} not followed"
    elif not 200 <= response.status_code < 300:
        error = f"HTTP {response.status_code}: {response.text[:200]}"
    return Outcome(response.status_code, _ms(started), error)


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def deliver(delivery_id: str) -> str:
    """One attempt of one delivery. Returns what became of it: delivered, retrying, failed or skipped."""
    claimed = _claim(delivery_id)
    if claimed is None:
        return "skipped"  # already delivered, failed, not yet due, or being sent by another message
    delivery, all_secrets = claimed
    outcome = _send(delivery, all_secrets)
    retry_in: float | None = None
    with session_scope() as session:
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                attempted_at=utcnow(),
                status_code=outcome.status_code,
                latency_ms=outcome.latency_ms,
                error=outcome.error,
            )
        )
        values: dict[str, object] = {
            "last_status_code": outcome.status_code,
            "last_latency_ms": outcome.latency_ms,
            "last_error": outcome.error,
            "locked_until": None,
        }
        gone = False
        if outcome.ok:
            result = DELIVERED
            values.update(status=DELIVERED, delivered_at=utcnow(), next_attempt_at=None)
        elif outcome.status_code == 410:
            result, gone = FAILED, True
            values.update(status=FAILED, next_attempt_at=None)
            _disable_endpoint(session, delivery.tenant_id, delivery.url, exclude=delivery.id)
        elif delivery.attempts >= get_settings().webhook_max_attempts:
            result = FAILED
            values.update(status=FAILED, next_attempt_at=None)
        else:
            result = "retrying"
            retry_in = retry_delay(delivery.attempts)
            values.update(next_attempt_at=utcnow() + timedelta(seconds=retry_in))
            if retry_in <= MAX_COUNTDOWN:
                values["enqueued_at"] = utcnow()
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery.id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    if retry_in is not None and retry_in <= MAX_COUNTDOWN:
        try:
            publish_delivery(delivery.id, countdown=retry_in)
        except Exception as exc:  # the reconciler re-sends due deliveries
            log.warning("scheduling retry of %s failed: %s", delivery.id, type(exc).__name__)
    log.info("webhook %s (%s) attempt %d: %s", delivery.id, delivery.event, delivery.attempts, result)
    # One count per attempt: delivered, retrying, failed (attempts spent) or gone (410, endpoint disabled).
    metrics.count("webhook_deliveries_total", {"outcome": "gone" if gone else result})
    return result


def _disable_endpoint(session: Session, tenant_id: str, url: str, *, exclude: str) -> None:
    """A 410 Gone: record it, and fail what else is waiting for that URL."""
    if not is_disabled(session, tenant_id, url):
        try:
            with session.begin_nested():
                session.add(DisabledWebhookEndpoint(tenant_id=tenant_id, url=url, reason="410 Gone"))
        except IntegrityError:
            pass  # another delivery recorded it first
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.tenant_id == tenant_id,
            WebhookDelivery.url == url,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.id != exclude,
        )
        .values(status=FAILED, next_attempt_at=None, last_error="not sent: the endpoint answered 410 Gone")
        .execution_options(synchronize_session=False)
    )
    log.warning("webhook endpoint %s disabled for tenant %s: 410 Gone", url, tenant_id)


def retry(session: Session, delivery_id: str, tenant_id: str) -> WebhookDelivery | None:
    """Send a delivery again now with a fresh retry budget; re-enables its URL if a 410 had disabled it."""
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id:
        return None
    session.query(DisabledWebhookEndpoint).filter_by(tenant_id=tenant_id, url=delivery.url).delete()
    now = utcnow()
    delivery.status = PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.enqueued_at = now
    delivery.locked_until = None
    session.flush()
    return delivery


def due_for_backstop(session: Session, limit: int = 500) -> list[str]:
    """Pending deliveries that are due and for which no message was sent lately: Redis may have lost it."""
    now = utcnow()
    ids = list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.enqueued_at.is_(None), WebhookDelivery.enqueued_at < now - BACKSTOP_AFTER),
                or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
    )
    if ids:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids))
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
    return ids
