"""Job events: what happened to a job, told to the outside world once the change has committed.

shared.jobs calls `job_created`, `job_transitioned` and `jobs_progressed` inside the transaction of the
change. Webhook notifications are written there, into the outbox table, so one exists if and only if the
change committed. Everything that lives in Redis (a per-job event stream that SSE and long polls read,
the webhook send task, the run-time average behind ETAs) runs only after the commit, and is best-effort:
the database stays the source of truth, the reconciler re-sends outbox rows Redis lost, and readers fall
back to polling the database when a stream is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from redis.client import Pipeline
from sqlalchemy import event
from sqlalchemy.orm import Session

from shared import batch_events, broker, positions, webhooks
from shared.job_view import record_run_seconds_many
from shared.settings import get_settings
from shared.tables import Job

log = logging.getLogger("darkroom.events")

# Stream event names by the status a job moved to ("running" is announced as "started").
EVENT_FOR_STATUS = {
    "queued": "queued",
    "running": "started",
    "succeeded": "succeeded",
    "failed": "failed",
    "canceled": "canceled",
    "expired": "expired",
}
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "canceled", "expired"})
ENDED_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# A stream holds a job's whole story; progress is rate-limited upstream, so this bound is generous.
STREAM_MAXLEN = 2000

_AFTER_COMMIT = "darkroom_after_commit"
# What a transaction collects for after its commit: Redis commands (stream events, queue positions), and run
# times of jobs that succeeded.
_REDIS_COMMANDS = "darkroom_redis_commands"
_RUN_SECONDS = "darkroom_run_seconds"


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once this session's transaction commits; forget it on rollback."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for action in session.info.pop(_AFTER_COMMIT, []):
        try:
            action()
        except Exception as exc:  # Redis trouble: the outbox backstop and DB polling cover for it
            log.warning("post-commit action failed: %s: %s", type(exc).__name__, exc)


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    for key in (_AFTER_COMMIT, _REDIS_COMMANDS, _RUN_SECONDS):
        session.info.pop(key, None)


def _collect_after_commit(session: Session, key: str, item: Any, flush: Callable[[list[Any]], None]) -> None:
    """Collect `item` for `flush`, called once with everything collected when the transaction commits.

    A batch's claims or results are eight transitions in one transaction: their stream events (and run
    times) then go to Redis together, in one round trip, in the order they happened.
    """
    pending = session.info.get(key)
    if pending is None:
        pending = session.info[key] = []

        def send() -> None:
            session.info.pop(key, None)
            flush(pending)

        after_commit(session, send)
    pending.append(item)


def in_pipeline_after_commit(session: Session, command: Callable[[Pipeline], Any]) -> None:
    """Queue a Redis command for after the commit; a transaction's commands go in one round trip, in order."""
    _collect_after_commit(session, _REDIS_COMMANDS, command, _run_pipeline)


def _run_pipeline(commands: list[Callable[[Pipeline], Any]]) -> None:
    pipe = broker.get_redis().pipeline(transaction=False)
    for command in commands:
        command(pipe)
    pipe.execute()


def _stream_after_commit(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
    ttl = get_settings().event_stream_ttl
    in_pipeline_after_commit(session, lambda pipe: _xadd(pipe, job_id, kind, data, ttl))


def _xadd(pipe: Pipeline, job_id: str, kind: str, data: dict[str, Any], ttl: int) -> None:
    """Add one event to the job's Redis stream (its entry id is the SSE event id)."""
    key = stream_key(job_id)
    pipe.xadd(key, {"type": kind, "data": json.dumps(data)}, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, ttl)


def _position_after_commit(session: Session, job: Job) -> None:
    """The job enters (queued) or leaves (any other status) its queue's position set (shared.positions)."""
    queue, job_id = job.queue, job.id
    if job.status == "queued":
        job_score = positions.score(job.priority, job.created_at)
        in_pipeline_after_commit(session, lambda pipe: positions.add(pipe, queue, job_id, job_score))
    else:
        in_pipeline_after_commit(session, lambda pipe: positions.remove(pipe, queue, job_id))


def stream_key(job_id: str) -> str:
    return f"{get_settings().redis_prefix}events:{job_id}"


def _notify(session: Session, job: Job, kind: str) -> None:
    """Write the outbox row for a webhook the job subscribed to, and send it after commit."""
    if not job.webhook_url or kind not in (job.webhook_events or webhooks.DEFAULT_EVENTS):
        return
    delivery_id = webhooks.add_delivery(session, job, kind)
    if delivery_id is not None:
        after_commit(session, lambda: webhooks.publish_delivery(delivery_id))


def created_in(pipe: Any, job: Job) -> None:
    """What `job_created` sends after the commit, as commands in the caller's pipeline (sync or asyncio), for
    a job inserted outside any session (api.group_commit on PostgreSQL)."""
    _xadd(pipe, job.id, "queued", {"status": "queued"}, get_settings().event_stream_ttl)
    positions.add(pipe, job.queue, job.id, positions.score(job.priority, job.created_at))


def job_created(session: Session, job: Job) -> None:
    _stream_after_commit(session, job.id, "queued", {"status": "queued"})
    _position_after_commit(session, job)


def job_transitioned(session: Session, job: Job, status: str) -> None:
    """Called by shared.jobs.transition after it won a move, in the same transaction, with the job as its
    UPDATE ... RETURNING left it."""
    job_id = job.id
    kind = EVENT_FOR_STATUS[status]
    _notify(session, job, kind)
    if status in ("queued", "running", "canceled", "failed"):  # the moves into and out of `queued`
        _position_after_commit(session, job)
    if status in ENDED_STATUSES and job.batch_id is not None:
        # In this transaction, so the batch's countdown and its `batch.completed` row commit with the job's end.
        delivery_id = batch_events.job_ended(session, job.batch_id)
        if delivery_id is not None:
            after_commit(session, lambda: webhooks.publish_delivery(delivery_id))
    data: dict[str, Any] = {"status": status}
    if status == "running":
        data["attempt"] = job.attempts
    if job.error_code:
        data["error"] = {"code": job.error_code, "message": job.error_message or ""}
    _stream_after_commit(session, job_id, kind, data)
    if status == "succeeded" and job.started_at is not None and job.finished_at is not None:
        seconds = (job.finished_at - job.started_at).total_seconds()
        _collect_after_commit(session, _RUN_SECONDS, (job.model, seconds), record_run_seconds_many)


def _progress_data(step: int, total: int, preview: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"step": step, "total": total}
    if preview is not None:
        data["preview"] = preview  # for the live stream only: webhooks and the database never carry it
    return data


def jobs_progressed(
    session: Session,
    rows: list[tuple[str, str | None, list[str] | None]],
    step: int,
    total: int,
    previews: dict[str, str] | None = None,
) -> None:
    """Called by shared.jobs.record_progress_many after a progress UPDATE, in the same transaction: `rows` are
    its RETURNING (id, webhook_url, webhook_events), so no job is read again."""
    for job_id, url, subscribed in rows:
        if url and "progress" in (subscribed or ()):
            job = session.get(Job, job_id, populate_existing=True)
            if job is not None:
                _notify(session, job, "progress")
    for job_id, _, _ in rows:
        _stream_after_commit(session, job_id, "progress", _progress_data(step, total, (previews or {}).get(job_id)))
