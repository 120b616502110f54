"""The job state machine: the one place a job's status changes.

Every change is a single conditional UPDATE (`... WHERE id = :id AND status IN (:allowed)`), so of two
processes racing for the same move exactly one wins; the loser sees `False` and backs off. A move the
table below does not allow raises `IllegalTransition` before any SQL runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import JSON, and_, bindparam, case, func, insert, inspect, literal, or_, select, tuple_, update
from sqlalchemy.orm import Session

from shared import broker, events, positions
from shared.errors import Conflict, IllegalTransition, NotFound
from shared.tables import Job, new_id, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
# A finished job whose objects retention (or DELETE /v1/jobs/{id}) removed; its record stays.
EXPIRED = "expired"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED, EXPIRED)
# Ended: the job will never run again. Expired jobs had ended before, so they count too.
ENDED = frozenset({SUCCEEDED, FAILED, CANCELED})
TERMINAL = ENDED | {EXPIRED}

TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELED, FAILED}),
    # running -> queued: a lease expired or a worker handed its job back on shutdown.
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELED, QUEUED}),
    SUCCEEDED: frozenset({EXPIRED}),
    FAILED: frozenset({EXPIRED}),
    CANCELED: frozenset({EXPIRED}),
    EXPIRED: frozenset(),
}


def transition(
    session: Session,
    job_id: str,
    *,
    from_: Iterable[str],
    to: str,
    where: Sequence[Any] = (),
    values: dict[str, Any] | None = None,
) -> bool:
    """Move `job_id` from one of `from_` to `to`; return whether this caller won the move."""
    return job_id in transition_many(session, [job_id], from_=from_, to=to, where=where, values=values)


def transition_many(
    session: Session,
    job_ids: Sequence[str],
    *,
    from_: Iterable[str],
    to: str,
    where: Sequence[Any] = (),
    values: dict[str, Any] | None = None,
) -> dict[str, Job]:
    """`transition` for several jobs in one UPDATE (a batch's claim); returns the jobs whose move this won,
    by id, fresh from the UPDATE."""
    sources = frozenset(from_)
    for source in sources:
        if to not in TRANSITIONS[source]:
            raise IllegalTransition(f"job status cannot go from {source!r} to {to!r}")
    if not job_ids:
        return {}
    now = utcnow()
    # RETURNING the rows refreshes the session's copies of the jobs in the same round trip, so the event
    # code below and the caller read the new state without a SELECT of their own. Held here: the session's
    # identity map keeps only weak references, and a copy nobody holds is read again by the next get().
    stmt = (
        update(Job)
        .where(Job.id.in_(job_ids), Job.status.in_(sorted(sources)), *where)
        .values(status=to, updated_at=now, **(values or {}))
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return _moved(session, stmt, {}, job_ids, to)


def _moved(session: Session, stmt: Any, params: dict[str, Any], job_ids: Sequence[str], to: str) -> dict[str, Job]:
    """Run a transition's UPDATE ... RETURNING; the jobs it moved, by id, each announced."""
    won = {job.id: job for job in session.execute(stmt, params).scalars()}
    for job_id in job_ids:
        if job_id in won:
            # Webhook outbox rows join this transaction; stream events and task sends wait for its commit.
            events.job_transitioned(session, won[job_id], to)
    return won


def new_job(
    *,
    tenant_id: str,
    model: str,
    queue: str,
    request: dict[str, Any],
    metadata: dict[str, Any] | None,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
    priority: int = 1,
    batch_key: str | None = None,
    job_id: str | None = None,
    batch_id: str | None = None,
    batch_index: int | None = None,
) -> Job:
    """A queued job, not yet in any session: `create_job` or `insert_jobs` writes it."""
    now = utcnow()
    return Job(
        id=job_id or new_id(),
        tenant_id=tenant_id,
        status=QUEUED,
        model=model,
        queue=queue,
        priority=priority,
        batch_key=batch_key,
        batch_id=batch_id,
        batch_index=batch_index,
        request=request,
        client_metadata=metadata,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        attempts=0,
        created_at=now,
        updated_at=now,
    )


def create_job(session: Session, **fields: Any) -> Job:
    """Insert a new queued job (the fields of `new_job`) in the session's transaction."""
    job = new_job(**fields)
    session.add(job)
    session.flush()
    events.job_created(session, job)
    return job


_COLUMN_KEYS = frozenset(attr.key for attr in Job.__mapper__.column_attrs)


def insert_values(job: Job) -> dict[str, Any]:
    """The columns a job made by `new_job` sets, by attribute name, as a unit-of-work flush would write them:
    an unset JSON column stays SQL NULL, one set to None is JSON null."""
    return {k: v for k, v in inspect(job).dict.items() if k in _COLUMN_KEYS}


def insert_jobs(session: Session, new: list[Job]) -> None:
    """Insert jobs made by `new_job` with one statement, outside the identity map: many submits committed
    together (api.group_commit) cost one round trip instead of a unit-of-work flush each."""
    session.execute(insert(Job), [insert_values(job) for job in new])
    for job in new:
        events.job_created(session, job)


def publish_after_commit(session: Session, job: Job) -> None:
    """Send the job's run message once the transaction commits, in the round trip of its stream event. If
    Redis is down then, the job is still durable: the reconciler publishes it once Redis is back."""
    job_id, queue = job.id, job.queue
    events.in_pipeline_after_commit(session, lambda pipe: broker.publish_in(pipe, job_id, queue))


def get_job(session: Session, job_id: str, tenant_id: str | None = None) -> Job:
    """The job, or NotFound. With a tenant, another tenant's job is indistinguishable from none."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise NotFound(f"job {job_id!r} not found")
    return job


def try_claim(session: Session, job_id: str, *, worker_id: str, lease_seconds: int) -> bool:
    """queued -> running for this worker, counting an attempt; False if someone else got there first."""
    return job_id in try_claim_many(session, [job_id], worker_id=worker_id, lease_seconds=lease_seconds)


def try_claim_many(
    session: Session, job_ids: Sequence[str], *, worker_id: str, lease_seconds: int, skip_locked: bool = False
) -> dict[str, Job]:
    """`try_claim` for several jobs in one statement; returns those this worker got, by id. With
    `skip_locked`, only the rows no other transaction holds (PostgreSQL's `FOR UPDATE SKIP LOCKED`)."""
    if not job_ids:
        return {}
    now = utcnow()
    params = {
        "ids": list(job_ids),
        "now": now,
        "claimer": worker_id,
        "lease_until": now + timedelta(seconds=lease_seconds),
    }
    return _moved(session, _claim_statement(skip_locked), params, job_ids, RUNNING)


@cache
def _claim_statement(skip_locked: bool) -> Any:
    """The claim's UPDATE, built once: it runs between two pipeline calls, and building it cost the worker
    more CPU than PostgreSQL took to run it. Bound per call: ids, now, claimer, lease_until."""
    ids: Any = bindparam("ids", expanding=True)
    where = [Job.id.in_(ids), Job.status == QUEUED]
    if skip_locked:
        # Exactly the rows it can lock now: a row locked and then left queued would make a concurrent
        # claimer skip it, and spend its token on nothing.
        free = select(Job.id).where(Job.id.in_(ids), Job.status == QUEUED).with_for_update(skip_locked=True)
        where.append(Job.id.in_(free.scalar_subquery()))
    now = bindparam("now", type_=Job.updated_at.type)
    return (
        update(Job)
        .where(*where)
        .values(
            status=RUNNING,
            updated_at=now,
            attempts=Job.attempts + 1,
            worker_id=bindparam("claimer", type_=Job.worker_id.type),
            lease_expires_at=bindparam("lease_until", type_=Job.lease_expires_at.type),
            started_at=now,
            progress_step=None,
            progress_total=None,
        )
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    )


def claim_job(session: Session, job_id: str, *, worker_id: str, lease_seconds: int) -> Job | None:
    """queued -> running for this worker. Returns the job with its new attempt number, or None if taken.

    Workers pick which job to claim through `shared.scheduling.claim_jobs`; this claims one named job.
    """
    won = try_claim(session, job_id, worker_id=worker_id, lease_seconds=lease_seconds)
    return get_job(session, job_id) if won else None


def _owned(job_id: str, attempt: int) -> list[Any]:
    # A worker acts on a job only while the attempt it claimed is still the current one: once a lease
    # expires and another worker claims the job, the first one's writes match nothing.
    return [Job.attempts == attempt]


def renew_lease(session: Session, job_id: str, *, attempt: int, lease_seconds: int) -> bool:
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, *_owned(job_id, attempt))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def record_progress(session: Session, job_id: str, *, attempt: int, step: int, total: int) -> bool:
    """Store progress; returns False when the job is no longer this attempt's to run (canceled, taken over)."""
    return job_id in record_progress_many(session, {job_id: attempt}, step=step, total=total)


def record_progress_many(
    session: Session, attempts: dict[str, int], *, step: int, total: int, previews: dict[str, str] | None = None
) -> set[str]:
    """`record_progress` for a whole batch in one statement; returns the ids still this worker's to run.

    `previews` (job id -> image `data:` URI) go to the live event stream only, never to the database.
    """
    if not attempts:
        return set()
    owned = or_(*(and_(Job.id == job_id, *_owned(job_id, attempt)) for job_id, attempt in attempts.items()))
    stmt = (
        update(Job)
        .where(Job.status == RUNNING, owned)
        .values(progress_step=step, progress_total=total)
        .returning(Job.id, Job.webhook_url, Job.webhook_events)
        .execution_options(synchronize_session=False)
    )
    rows = [(r[0], r[1], r[2]) for r in session.execute(stmt)]
    events.jobs_progressed(session, rows, step, total, previews)
    return {job_id for job_id, _, _ in rows}


def succeed_job(session: Session, job_id: str, *, attempt: int, outputs: list[dict[str, Any]]) -> bool:
    # Outputs are written in the same UPDATE as the status, so no reader ever sees a partial list.
    return job_id in succeed_jobs(session, {job_id: (attempt, outputs)})


def succeed_jobs(session: Session, done: dict[str, tuple[int, list[dict[str, Any]]]]) -> dict[str, Job]:
    """`succeed_job` for a batch's jobs (job id -> (attempt, outputs)) in one UPDATE, each with its own
    outputs; returns the jobs this worker still owned, by id, as the UPDATE left them. One statement, not
    one per job: recording a batch runs beside the next batch's call, whose Python it slows for as long as
    it holds the GIL."""
    if not done:
        return {}
    outputs = case(
        {job_id: literal(outs, JSON()) for job_id, (_, outs) in done.items()}, value=Job.id, else_=Job.outputs
    )
    won = transition_many(
        session,
        list(done),
        from_=[RUNNING],
        to=SUCCEEDED,
        where=[tuple_(Job.id, Job.attempts).in_([(job_id, attempt) for job_id, (attempt, _) in done.items()])],
        values={"outputs": outputs, "finished_at": utcnow(), "lease_expires_at": None},
    )
    return won


def fail_job(session: Session, job_id: str, *, attempt: int | None, code: str, message: str) -> bool:
    """running -> failed (for the given attempt), or queued -> failed when `attempt` is None."""
    values = {
        "error_code": code,
        "error_message": message[:2000],
        "finished_at": utcnow(),
        "lease_expires_at": None,
    }
    if attempt is None:
        return transition(session, job_id, from_=[QUEUED], to=FAILED, values=values)
    return transition(session, job_id, from_=[RUNNING], to=FAILED, where=_owned(job_id, attempt), values=values)


def hand_back(session: Session, job_id: str, *, attempt: int) -> bool:
    """running -> queued, e.g. on graceful shutdown; the attempt is not counted against the job."""
    return transition(
        session,
        job_id,
        from_=[RUNNING],
        to=QUEUED,
        where=_owned(job_id, attempt),
        values={"attempts": Job.attempts - 1, "worker_id": None, "lease_expires_at": None},
    )


def cancel_job(session: Session, job_id: str, tenant_id: str) -> Job:
    job = get_job(session, job_id, tenant_id)
    if job.status in TERMINAL:
        raise Conflict(f"job {job_id!r} is already {job.status}", code="job_finished")
    won = transition(
        session,
        job_id,
        from_=[QUEUED, RUNNING],
        to=CANCELED,
        values={"finished_at": utcnow(), "lease_expires_at": None, "outputs": None},
    )
    job = get_job(session, job_id)
    if not won:
        # It finished between our read and our update.
        raise Conflict(f"job {job_id!r} is already {job.status}", code="job_finished")
    return job


def cancel_batch_jobs(session: Session, batch_id: str) -> list[str]:
    """queued/running -> canceled for every unfinished job of a batch; returns the ids canceled.

    One UPDATE for all of them, so this takes the jobs' row locks before the batch's (each canceled job
    counts the batch down), in the same order as a worker finishing a job does: the two cannot deadlock.
    """
    for source in (QUEUED, RUNNING):
        if CANCELED not in TRANSITIONS[source]:
            raise IllegalTransition(f"job status cannot go from {source!r} to {CANCELED!r}")
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.batch_id == batch_id, Job.status.in_([QUEUED, RUNNING]))
        .values(status=CANCELED, updated_at=now, finished_at=now, lease_expires_at=None, outputs=None)
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    canceled = list(session.scalars(stmt).all())
    for job in canceled:
        events.job_transitioned(session, job, CANCELED)
    return [job.id for job in canceled]


