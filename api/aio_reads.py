"""The API's hottest reads on PostgreSQL without a worker thread, on an asyncio psycopg pool: the tenant of
an API key (every authenticated request), and for GET /v1/jobs/{id} the key and the job in one query, with
a queued job's place in line from one asyncio Redis round trip.

A poll is the request clients make most. Through the sync stack it took two hops to a worker thread, a
SQLAlchemy session for the key and another for the job: about 2 ms of API CPU per poll on the 2-core
machine of bench.api, where a bare FastAPI route costs about 0.15 ms. The sync stack is kept for SQLite
(the embedded default), whose driver has no asyncio side, and for the rare cases below.

One query answers every outcome: no row, the key is unknown or revoked (401); a row with no job, the job
does not exist or is another tenant's (404, the same answer for both); else the job, and for a queued one
the number of jobs its queue is running, for its ETA.

Lookups that arrive while one of their kind is in flight go out together as the next one: one query for
all the keys (or jobs) asked for meanwhile, one Redis pipeline for all the places in line. On the 2-core
machine of bench.api a round trip cost the API more CPU than the Python of a poll around it (sending,
waking PostgreSQL or Redis, being woken); a busy process now pays one per batch, not one per request. A
lone lookup goes out at once, and each goes out after its request arrived, so a revoked key is refused
as soon as the revocation commits.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, TypeVar, cast

import psycopg
import redis.asyncio as aioredis
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url

from shared import enqueue
from shared.errors import NotFound
from shared.job_view import place_commands, places_from
from shared.settings import get_settings
from shared.tables import ApiKey, Job

# Each of Job's columns under its attribute name, so a row reads like the ORM object job_view expects.
_COLUMNS = ", ".join(f'j."{attr.columns[0].name}" AS "{attr.key}"' for attr in Job.__mapper__.column_attrs)
# One row per (job id, key hash) pair asked for whose key is live, numbered as asked (`asked`, from 1).
_READ = f"""
SELECT q.asked, k.tenant_id AS key_tenant, {_COLUMNS},
       CASE WHEN j.status = 'queued' THEN
           (SELECT count(*) FROM {Job.__tablename__} r WHERE r.queue = j.queue AND r.status = 'running')
       END AS running
FROM unnest(%(job_ids)s::text[], %(key_hashes)s::text[]) WITH ORDINALITY AS q(job_id, key_hash, asked)
JOIN {ApiKey.__tablename__} k ON k.key_hash = q.key_hash AND k.revoked_at IS NULL
LEFT JOIN {Job.__tablename__} j ON j.id = q.job_id AND j.tenant_id = k.tenant_id
"""

_TENANT = f"""
SELECT q.asked, k.tenant_id
FROM unnest(%(key_hashes)s::text[]) WITH ORDINALITY AS q(key_hash, asked)
JOIN {ApiKey.__tablename__} k ON k.key_hash = q.key_hash AND k.revoked_at IS NULL
"""

_RUNNING = f"SELECT count(*) FROM {Job.__tablename__} WHERE queue = %(queue)s AND status = 'running'"

# Most lookups one query or pipeline carries; more wait for the next.
MAX_BATCH = 64
# Key hashes this process has seen live, and their tenant: a key never changes tenant, only gets revoked, so
# a submit can take its tenant from here and leave the revocation to the insert (api.group_commit).
_seen_keys: dict[str, str] = {}
MAX_SEEN_KEYS = 10_000


def enabled() -> bool:
    return _is_postgresql(get_settings().database_url)


@lru_cache
def _is_postgresql(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


T = TypeVar("T")
R = TypeVar("R")


class _Batcher(Generic[T, R]):
    """Items asked for while a batch is in flight go together in the next one; `run` answers a batch, one
    result per item, in order. One batch in flight at a time."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]]):
        self.run = run
        self.pending: list[tuple[T, asyncio.Future[R]]] = []
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        # A request that went away leaves its failed future unread: mark the error seen, so that asyncio
        # does not log it as never retrieved.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self.pending.append((item, future))
        if self.task is None:
            self.task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                taken, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                try:
                    results = await self.run([item for item, _ in taken])
                except Exception as exc:
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(taken, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self.task = None


@dataclass
class _Clients:
    pool: AsyncConnectionPool[Any]
    redis: aioredis.Redis
    tenants: _Batcher[str, str | None]
    finds: _Batcher[tuple[str, str], Any]
    places: _Batcher[Any, tuple[int, float | None]]
    enqueue: AsyncScript  # shared.enqueue's script, sent by its digest once Redis has it


# One pool and one Redis client per event loop: asyncio connections belong to the loop that opened them
# (uvicorn runs one per process; each test client its own).
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clients] = weakref.WeakKeyDictionary()


