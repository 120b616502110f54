"""Which queued job a worker runs next, and which others may share its pipeline call.

Messages in a model's queue (`model.<name>`) are wake-up tokens, not assignments. The API still publishes
exactly one per queued job, after its commit, but a worker that receives one claims the *best* queued job
of that queue from the database, then up to `DARKROOM_MAX_BATCH_IMAGES` images' worth of queued jobs with
the same batch key. The rule, in order:

1. **Priority**: higher `priority` first (2 high, 1 normal, 0 low).
2. **Fair share between tenants**, within one priority: the tenant with fewer jobs running in this queue
   goes first; on a tie, the tenant served least recently (whose latest job in this queue started
   longest ago, or not within `SERVED_MEMORY`); then the tenant whose oldest queued job is oldest.
3. **Age**: a tenant's own jobs run oldest first (`created_at`, then id).
4. **Running cap**: a tenant with `max_running` jobs running (in any queue; see shared.limits) is skipped
   until one of them ends; the claim takes the next candidate instead.

Why "served least recently" and not only "fewer running": with one worker every tenant has zero jobs
running whenever the worker picks, so a tie on running jobs broken by the oldest queued job would run one
tenant's burst of 5,000 jobs to the end before another tenant's single job. Taking turns instead, that job
waits at most about one batch's run time. Filling a batch counts as serving, so one batch mixes tenants.

Why tokens and not assignments: a token never names a job that must still be waiting for it, so a worker
may take a better job, or eight compatible ones, for one token. Tokens are fungible and the invariant is
"tokens in the queue >= queued jobs": every move into `queued` publishes one (submit, lease expiry, hand
back), and a token is consumed by claiming at least one job, or by finding none claimable. A claim that
takes k > 1 jobs leaves k - 1 spare tokens, which later find nothing to do or a newer job. A token whose
own job is still queued afterwards is not lost to that job: the token of the job claimed instead is still
in the queue. The reconciler (republish queued jobs whose `published` marker is gone) is the backstop when
Redis itself loses messages.

A token spent while every candidate was held back by its tenant's cap does not come back by itself, so
a worker that finishes a capped tenant's jobs publishes a token for each queue where that tenant still has
jobs queued (`held_back_queues`): the slot it freed is taken at once.

Claims are atomic. On PostgreSQL the picked rows are locked with `SELECT ... FOR UPDATE SKIP LOCKED`, so
two workers never wait on each other for the same rows; on every backend the move itself is the state
machine's conditional UPDATE (`shared.jobs.transition`), so of two racing claimers exactly one wins and
the loser moves on to the next candidate.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import Select, and_, bindparam, func, or_, select
from sqlalchemy.orm import Session

from shared import limits
from shared.jobs import QUEUED, RUNNING, TERMINAL, try_claim_many
from shared.tables import Job, utcnow

# Everything that must be equal for two jobs to share one pipeline call. Prompts, negative prompts,
# seeds and the number of images may differ: they are per image in a batched call.
BATCH_FIELDS = ("model", "task", "width", "height", "steps", "guidance_scale", "scheduler", "loras")
# How far back "served least recently" looks; a tenant not served within it counts as never served.
SERVED_MEMORY = timedelta(minutes=10)
_NEVER = datetime.min.replace(tzinfo=UTC)


def batch_key(request: dict[str, Any]) -> str:
    """A digest of the request fields that must match for jobs to run as one pipeline call."""
    material = {field: request.get(field) for field in BATCH_FIELDS}
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Candidate:
    id: str
    tenant_id: str
    priority: int
    created_at: datetime
    images: int = 1


def fair_order(
    candidates: Iterable[Candidate], running: dict[str, int], served: dict[str, datetime]
) -> list[Candidate]:
    """Candidates in the order the module docstring describes; each pick counts as running and served."""
    pools: dict[tuple[int, str], deque[Candidate]] = defaultdict(deque)
    for cand in sorted(candidates, key=lambda c: (c.created_at, c.id)):
        pools[(cand.priority, cand.tenant_id)].append(cand)
    running, served = dict(running), dict(served)
    now = utcnow()
    ordered: list[Candidate] = []
    while pools:
        top = max(priority for priority, _ in pools)

        def rank(key: tuple[int, str]) -> tuple[int, datetime, datetime, str]:
            head = pools[key][0]
            return (running.get(key[1], 0), served.get(key[1], _NEVER), head.created_at, head.id)

        key = min((k for k in pools if k[0] == top), key=rank)
        pick = pools[key].popleft()
        if not pools[key]:
            del pools[key]
        ordered.append(pick)
        running[pick.tenant_id] = running.get(pick.tenant_id, 0) + 1
        served[pick.tenant_id] = now
    return ordered


@cache
def _candidates_statement(by_key: bool) -> Select[Any]:
    """The candidates query, built once: a claim runs between two pipeline calls, and building the statement
    cost more of the worker's CPU than PostgreSQL took to answer it. Bound per call: queue, key, per_tenant."""
    rank = (
        func.row_number()
        .over(partition_by=(Job.priority, Job.tenant_id), order_by=(Job.created_at, Job.id))
        .label("rank")
    )
    inner = select(Job.id, rank).where(Job.queue == bindparam("queue"), Job.status == QUEUED)
    if by_key:
        # Company for a batch is only jobs that never ran: one that did may have crashed its worker, and a
        # poison job must not take its neighbours' attempts down with it.
        inner = inner.where(Job.batch_key == bindparam("key"), Job.attempts == 0)
    sub = inner.subquery()
    return (
        select(Job.id, Job.tenant_id, Job.priority, Job.created_at, Job.request)
        .join(sub, sub.c.id == Job.id)
        .where(sub.c.rank <= bindparam("per_tenant"))
    )


