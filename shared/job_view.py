"""A job as clients see it (GET /v1/jobs/{id}, webhook payloads, SSE terminal events), with its place in
the queue and an estimate of when it will be done.

It lives in shared/ because the worker also renders it: a webhook's `data` is written into the outbox in
the same transaction as the status change, and must be exactly what GET returns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.orm import Session

from shared import broker, positions
from shared.limits import PRIORITIES
from shared.settings import get_settings
from shared.storage import get_storage
from shared.tables import Job

PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}
# An exponentially weighted average of run seconds per model; a new measure counts for this share.
ETA_WEIGHT = 0.3


# Built once: every read of a queued job runs it, and building the statement costs more CPU than running it.
_AHEAD = (
    select(func.count())
    .select_from(Job)
    .where(
        Job.queue == bindparam("queue"),
        Job.status == "queued",
        or_(
            Job.priority > bindparam("priority"),
            and_(Job.priority == bindparam("priority"), Job.created_at < bindparam("created_at")),
            and_(
                Job.priority == bindparam("priority"),
                Job.created_at == bindparam("created_at"),
                Job.id < bindparam("id"),
            ),
        ),
    )
)


# (queue_position, eta_seconds) of a queued job.
Place = tuple[int, int | None]


def place_commands(pipe: Any, job: Job) -> None:
    """Queue, on a sync or an asyncio Redis pipeline, the two commands `place_from` reads: the jobs of its queue
    taken before this one (from the queue's position set, shared.positions; -1 where the set cannot tell)
    and its model's average run time."""
    positions.ahead_in(pipe, job.queue, job.id, positions.score(job.priority, job.created_at))
    pipe.get(eta_key(job.model))


def place_from(answers: list[Any]) -> tuple[int, float | None]:
    """(position, or -1 to count it in the database; average run seconds or None) from `place_commands`."""
    found, stored = answers
    return int(found), float(stored) if stored is not None else None


def places_from(answers: list[Any], count: int) -> list[tuple[int, float | None]]:
    """`place_from` for each of `count` jobs whose `place_commands` ended a pipeline's `answers`, in order."""
    tail = answers[len(answers) - 2 * count :]
    return [place_from(tail[2 * i : 2 * i + 2]) for i in range(count)]


def place_of(session: Session, job: Job, *, asked: tuple[int, float | None] | None = None) -> Place:
    """The queued job's position, the jobs in its queue a worker takes before it (priority desc, created_at,
    id), and its ETA: one Redis round trip, plus the database where the position set cannot tell. `asked`:
    what the caller's own round trip answered ((-1, None) if Redis failed), so Redis is not asked again."""
    found, average = asked or (-1, None)
    if asked is None:
        try:
            pipe = broker.get_redis().pipeline(transaction=False)
            place_commands(pipe, job)
            found, average = place_from(pipe.execute())
        except redis.RedisError:  # positions are counted below; an estimate is optional
            pass
    if found < 0:
        params = {"queue": job.queue, "priority": job.priority, "created_at": job.created_at, "id": job.id}
        found = int(session.scalar(_AHEAD, params) or 0)
    running = running_in(session, job.queue) if average is not None else 0
    return found, eta_from(average, found, running)


def running_in(session: Session, queue: str) -> int:
    """Jobs of the queue running now: the workers an ETA spreads the jobs ahead over."""
    return int(
        session.scalar(select(func.count()).select_from(Job).where(Job.queue == queue, Job.status == "running")) or 0
    )


def eta_key(model: str) -> str:
    return f"{get_settings().redis_prefix}eta:{model}"


def record_run_seconds(model: str, seconds: float) -> None:
    """Fold one measured run time into the model's average. Lost updates under races are harmless."""
    record_run_seconds_many([(model, seconds)])


def record_run_seconds_many(runs: list[tuple[str, float]]) -> None:
    """`record_run_seconds` for (model, seconds) runs in order, e.g. a batch's: one read, one write."""
    models = list(dict.fromkeys(model for model, _ in runs))
    client = broker.get_redis()
    stored = client.mget([eta_key(m) for m in models])
    averages: dict[str, float | None] = {
        m: float(v) if v is not None else None for m, v in zip(models, stored, strict=True)
    }
    for model, seconds in runs:
        previous = averages[model]
        averages[model] = seconds if previous is None else ETA_WEIGHT * seconds + (1 - ETA_WEIGHT) * previous
    pipe = client.pipeline(transaction=False)
    for model, average in averages.items():
        pipe.set(eta_key(model), f"{average:.3f}", ex=7 * 24 * 3600)
    pipe.execute()


def eta_from(average: float | None, position: int, running: int) -> int | None:
    """Seconds until the job should be done: the jobs ahead spread over the workers now running its queue,
    plus its own run, at the model's `average` run time (None until a worker has measured it)."""
    if average is None:
        return None
    return round(average * (position / max(1, running) + 1))


def job_view(session: Session | None, job: Job, *, place: Place | None = None) -> dict[str, Any]:
    """The JSON-ready dict of `JobRead`. A queued job also gets its position and ETA: `place` where the caller
    has them, else read here where there is a session."""
    storage = get_storage()
    outputs = [
        {
            "url": storage.url(o["key"]),
            "nsfw": o.get("nsfw", False),
            "watermarked": o.get("watermark", False),
            **{k: o[k] for k in ("width", "height", "seed", "content_type")},
        }
        for o in job.outputs or []
    ]
    progress = None
    if job.status == "running" and job.progress_total:
        progress = {"step": job.progress_step or 0, "total": job.progress_total}
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    position = eta = None
    if job.status == "queued":
        if place is None and session is not None:
            place = place_of(session, job)
        if place is not None:
            position, eta = place
    webhook = {"url": job.webhook_url, "events": job.webhook_events or []} if job.webhook_url else None
    return {
        "id": job.id,
        "status": job.status,
        "priority": PRIORITY_NAMES.get(job.priority, "normal"),
        "model": job.model,
        "request": job.request,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "progress": progress,
        "queue_position": position,
        "eta_seconds": eta,
        "outputs": outputs,
        "error": error,
        "metadata": job.client_metadata,
        "webhook": webhook,
    }


def _iso(value: datetime | None) -> str | None:
    # The same text pydantic writes for JobRead, so a webhook's `data` equals the GET body.
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value is not None else None