def _conninfo() -> str:
    url = make_url(get_settings().database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _get_clients() -> _Clients:
    loop = asyncio.get_running_loop()
    clients = _clients.get(loop)
    if clients is None:
        settings = get_settings()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            _conninfo(),
            min_size=1,
            # Its queries are single statements of a millisecond or less: half the sync pool is plenty, and a
            # process then holds at most 40 connections by default (20 pooled, 10 at peaks, these 10).
            max_size=max(2, settings.db_pool_size // 2),
            timeout=settings.db_pool_timeout,
            kwargs={"autocommit": True, "connect_timeout": settings.db_connect_timeout, "row_factory": namedtuple_row},
            open=False,
        )
        redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        await pool.open(wait=False)
        made = _clients.get(loop)
        if made is not None:  # another request made them while this one opened its pool
            await pool.close()
            await redis.aclose()  # type: ignore[attr-defined]
            return made
        clients = _clients[loop] = _Clients(
            pool,
            redis,
            _Batcher(_tenants_of),
            _Batcher(_rows_of),
            _Batcher(_places_of),
            redis.register_script(enqueue.SCRIPT),
        )
    return clients


async def close() -> None:
    """Close this loop's pool and Redis client (the app's shutdown)."""
    clients = _clients.pop(asyncio.get_running_loop(), None)
    if clients is not None:
        await clients.pool.close()
        await clients.redis.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose


async def _fetch_all(query: str, params: dict[str, Any]) -> list[Any]:
    pool = (await _get_clients()).pool
    for attempt in (1, 2):
        try:
            async with pool.connection() as conn:
                return await (await conn.execute(query, params)).fetchall()
        except psycopg.OperationalError:
            # A connection that died while idle (the database restarted) is dropped by the pool on return;
            # a read is safe to run once more, on another.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def execute(query: str, params: Any) -> list[Any]:
    """One statement, committed on its own (the pool's connections are in autocommit); the rows it returns."""
    pool = (await _get_clients()).pool
    async with pool.connection() as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []


async def running_in(queue: str) -> int:
    """Jobs of the queue running now (for a queued job's ETA)."""
    rows = await _fetch_all(_RUNNING, {"queue": queue})
    return int(rows[0].count)


async def clients() -> _Clients:
    """This event loop's PostgreSQL pool and Redis client."""
    return await _get_clients()


def _by_asked(rows: list[Any], count: int) -> list[Any]:
    """Rows numbered by `asked` (from 1) in the order asked; None where no row came back."""
    ordered: list[Any] = [None] * count
    for row in rows:
        ordered[row.asked - 1] = row
    return ordered


def _seen(key_hash: str, tenant_id: str) -> None:
    if len(_seen_keys) >= MAX_SEEN_KEYS:
        _seen_keys.clear()
    _seen_keys[key_hash] = tenant_id


def seen_tenant(key_hash: str) -> str | None:
    """The tenant of a key this process found live before: it may have been revoked since."""
    return _seen_keys.get(key_hash)


def forget_key(key_hash: str) -> None:
    """A key found revoked: the next request with it is looked up again."""
    _seen_keys.pop(key_hash, None)


async def _tenants_of(key_hashes: list[str]) -> list[str | None]:
    rows = await _fetch_all(_TENANT, {"key_hashes": key_hashes})
    tenants = [row.tenant_id if row is not None else None for row in _by_asked(rows, len(key_hashes))]
    for key_hash, tenant_id in zip(key_hashes, tenants, strict=True):
        if tenant_id is not None:
            _seen(key_hash, tenant_id)
    return tenants


async def _rows_of(asked: list[tuple[str, str]]) -> list[Any]:
    params = {"job_ids": [job_id for job_id, _ in asked], "key_hashes": [digest for _, digest in asked]}
    rows = _by_asked(await _fetch_all(_READ, params), len(asked))
    for (_, key_hash), row in zip(asked, rows, strict=True):
        if row is not None:
            _seen(key_hash, row.key_tenant)
    return rows


async def _places_of(queued: list[Any]) -> list[tuple[int, float | None]]:
    try:
        pipe = (await _get_clients()).redis.pipeline(transaction=False)
        for job in queued:
            place_commands(pipe, cast(Job, job))
        answers = await pipe.execute()
    except (RedisError, OSError):
        return [(-1, None)] * len(queued)
    return places_from(answers, len(queued))


async def tenant_for(key_hash: str) -> str | None:
    """The tenant owning this live key, or None."""
    return await (await _get_clients()).tenants(key_hash)


@dataclass
class Found:
    tenant_id: str
    job: Any  # a row with Job's attribute names, or None: no such job for this tenant
    running: int


async def find(job_id: str, key_hash: str) -> Found | None:
    """The key's tenant and, if it is theirs, the job; None for a key that is unknown or revoked."""
    row = await (await _get_clients()).finds((job_id, key_hash))
    if row is None:
        return None
    return Found(row.key_tenant, row if row.id is not None else None, int(row.running or 0))


async def place(found: Found) -> tuple[int, float | None]:
    """A queued job's (position, average run seconds); the position is -1 where Redis cannot tell (it
    failed, or the queue's set is missing) and the database must count."""
    return await (await _get_clients()).places(found.job)


def not_found(job_id: str) -> NotFound:
    return NotFound(f"job {job_id!r} not found")
