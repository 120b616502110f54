"""Self-healing: republish jobs whose message Redis lost, take jobs back from workers that died, re-send
webhook deliveries whose message was lost, and forget expired idempotency keys. Each pass also runs the
retention sweep (shared.retention), under its own lock.

It runs as a thread inside every worker process, under a Redis lock, so one instance acts at a time and
`darkroom api` plus `darkroom worker` need nothing else to recover.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import timedelta

import redis

from shared import broker, idempotency, positions, retention, webhooks
from shared.db import session_scope
from shared.jobs import expire_leases, queued_before, queued_positions
from shared.settings import get_settings
from shared.tables import utcnow

log = logging.getLogger("darkroom.reconciler")

# A job is only republished once it has sat in `queued` this long without a "published" marker, so the
# reconciler does not race the API between its commit and its publish.
PUBLISH_GRACE = timedelta(seconds=2)
POSITION_SYNC_SECONDS = 60


def reconcile_once(*, expire: bool = True, sync_positions: bool = True) -> dict[str, int]:
    settings = get_settings()
    requeued: list[tuple[str, str]] = []
    if expire:
        with session_scope() as session:
            requeued = [(j.id, j.queue) for j in expire_leases(session, max_attempts=settings.max_attempts)]
    for job_id, queue in requeued:
        log.warning("lease expired; job %s back in queue %s", job_id, queue)
        broker.publish_job(job_id, queue)

    with session_scope() as session:
        waiting = queued_before(session, utcnow() - PUBLISH_GRACE)
    flags = broker.is_published([job_id for job_id, _ in waiting])
    lost = [(job_id, queue) for (job_id, queue), ok in zip(waiting, flags, strict=True) if not ok]
    for job_id, queue in lost:
        log.warning("message for queued job %s was lost; republishing to %s", job_id, queue)
        broker.publish_job(job_id, queue)

    positions_fixed = 0
    if sync_positions:
        with session_scope() as session:
            queued = queued_positions(session)
        positions_fixed = sum(positions.sync(queued))
        if positions_fixed:
            log.warning("queue position sets were out of step with the database: %d members fixed", positions_fixed)

    with session_scope() as session:
        deliveries = webhooks.due_for_backstop(session)
        expired_keys = idempotency.delete_expired(session)
    for delivery_id in deliveries:
        webhooks.publish_delivery(delivery_id)
    if deliveries:
        log.warning("re-sent %d webhook deliveries whose message was lost or is overdue", len(deliveries))
    return {
        "requeued": len(requeued),
        "republished": len(lost),
        "webhooks_resent": len(deliveries),
        "idempotency_keys_expired": expired_keys,
        "positions_fixed": positions_fixed,
    }


def run_forever(stop: threading.Event) -> None:
    settings = get_settings()
    interval = settings.reconcile_interval
    last_failure = last_sync = -float("inf")
    while not stop.wait(interval):
        try:
            # Short: a worker killed mid-pass keeps the lock until it times out, delaying everyone's recovery.
            # Two passes overlapping are safe anyway (conditional updates, harmless duplicate publishes).
            lock = broker.lock("reconciler", timeout=max(interval * 4, 10))
            if not lock.acquire():
                continue
            try:
                # After an outage no worker could renew its lease, so every lease looks expired. Give live
                # workers one lease period to renew (and to land the results they held on to) before
                # treating them as dead; otherwise finished work would be thrown away and redone.
                # The position sets are compared with every queued job: once a minute is enough for a
                # repair that only Redis losing writes makes necessary.
                sync = time.monotonic() - last_sync > POSITION_SYNC_SECONDS
                reconcile_once(expire=time.monotonic() - last_failure > settings.lease_seconds, sync_positions=sync)
                if sync:
                    last_sync = time.monotonic()
            finally:
                with contextlib.suppress(redis.exceptions.LockError):
                    lock.release()
            # After the release: a slow storage delete must not hold back the next worker's healing pass.
            retention.run_pass()
        except Exception:  # keep healing through database or Redis outages
            last_failure = time.monotonic()
            log.exception("reconciler pass failed")


def start_thread() -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(stop,), name="darkroom-reconciler", daemon=True).start()
    return stop