def expire_job(session: Session, job_id: str) -> bool:
    """ended -> expired, once the job's objects are gone from storage. Output URLs go with them; the status
    the job ended with is kept in `ended_as`."""
    return transition(session, job_id, from_=ENDED, to=EXPIRED, values={"outputs": None, "ended_as": Job.status})


def expire_leases(session: Session, *, max_attempts: int, now: datetime | None = None) -> list[Job]:
    """Running jobs whose worker went silent: back to the queue, or failed once out of attempts.

    Returns the jobs put back in the queue, for the caller to publish after commit.
    """
    now = now or utcnow()
    stale = session.scalars(select(Job).where(Job.status == RUNNING, Job.lease_expires_at < now).limit(500)).all()
    requeued = []
    for job in stale:
        lease_still_expired = [Job.lease_expires_at < now, Job.attempts == job.attempts]
        if job.attempts >= max_attempts:
            transition(
                session,
                job.id,
                from_=[RUNNING],
                to=FAILED,
                where=lease_still_expired,
                values={
                    "error_code": "worker_crashed",
                    "error_message": f"the worker running this job stopped responding {job.attempts} times",
                    "finished_at": now,
                    "lease_expires_at": None,
                },
            )
        elif transition(
            session,
            job.id,
            from_=[RUNNING],
            to=QUEUED,
            where=lease_still_expired,
            values={
                "worker_id": None,
                "lease_expires_at": None,
                "progress_step": None,
                "progress_total": None,
            },
        ):
            requeued.append(job)
    return requeued


