"""Submits that arrive together commit together: their jobs are inserted with one statement in one
transaction, and their run messages, stream events and queue positions go to Redis in one round trip.

Alone, each submit paid a unit-of-work flush, a transaction of its own and two Redis round trips: most of
the API's CPU per POST /v1/jobs in bench.api. Each API process runs one group commit at a time. Submits
that arrive while it runs wait for the next one, which takes them all (up to MAX_GROUP). A lone submit
commits at once: grouping adds no wait, only company when there is a queue.

A group that fails for a reason of one of its jobs is not the others' problem: its jobs are then committed
one by one. A database that is down fails them all (503), as it would have one by one.

On PostgreSQL the group commits on the event loop, through the asyncio clients of api.aio_reads: one
multi-row INSERT (a statement is its own transaction), then one Redis script (shared.enqueue) that sends
every job's run message, stream event and position and answers their places in line. A worker thread and
SQLAlchemy's unit of work cost more than the statement itself there. SQLite keeps the thread.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from functools import cache

import psycopg
import psycopg_pool
import redis
from psycopg.types.json import Json
from sqlalchemy import JSON
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool

from api import aio_reads
from api.deps import invalid_key
from api.schemas import JobRead
from shared import broker, enqueue, jobs
from shared.db import read_scope, session_scope
from shared.job_view import Place, eta_from, job_view, place_commands, place_of, places_from, running_in
from shared.tables import ApiKey, Job

log = logging.getLogger("darkroom.api")

MAX_GROUP = 64
# The database is unreachable: every job of the group would fail alone too.
_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)
_UNAVAILABLE_ASYNC = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


class _Queue:
    def __init__(self) -> None:
        self.pending: list[tuple[Job, str | None, asyncio.Future[JobRead]]] = []
        self.task: asyncio.Task[None] | None = None


# Per event loop: futures belong to the loop that awaits them (uvicorn runs one per process).
_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = weakref.WeakKeyDictionary()


async def commit(job: Job, key_hash: str | None = None) -> JobRead:
    """Insert and publish a job made by `shared.jobs.new_job`, with whatever else is being submitted now;
    returns it as the API shows it. Its inputs must be stored already.

    With the hash of the API key that submits it (PostgreSQL only), the job is inserted only if that key is
    still live then, in the same statement, and is refused with 401 otherwise: the submit needs no lookup
    of its own for a key this process has seen before (api.deps.get_submitter)."""
    loop = asyncio.get_running_loop()
    queue = _queues.get(loop)
    if queue is None:
        queue = _queues[loop] = _Queue()
    future: asyncio.Future[JobRead] = loop.create_future()
    # Its outcome is read here, or by nobody when the client hung up: mark an error seen either way, so that
    # asyncio does not log it as never retrieved (the request's own log already says what happened).
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    queue.pending.append((job, key_hash, future))
    if queue.task is None:
        queue.task = loop.create_task(_drain(queue))
    # Shielded: a client that hangs up does not take its job out of a commit that may already have made it.
    return await asyncio.shield(future)


async def _drain(queue: _Queue) -> None:
    try:
        while queue.pending:
            taken, queue.pending = queue.pending[:MAX_GROUP], queue.pending[MAX_GROUP:]
            group = [job for job, _, _ in taken]
            try:
                if aio_reads.enabled():
                    outcomes = await _commit_group_async(group, [key_hash for _, key_hash, _ in taken])
                else:
                    outcomes = await run_in_threadpool(_commit_group, group)
            except Exception as exc:
                outcomes = [exc] * len(taken)
            for (_, _, future), outcome in zip(taken, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
    finally:
        queue.task = None


def _commit_group(new: list[Job]) -> list[JobRead | Exception]:
    try:
        with session_scope() as session:
            jobs.insert_jobs(session, new)
            for job in new:
                jobs.publish_after_commit(session, job)
    except _UNAVAILABLE:
        raise
    except Exception as exc:
        if len(new) == 1:
            return [exc]
        return [outcome for job in new for outcome in _commit_group([job])]
    places: list[Place | None]
    try:
        places = list(_places(new))
    except Exception as exc:
        # Committed: each answer is a 202 whatever happens now, if need be without a place in line.
        log.warning("queue positions of %d new jobs unavailable: %s", len(new), type(exc).__name__)
        places = [None] * len(new)
    return [JobRead.model_validate(job_view(None, job, place=place)) for job, place in zip(new, places, strict=True)]


def _places(new: list[Job]) -> list[Place]:
    """Each new job's (queue_position, eta_seconds): one Redis round trip for the group, plus one count of the
    running jobs per queue once its model's run time is known. Where Redis cannot tell, counted in the
    database, job by job."""
    try:
        pipe = broker.get_redis().pipeline(transaction=False)
        for job in new:
            place_commands(pipe, job)
        answers = pipe.execute()
    except redis.RedisError:
        answers = [-1, None] * len(new)
    found = places_from(answers, len(new))
    if all(position >= 0 and average is None for position, average in found):
        return [(position, None) for position, _ in found]
    return _places_in_database(new, found)


def _places_in_database(new: list[Job], found: list[tuple[int, float | None]]) -> list[Place]:
    """`_places` once Redis has answered `found` for each job: what it could not tell, from the database."""
    with read_scope() as session:
        running: dict[str, int] = {}
        places: list[Place] = []
        for job, (position, average) in zip(new, found, strict=True):
            if position < 0:
                places.append(place_of(session, job, asked=(position, average)))
                continue
            if average is not None and job.queue not in running:
                running[job.queue] = running_in(session, job.queue)
            places.append((position, eta_from(average, position, running.get(job.queue, 0))))
        return places


# Attribute name -> column name, and the JSON columns, whose values psycopg must be told are JSON.
_COLUMNS = {attr.key: attr.columns[0].name for attr in Job.__mapper__.column_attrs}
_JSON_KEYS = frozenset(attr.key for attr in Job.__mapper__.column_attrs if isinstance(attr.columns[0].type, JSON))


@cache
def _insert_statement(keys: tuple[str, ...]) -> str:
    """The group's INSERT for rows setting `keys`: one array per column, so that the statement's text is the
    same for every group (psycopg prepares it once per connection), plus the submitting key's hash per row.
    A row whose key is given and no longer live is left out; the ids inserted come back."""
    table = Job.__table__
    columns = [_COLUMNS[key] for key in keys]
    names = ", ".join(f'"{name}"' for name in columns)
    arrays = ", ".join(f"%b::{table.c[name].type.compile(dialect=postgresql.dialect())}[]" for name in columns)
    return (
        f"INSERT INTO {Job.__tablename__} ({names}) "
        f"SELECT {names} FROM unnest({arrays}, %b::text[]) AS v({names}, submitter) "
        f"WHERE v.submitter IS NULL OR EXISTS (SELECT 1 FROM {ApiKey.__tablename__} k "
        f"WHERE k.key_hash = v.submitter AND k.tenant_id = v.tenant_id AND k.revoked_at IS NULL) RETURNING id"
    )


async def _commit_group_async(new: list[Job], key_hashes: list[str | None]) -> list[JobRead | Exception]:
    rows = [jobs.insert_values(job) for job in new]
    keys = tuple(rows[0])
    if any(tuple(row) != keys for row in rows):  # not from new_job alike: each row is its own statement
        return await _one_by_one(new, key_hashes)
    params = [[Json(row[key]) if key in _JSON_KEYS else row[key] for row in rows] for key in keys]
    try:
        inserted = {row.id for row in await aio_reads.execute(_insert_statement(keys), [*params, key_hashes])}
    except _UNAVAILABLE_ASYNC:
        raise
    except Exception as exc:
        if len(new) == 1:
            return [exc]
        return await _one_by_one(new, key_hashes)
    refused = {job.id for job in new if job.id not in inserted}
    for job, key_hash in zip(new, key_hashes, strict=True):
        if job.id in refused and key_hash is not None:
            aio_reads.forget_key(key_hash)
    made = [job for job in new if job.id in inserted]
    places: list[Place | None]
    try:
        places = list(await _publish_and_place(made)) if made else []
    except Exception as exc:
        log.warning("queue positions of %d new jobs unavailable: %s", len(made), type(exc).__name__)
        places = [None] * len(made)
    answers = iter(places)
    return [
        invalid_key() if job.id in refused else JobRead.model_validate(job_view(None, job, place=next(answers)))
        for job in new
    ]


async def _one_by_one(new: list[Job], key_hashes: list[str | None]) -> list[JobRead | Exception]:
    outcomes: list[JobRead | Exception] = []
    for job, key_hash in zip(new, key_hashes, strict=True):
        outcomes += await _commit_group_async([job], [key_hash])
    return outcomes


async def _publish_and_place(new: list[Job]) -> list[Place]:
    """After the commit, in one Redis script call (shared.enqueue): each job's stream event, place in the
    position set and run message (as `jobs.create_job` and `jobs.publish_after_commit` send them), then each
    one's place in line.
    If Redis fails here the jobs are still durable: the reconciler publishes them once it is back."""
    try:
        keys, args = enqueue.arguments(new)
        answers = await (await aio_reads.clients()).enqueue(keys=keys, args=args)
    except (redis.RedisError, OSError) as exc:
        log.warning("post-commit publish of %d jobs failed: %s", len(new), type(exc).__name__)
        answers = [-1, None] * len(new)
    found = places_from(answers, len(new))
    if any(position < 0 for position, _ in found):  # Redis could not tell: counted in the database
        return await run_in_threadpool(_places_in_database, new, found)
    running: dict[str, int] = {}
    for job, (_, average) in zip(new, found, strict=True):
        if average is not None and job.queue not in running:
            running[job.queue] = await aio_reads.running_in(job.queue)
    return [
        (position, eta_from(average, position, running.get(job.queue, 0)))
        for job, (position, average) in zip(new, found, strict=True)
    ]
