"""Per-tenant limits: what each tenant may do, enforcing it, and what it has used (GET /v1/usage).

Each limit comes from a global default (`DARKROOM_TENANT_*`, 0 = unlimited) that the operator's tenant
file (shared.tenant_config) may override per tenant:

    [tenants.acme]
    rate_per_minute = 600        # requests per rolling minute
    max_queued = 1000            # jobs queued at once
    max_running = 4              # jobs running at once (the scheduler holds the rest back)
    images_per_period = 50000    # images (jobs x num_images) per quota period
    quota_period = "month"       # hour | day | month | seconds
    max_priority = "normal"      # low | normal | high

Where each count lives decides how it is made atomic across API processes and workers:

- **Request rate and images quota** exist nowhere else, so they live in Redis: one Lua script per check
  reads and updates the tenant's counter in one step, on Redis's clock, so every API process agrees.
- **Queued and running jobs** are already counted by the database, which is their truth. A Redis copy
  would drift whenever a worker dies mid-job or Redis restarts empty, and a drifted counter either lets a
  tenant past its limit or shuts it out for good. So the check counts rows, and on PostgreSQL a
  transaction-scoped advisory lock per tenant makes count-then-write atomic (SQLite has one writer).
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from shared import broker, metrics
from shared.errors import InvalidRequest, ServiceUnavailable, TooManyRequests
from shared.settings import get_settings
from shared.tables import Job, Tenant
from shared.tenant_config import tenant_entry, tenant_names

log = logging.getLogger("darkroom.limits")

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
RATE_WINDOW_MS = 60_000
# No one can know when a queued job will leave the queue; this is a polite first guess for clients.
QUEUED_RETRY_AFTER = 5
PERIODS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


@dataclass(frozen=True)
class TenantLimits:
    rate_per_minute: int
    max_queued: int
    max_running: int
    images_per_period: int
    quota_period: str
    max_priority: str


def _count(entry: dict[str, Any], key: str, default: int, tenant: str) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"tenant {tenant!r}: {key} must be a whole number >= 0 (0: unlimited), got {value!r}")
    return value


def _period(value: Any, tenant: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if isinstance(value, str) and (value in ("hour", "day", "month") or (value.isdigit() and int(value) > 0)):
        return value
    raise ValueError(f"tenant {tenant!r}: quota_period must be hour, day, month or seconds > 0, got {value!r}")


def limits_for(tenant_name: str) -> TenantLimits:
    """The tenant's limits: its table in the tenant file over the global defaults."""
    settings = get_settings()
    entry = tenant_entry(tenant_name)
    max_priority = entry.get("max_priority", settings.tenant_max_priority)
    if max_priority not in PRIORITIES:
        raise ValueError(f"tenant {tenant_name!r}: max_priority must be low, normal or high, got {max_priority!r}")
    return TenantLimits(
        rate_per_minute=_count(entry, "rate_per_minute", settings.tenant_rate_per_minute, tenant_name),
        max_queued=_count(entry, "max_queued", settings.tenant_max_queued, tenant_name),
        max_running=_count(entry, "max_running", settings.tenant_max_running, tenant_name),
        images_per_period=_count(entry, "images_per_period", settings.tenant_images_per_period, tenant_name),
        quota_period=_period(entry.get("quota_period", settings.tenant_quota_period), tenant_name),
        max_priority=max_priority,
    )


def check_tenant_file() -> None:
    """Read every tenant's limits once, so that a bad value stops the API at start with a message naming
    the tenant and the key, rather than failing that tenant's every request."""
    for name in tenant_names():
        limits_for(name)


def refuse(limit: str, code: str, message: str, retry_after: float) -> TooManyRequests:
    """The 429 for `limit`, counted in darkroom_rate_limit_refusals_total{limit}."""
    metrics.count("rate_limit_refusals_total", {"limit": limit})
    seconds = max(1, math.ceil(retry_after))
    return TooManyRequests(f"{message}; retry in {seconds} s", code=code, headers={"Retry-After": str(seconds)})


def check_priority(priority: str, limits: TenantLimits) -> None:
    if PRIORITIES[priority] > PRIORITIES[limits.max_priority]:
        raise InvalidRequest(
            f"priority: {priority!r} is above this tenant's maximum priority {limits.max_priority!r}",
            code="priority_not_allowed",
        )


