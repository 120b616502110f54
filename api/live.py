"""Live job state over HTTP: long polls (`?wait=`, `Prefer: wait=`) and the SSE event stream.

Both read the job's Redis stream (shared.events) to wake up as soon as something happens, and re-read the
database every second: the database is the source of truth, the stream only a fast path that may be late
(it is written after commit) or gone (Redis restarted, TTL passed).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from shared import events, jobs
from shared.db import session_scope
from shared.job_view import job_view
from shared.settings import get_settings

log = logging.getLogger("darkroom.api")

MAX_WAIT = 60
POLL_SECONDS = 1.0
_STREAM_ID = re.compile(r"^\d+-\d+$")
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)


def prefer_wait(header: str | None) -> int | None:
    """Seconds asked for by an RFC 7240 `Prefer: wait=N` header, capped at 60; None if absent."""
    if not header:
        return None
    match = _PREFER_WAIT.search(header)
    return min(int(match.group(1)), MAX_WAIT) if match else None


@dataclass
class Snapshot:
    status: str
    step: int | None
    total: int | None
    view: dict[str, Any]


def snapshot(job_id: str, tenant_id: str | None = None) -> Snapshot:
    with session_scope() as session:
        job = jobs.get_job(session, job_id, tenant_id)
        return Snapshot(job.status, job.progress_step, job.progress_total, job_view(session, job))


def _status(job_id: str) -> str:
    with session_scope() as session:
        return jobs.get_job(session, job_id).status


def _redis() -> aioredis.Redis:
    # One client per request: a long poll or an event stream holds it for its whole life anyway.
    return aioredis.Redis.from_url(get_settings().redis_url, socket_timeout=10, socket_connect_timeout=2)


async def _read_stream(client: aioredis.Redis, job_id: str, after: str, block_ms: int) -> list[tuple[str, str, Any]]:
    """Entries after `after` as (id, type, data); empty on timeout or when Redis is unreachable."""
    try:
        answer = await client.xread({events.stream_key(job_id): after}, block=block_ms, count=100)
    except (RedisError, OSError) as exc:
        log.debug("event stream of %s unreadable: %s", job_id, exc)
        await anyio.sleep(block_ms / 1000)
        return []
    entries = []
    for _key, items in answer or []:
        for entry_id, fields in items:
            raw = {k.decode(): v.decode() for k, v in fields.items()}
            entries.append((entry_id.decode(), raw.get("type", ""), json.loads(raw.get("data") or "{}")))
    return entries


async def wait_for_terminal(job_id: str, seconds: float) -> None:
    """Return once the job is terminal in the database or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    client = _redis()
    cursor = "$"
    try:
        while True:
            if await run_in_threadpool(_status, job_id) in jobs.TERMINAL:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            block = max(1, int(min(remaining, POLL_SECONDS) * 1000))
            entries = await _read_stream(client, job_id, cursor, block)
            if entries:
                cursor = entries[-1][0]
    finally:
        await client.aclose()  # type: ignore[attr-defined]  # (stubs predate redis 5)


async def job_events(job_id: str, last_event_id: str | None) -> AsyncIterator[dict[str, Any]]:
    """SSE events for one job, from the start (or after `last_event_id`) to its terminal event.

    Events with an `id` come from the stream and can be resumed from; events the database had to supply
    (a changed queue position, or what a lost stream no longer holds) carry none.
    """
    cursor = last_event_id if last_event_id and _STREAM_ID.match(last_event_id) else "0-0"
    client = _redis()
    seen: tuple[str, int | None] | None = None  # last (status, step) told, to fill gaps from the database
    position: int | None = None
    pending: list[tuple[str, str, Any]] = []  # entries read early, while checking a gap the database showed
    try:
        while True:
            entries, pending = pending or await _read_stream(client, job_id, cursor, int(POLL_SECONDS * 1000)), []
            for entry_id, kind, data in entries:
                cursor = entry_id
                if kind in events.TERMINAL_EVENTS:
                    final = await run_in_threadpool(snapshot, job_id)
                    yield {"event": kind, "id": entry_id, "data": json.dumps(final.view)}
                    return
                if kind == "queued":
                    now = await run_in_threadpool(snapshot, job_id)
                    position = now.view["queue_position"]
                    data = {**data, "queue_position": position, "eta_seconds": now.view["eta_seconds"]}
                    seen = ("queued", None)
                elif kind == "started":
                    seen = ("running", None)
                elif kind == "progress":
                    seen = ("running", data.get("step"))
                yield {"event": kind, "id": entry_id, "data": json.dumps(data)}

            now = await run_in_threadpool(snapshot, job_id)
            if now.status in jobs.TERMINAL:
                # The terminal entry is written just after commit; give it a moment, then trust the database.
                late = await _read_stream(client, job_id, cursor, 500)
                for entry_id, kind, _data in late:
                    if kind in events.TERMINAL_EVENTS:
                        yield {"event": kind, "id": entry_id, "data": json.dumps(now.view)}
                        return
                yield {"event": now.status, "data": json.dumps(now.view)}
                return
            gap = _fill_gap(now, seen, position)
            if gap and now.status == "running":
                # A worker's commit lands before its stream entry: give the entry a moment to arrive, so the
                # stream (with resumable ids) tells the story rather than the database twice over.
                pending = await _read_stream(client, job_id, cursor, 500)
                if pending:
                    continue
            for synthesized in gap:
                yield synthesized
            if now.status == "queued":
                position = now.view["queue_position"]
                seen = ("queued", None)
            elif now.status == "running":
                seen = ("running", now.step)
    finally:
        await client.aclose()  # type: ignore[attr-defined]  # (stubs predate redis 5)


def _fill_gap(now: Snapshot, seen: tuple[str, int | None] | None, position: int | None) -> list[dict[str, Any]]:
    """Events the database shows but the stream did not tell (lost stream, or a queue that moved)."""
    if now.status == "queued":
        if seen is None or seen[0] != "queued" or now.view["queue_position"] != position:
            data = {
                "status": "queued",
                "queue_position": now.view["queue_position"],
                "eta_seconds": now.view["eta_seconds"],
            }
            return [{"event": "queued", "data": json.dumps(data)}]
        return []
    told: list[dict[str, Any]] = []
    if now.status == "running":
        if seen is None or seen[0] != "running":
            told.append({"event": "started", "data": json.dumps({"status": "running"})})
        if now.total and (seen is None or seen[1] != now.step):
            told.append({"event": "progress", "data": json.dumps({"step": now.step or 0, "total": now.total})})
    return told
