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
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import psycopg
import redis.asyncio as aioredis
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url

from shared.errors import NotFound
from shared.job_view import place_commands, place_from
from shared.settings import get_settings
from shared.tables import ApiKey, Job

# Each of Job's columns under its attribute name, so a row reads like the ORM object job_view expects.
_COLUMNS = ", ".join(f'j."{attr.columns[0].name}" AS "{attr.key}"' for attr in Job.__mapper__.column_attrs)
_READ = f"""
SELECT k.tenant_id AS key_tenant, {_COLUMNS},
       CASE WHEN j.status = 'queued' THEN
           (SELECT count(*) FROM {Job.__tablename__} r WHERE r.queue = j.queue AND r.status = 'running')
       END AS running
FROM {ApiKey.__tablename__} k
LEFT JOIN {Job.__tablename__} j ON j.id = %(job_id)s AND j.tenant_id = k.tenant_id
WHERE k.key_hash = %(key_hash)s AND k.revoked_at IS NULL
"""

_TENANT = f"SELECT tenant_id FROM {ApiKey.__tablename__} WHERE key_hash = %(key_hash)s AND revoked_at IS NULL"


def enabled() -> bool:
    return _is_postgresql(get_settings().database_url)


@lru_cache
def _is_postgresql(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


@dataclass
class _Clients:
    pool: AsyncConnectionPool[Any]
    redis: aioredis.Redis


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
        clients = _clients[loop] = _Clients(pool, redis)
    return clients


async def close() -> None:
    """Close this loop's pool and Redis client (the app's shutdown)."""
    clients = _clients.pop(asyncio.get_running_loop(), None)
    if clients is not None:
        await clients.pool.close()
        await clients.redis.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose


@dataclass
class Found:
    tenant_id: str
    job: Any  # a row with Job's attribute names, or None: no such job for this tenant
    running: int


async def _fetch_one(query: str, params: dict[str, Any]) -> Any:
    pool = (await _get_clients()).pool
    for attempt in (1, 2):
        try:
            async with pool.connection() as conn:
                return await (await conn.execute(query, params)).fetchone()
        except psycopg.OperationalError:
            # A connection that died while idle (the database restarted) is dropped by the pool on return;
            # a read is safe to run once more, on another.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def tenant_for(key_hash: str) -> str | None:
    """The tenant owning this live key, or None."""
    row = await _fetch_one(_TENANT, {"key_hash": key_hash})
    return row.tenant_id if row is not None else None


async def find(job_id: str, key_hash: str) -> Found | None:
    """The key's tenant and, if it is theirs, the job; None for a key that is unknown or revoked."""
    row = await _fetch_one(_READ, {"job_id": job_id, "key_hash": key_hash})
    if row is None:
        return None
    return Found(row.key_tenant, row if row.id is not None else None, int(row.running or 0))


async def place(found: Found) -> tuple[int, float | None]:
    """A queued job's (position, average run seconds) from one Redis round trip; the position is -1 where
    Redis cannot tell (it failed, or the queue's set is missing) and the database must count."""
    try:
        pipe = (await _get_clients()).redis.pipeline(transaction=False)
        place_commands(pipe, cast(Job, found.job))
        return place_from(await pipe.execute())
    except (RedisError, OSError):
        return -1, None


def not_found(job_id: str) -> NotFound:
    return NotFound(f"job {job_id!r} not found")