# 1. Request rate: a sliding log of the last minute's accepted requests, one sorted-set member each.
# With limit 0 the script only reports (it admits nothing), which is what GET /v1/usage needs.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  used = used + 1
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {1, used, tonumber(oldest[2]) + window - now, now}
end
if used == 0 then
  return {0, 0, 0, now}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, used, tonumber(oldest[2]) + window - now, now}
"""


def _rate_key(tenant_id: str) -> str:
    return f"{get_settings().redis_prefix}limits:rate:{tenant_id}"


def _rate(tenant_id: str, limit: int) -> tuple[bool, int, int, int]:
    """(admitted, used, ms until the oldest counted request leaves the window, Redis time in ms)."""
    script = broker.get_redis().register_script(_RATE)
    member = uuid.uuid4().hex  # unique, so two requests in the same millisecond both count
    admitted, used, wait_ms, now_ms = script(keys=[_rate_key(tenant_id)], args=[limit, RATE_WINDOW_MS, member])
    return bool(admitted), int(used), max(0, int(wait_ms)), int(now_ms)


def check_rate(tenant_id: str, limits: TenantLimits) -> None:
    """Count one request against the tenant's rate, or refuse it with 429 `rate_limited`."""
    if not limits.rate_per_minute:
        return
    try:
        admitted, used, wait_ms, _ = _rate(tenant_id, limits.rate_per_minute)
    except redis.RedisError as exc:
        # Fail open, as submits do: while Redis is down the database still takes jobs, and refusing
        # every request because the counter is unreachable would turn a Redis blip into an outage.
        log.warning("rate limit not checked for tenant %s: Redis unavailable (%s)", tenant_id, type(exc).__name__)
        return
    if not admitted:
        raise refuse(
            "requests",
            "rate_limited",
            f"rate limit: {limits.rate_per_minute} requests per minute, {used} made in the last minute",
            wait_ms / 1000,
        )


# 2. Images per period: one counter per tenant and period, charged at submit and refunded if the job is
# not created after all. A positive `n` is charged only if it fits; a negative one refunds, never below 0.
_IMAGES = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[2])
if n > 0 and used + n > tonumber(ARGV[1]) then
  return {0, used}
end
if n < 0 and used + n < 0 then
  n = -used
end
if n ~= 0 then
  used = redis.call('INCRBY', KEYS[1], n)
  redis.call('EXPIREAT', KEYS[1], ARGV[3])