def _candidates(session: Session, queue: str, key: str | None, per_tenant: int) -> list[Candidate]:
    # The first `per_tenant` queued jobs of every (priority, tenant): enough to fill a batch from any one.
    params: dict[str, Any] = {"queue": queue, "per_tenant": per_tenant}
    if key is not None:
        params["key"] = key
    rows = session.execute(_candidates_statement(key is not None), params).all()
    return [Candidate(r[0], r[1], r[2], r[3], int(r[4].get("num_images", 1))) for r in rows]


@cache
def _load_statement() -> Select[str, int, datetime | None]:
    """The load query, built once (see `_candidates_statement`). Bound per call: queue, tenants, since."""
    since = bindparam("since", type_=Job.started_at.type)
    recent = and_(Job.started_at >= since, Job.status.in_(sorted({RUNNING, *TERMINAL})))
    # updated_at >= started_at always, so the (status, updated_at) index bounds the finished ones to recent jobs.
    return (
        select(Job.tenant_id, func.count().filter(Job.status == RUNNING), func.max(Job.started_at).filter(recent))
        .where(
            Job.queue == bindparam("queue"),
            Job.tenant_id.in_(bindparam("tenants", expanding=True)),
            or_(Job.status == RUNNING, and_(recent, Job.updated_at >= since)),
        )
        .group_by(Job.tenant_id)
    )


def _load(session: Session, queue: str, tenants: set[str]) -> tuple[dict[str, int], dict[str, datetime]]:
    """Each tenant's jobs running in `queue`, and when its latest job there started (within SERVED_MEMORY):
    one statement, since a claim runs between two pipeline calls."""
    params = {"queue": queue, "tenants": sorted(tenants), "since": utcnow() - SERVED_MEMORY}
    rows = session.execute(_load_statement(), params).all()
    running = {tenant: count for tenant, count, _ in rows if count}
    served = {t: (s if s.tzinfo else s.replace(tzinfo=UTC)) for t, _, s in rows if s is not None}
    return running, served