def queued_before(session: Session, cutoff: datetime, limit: int = 1000) -> list[tuple[str, str]]:
    """(id, queue) of jobs queued and untouched since `cutoff`, oldest first."""
    rows = session.execute(
        select(Job.id, Job.queue)
        .where(Job.status == QUEUED, Job.updated_at < cutoff)
        .order_by(Job.updated_at)
        .limit(limit)
    ).all()
    return [(r[0], r[1]) for r in rows]


def queued_positions(session: Session) -> dict[str, dict[str, int]]:
    """queue -> {job id: position score (shared.positions)} of every queued job."""
    out: dict[str, dict[str, int]] = {}
    rows = session.execute(select(Job.queue, Job.id, Job.priority, Job.created_at).where(Job.status == QUEUED))
    for queue, job_id, priority, created_at in rows:
        out.setdefault(queue, {})[job_id] = positions.score(priority, created_at)
    return out


def queue_stats(session: Session) -> list[tuple[str, int, datetime | None]]:
    """(queue, queued jobs, creation time of the oldest queued job) for every queue with queued jobs."""
    rows = session.execute(
        select(Job.queue, func.count(), func.min(Job.created_at)).where(Job.status == QUEUED).group_by(Job.queue)
    ).all()
    return [(r[0], int(r[1]), _aware(r[2])) for r in rows]


def status_counts(session: Session) -> list[tuple[str, str, str | None, int]]:
    """(model, status, error code, jobs) over every job: totals for /metrics, counted where they cannot be lost."""
    # An expired job is counted under the status it ended with, so these totals never go down.
    status = func.coalesce(Job.ended_as, Job.status)
    rows = session.execute(
        select(Job.model, status, Job.error_code, func.count()).group_by(Job.model, status, Job.error_code)
    ).all()
    return [(r[0], r[1], r[2], int(r[3])) for r in rows]


def _aware(value: datetime | None) -> datetime | None:
    # An aggregate bypasses the UTC column type, so SQLite hands back a naive (UTC) datetime or a string.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def list_jobs(
    session: Session, tenant_id: str, *, status: str | None, limit: int, after: tuple[datetime, str] | None
) -> list[Job]:
    """A tenant's jobs, newest first, starting below the keyset cursor `after` (created_at, id)."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if after is not None:
        created, job_id = after
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return list(session.scalars(stmt).all())