end
return {1, used}
"""


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The quota period containing `now`: calendar hours, days and months in UTC, or epoch-aligned seconds."""
    now = now.astimezone(UTC)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return start, (start + timedelta(days=32)).replace(day=1)
    length = PERIODS[period] if period in PERIODS else timedelta(seconds=int(period))
    seconds = int(length.total_seconds())
    start = datetime.fromtimestamp(int(now.timestamp()) // seconds * seconds, UTC)
    return start, start + length


def _images(tenant_id: str, limits: TenantLimits, n: int) -> tuple[bool, int, datetime]:
    start, end = period_bounds(limits.quota_period, datetime.now(UTC))
    key = f"{get_settings().redis_prefix}limits:images:{tenant_id}:{int(start.timestamp())}"
    script = broker.get_redis().register_script(_IMAGES)
    # Kept a day past its period, so a refund arriving just after the period ends still finds it.
    expire_at = int(end.timestamp()) + 86_400
    ok, used = script(keys=[key], args=[limits.images_per_period, n, expire_at])
    return bool(ok), int(used), end


def charge_images(tenant_id: str, limits: TenantLimits, n: int) -> int:
    """Charge `n` images to this period's quota, or refuse with 429 `images_quota_exceeded`. Returns the
    images charged (0 when the tenant has no quota), to pass to `refund_images` if the job is not made."""
    if not limits.images_per_period:
        return 0
    try:
        ok, used, end = _images(tenant_id, limits, n)
    except redis.RedisError as exc:  # fail open, as check_rate does
        log.warning("images quota not charged for tenant %s: Redis unavailable (%s)", tenant_id, type(exc).__name__)
        return 0
    if not ok:
        raise refuse(
            "images",
            "images_quota_exceeded",
            f"images quota: {limits.images_per_period} per {limits.quota_period}, {used} used, this job needs {n}"
            f"; the period resets at {end.isoformat().replace('+00:00', 'Z')}",
            (end - datetime.now(UTC)).total_seconds(),
        )
    return n


def refund_images(tenant_id: str, limits: TenantLimits, n: int) -> None:
    if not n:
        return
    try:
        _images(tenant_id, limits, -n)
    except redis.RedisError as exc:
        log.warning("refund of %d images to tenant %s lost: %s", n, tenant_id, type(exc).__name__)


# 3. Queued and running jobs: counted in the database under a per-tenant lock.
def lock_tenant(session: Session, tenant_id: str, purpose: str) -> None:
    """Until this transaction ends, whoever else counts `purpose` for this tenant waits (PostgreSQL).

    SQLite has none: it has one writer at a time, so `check_queued`, which counts after its own insert, is
    exact there too; the running cap is counted before the claim's write, exact with one worker process.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"darkroom:{purpose}:{tenant_id}".encode()).digest()
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int.from_bytes(digest[:8], "big", signed=True)})


def queued_jobs(session: Session, tenant_id: str) -> int:
    return int(session.scalar(select(func.count()).where(Job.tenant_id == tenant_id, Job.status == "queued")) or 0)


def running_jobs(session: Session, tenant_ids: set[str]) -> dict[str, int]:
    """Jobs running per tenant, in every queue."""
    rows = session.execute(
        select(Job.tenant_id, func.count())
        .where(Job.status == "running", Job.tenant_id.in_(sorted(tenant_ids)))
        .group_by(Job.tenant_id)
    ).all()
    return {tenant: int(n) for tenant, n in rows}


def check_queued(session: Session, tenant_id: str, limits: TenantLimits, adding: int = 1) -> None:
    """Call after flushing the `adding` new jobs: refuse (429, rolling the job back with the transaction) if it takes
    the tenant past its queued-jobs limit.

    Counting after our own insert, under the lock, is what makes this exact: a concurrent submit of the
    same tenant waits for our commit or rollback, then counts with our row in or out.
    """
    if not limits.max_queued:
        return
    lock_tenant(session, tenant_id, "queued")
    queued = queued_jobs(session, tenant_id)
    if queued > limits.max_queued:
        raise refuse(
            "queued_jobs",
            "too_many_queued_jobs",
            f"queued jobs limit: at most {limits.max_queued} queued at once, {queued - adding} queued now",
            QUEUED_RETRY_AFTER,
        )


def running_caps(session: Session, tenant_ids: set[str]) -> dict[str, int]:
    """max_running of each of these tenants that has one (empty at once when no tenant can have one)."""
    if not tenant_ids or not any_running_caps():
        return {}
    names = dict(session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(sorted(tenant_ids)))).all())
    caps = {tenant: limits_for(name).max_running for tenant, name in names.items()}
    return {tenant: cap for tenant, cap in caps.items() if cap}


def any_running_caps() -> bool:
    """Whether any tenant can have a max_running; when none can, schedulers skip the cap's queries."""
    return bool(get_settings().tenant_max_running) or any("max_running" in tenant_entry(n) for n in tenant_names())


@dataclass(frozen=True)
class LimitUsage:
    name: str
    limit: int | None
    used: int
    remaining: int | None
    resets_at: datetime | None
    description: str


def usage(session: Session, tenant_id: str, limits: TenantLimits) -> list[LimitUsage]:
    """Each limit of the tenant with what it has used now. `limit` None: unlimited."""
    try:
        _, used_rate, wait_ms, now_ms = _rate(tenant_id, 0)
        images_used = _images(tenant_id, limits, 0)[1] if limits.images_per_period else 0
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            "usage counters are unavailable (Redis); retry shortly", headers={"Retry-After": "5"}
        ) from exc
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    _, period_end = period_bounds(limits.quota_period, now)
    running = running_jobs(session, {tenant_id}).get(tenant_id, 0)

    def entry(name: str, limit: int, used: int, resets_at: datetime | None, description: str) -> LimitUsage:
        remaining = max(0, limit - used) if limit else None
        return LimitUsage(name, limit or None, used, remaining, resets_at, description)

    return [
        entry(
            "requests",
            limits.rate_per_minute,
            used_rate,
            now + timedelta(milliseconds=wait_ms) if used_rate else None,
            "Requests in the last 60 s (rolling; counted only while limited); resets_at: when the oldest of"
            " them stops counting.",
        ),
        entry("queued_jobs", limits.max_queued, queued_jobs(session, tenant_id), None, "Your jobs queued now."),
        entry(
            "running_jobs",
            limits.max_running,
            running,
            None,
            "Your jobs running now; beyond the limit jobs stay queued until one ends.",
        ),
        entry(
            "images",
            limits.images_per_period,
            images_used,
            period_end if limits.images_per_period else None,
            f"Images (jobs x num_images) submitted in this quota period ({limits.quota_period});"
            " resets_at: when the next period starts.",
        ),
    ]