def claim_jobs(
    session: Session,
    queue: str,
    *,
    worker_id: str,
    lease_seconds: int,
    max_jobs: int = 1,
    max_images: int | None = None,
    key: str | None = None,
) -> list[Job]:
    """Claim (queued -> running) up to `max_jobs` of the best queued jobs of `queue`, in the module's order.

    With `key`, only jobs of that batch key; with `max_images`, only as many as fit in that many images
    (a job whose `num_images` does not fit is skipped, not waited for). Returns the claimed jobs in order.
    """
    claimed: list[str] = []
    jobs: dict[str, Job] = {}
    passed: set[str] = set()  # held or taken by another claimer
    images = 0
    capped: set[str] | None = None  # tenants with a running cap whose lock this claim holds
    for _ in range(3):  # a lost race (another worker took a candidate) leaves room for another try
        room = max_jobs - len(claimed)
        if room <= 0:
            break
        # Look a little past what fits, and past every row another claimer holds, so that concurrent
        # workers each find a job of their own instead of all reaching for the same oldest one.
        candidates = [
            c
            for c in _candidates(session, queue, key, per_tenant=room + len(passed) + 2)
            if c.id not in claimed and c.id not in passed
        ]
        if not candidates:
            break
        tenants = {c.tenant_id for c in candidates}
        running, served = _load(session, queue, tenants)
        caps = limits.running_caps(session, tenants)
        if caps and capped is None:
            # Taken once per claim, in a fixed order, so two claimers never wait on each other in a cycle.
            # A capped tenant first seen on a retry is left for the next claim rather than locked late.
            capped = set(caps)
            for tenant in sorted(capped):
                limits.lock_tenant(session, tenant, "running")
        slots = _free_slots(session, caps, capped or set())
        wanted: list[Candidate] = []
        budget = images
        for cand in fair_order(candidates, running, served):
            if len(wanted) == room:
                break
            if slots.get(cand.tenant_id, 1) <= 0:
                continue
            if max_images is None or budget + cand.images <= max_images:
                wanted.append(cand)
                budget += cand.images
                if cand.tenant_id in slots:
                    slots[cand.tenant_id] -= 1
        if not wanted:
            break
        # One UPDATE for all of them, of exactly the rows it can lock now.
        won = try_claim_many(
            session, [c.id for c in wanted], worker_id=worker_id, lease_seconds=lease_seconds, skip_locked=True
        )
        jobs.update(won)
        for cand in wanted:
            if cand.id in won:
                claimed.append(cand.id)
                images += cand.images
            else:
                passed.add(cand.id)
        if len(won) == len(wanted):
            break
    # As the claim's UPDATE ... RETURNING left them: no SELECT needed.
    return [jobs[job_id] for job_id in claimed]


def _free_slots(session: Session, caps: dict[str, int], locked: set[str]) -> dict[str, int]:
    """Jobs each capped tenant may still start now (0 for one whose lock this claim does not hold). Counts
    this transaction's own claims too: they are already `running` to it."""
    if not caps:
        return {}
    running = limits.running_jobs(session, set(caps))
    return {tenant: cap - running.get(tenant, 0) if tenant in locked else 0 for tenant, cap in caps.items()}


def held_back_queues(session: Session, tenant_ids: set[str]) -> list[tuple[str, str]]:
    """(queue, a queued job id) for each queue where one of these tenants, if it has a running cap, has jobs
    queued: after one of its jobs ends, each such queue needs a token to start the next one."""
    caps = limits.running_caps(session, tenant_ids)
    if not caps:
        return []
    rows = session.execute(
        select(Job.queue, func.min(Job.id))
        .where(Job.status == QUEUED, Job.tenant_id.in_(sorted(caps)))
        .group_by(Job.queue)
    ).all()
    return [(r[0], r[1]) for r in rows]


def queue_of(session: Session, job_id: str) -> str | None:
    """The queue a job's token was published to (None for an unknown job)."""
    return session.scalar(select(Job.queue).where(Job.id == job_id))
