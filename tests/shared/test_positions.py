"""Queue positions from the Redis position sets (shared/positions.py) agree with counting the jobs ahead in
the database, through every move into and out of `queued`, and the reconciler repairs sets Redis lost."""

from __future__ import annotations

from typing import Any

import redis

from shared import broker, positions
from shared.db import session_scope
from shared.job_view import _AHEAD, job_view
from shared.jobs import cancel_job, claim_job, create_job, get_job, hand_back
from shared.reconciler import reconcile_once
from shared.tenants import get_or_create_tenant

QUEUE = broker.queue_for_model("tiny-sd")


def submit(tenant_id: str, priority: int) -> str:
    with session_scope() as session:
        job = create_job(
            session, tenant_id=tenant_id, model="tiny-sd", queue=QUEUE, request={}, metadata=None, priority=priority
        )
        return job.id


def counted(job_id: str) -> int:
    """The position as SQL counts it: the jobs ahead in (priority desc, created_at, id) order."""
    with session_scope() as session:
        job = get_job(session, job_id)
        params = {"queue": job.queue, "priority": job.priority, "created_at": job.created_at, "id": job.id}
        return int(session.scalar(_AHEAD, params) or 0)


def from_set(job_id: str) -> int | None:
    with session_scope() as session:
        job = get_job(session, job_id)
        pipe = broker.get_redis().pipeline(transaction=False)
        positions.ahead_in(pipe, job.queue, job.id, positions.score(job.priority, job.created_at))
        (found,) = pipe.execute()
        return int(found) if found >= 0 else None


def shown(job_id: str) -> int:
    with session_scope() as session:
        return int(job_view(session, get_job(session, job_id))["queue_position"])


def queued(ids: list[str]) -> list[str]:
    with session_scope() as session:
        return [j for j in ids if get_job(session, j).status == "queued"]


def test_positions_from_the_set_match_the_count_through_claims_cancels_and_requeues(
    darkroom_env: dict[str, Any],
) -> None:
    with session_scope() as session:
        tenant = get_or_create_tenant(session, "acme").id
    ids = [submit(tenant, priority) for priority in (1, 0, 2, 1, 1, 2, 0, 1)]
    for job_id in ids:
        assert from_set(job_id) == counted(job_id)
    assert sorted(counted(j) for j in ids) == list(range(len(ids)))
    with session_scope() as session:
        claimed = claim_job(session, ids[2], worker_id="w", lease_seconds=60)  # a priority-2 job leaves
        cancel_job(session, ids[3], tenant)
    assert claimed is not None
    with session_scope() as session:
        assert hand_back(session, ids[2], attempt=claimed.attempts)  # ... and comes back, at its old place
    waiting = queued(ids)
    assert ids[2] in waiting and ids[3] not in waiting
    for job_id in waiting:
        assert from_set(job_id) == counted(job_id) == shown(job_id)
    assert sorted(from_set(j) for j in waiting) == list(range(len(waiting)))


def test_the_count_answers_while_a_set_is_gone_and_the_reconciler_repairs_it(darkroom_env: dict[str, Any]) -> None:
    with session_scope() as session:
        tenant = get_or_create_tenant(session, "acme").id
    ids = [submit(tenant, 1) for _ in range(4)]
    client: redis.Redis = broker.get_redis()
    client.delete(positions.key(QUEUE))  # Redis lost the set
    assert from_set(ids[3]) is None and shown(ids[3]) == 3  # counted instead
    # Half repaired, wrongly: a job at the wrong place, two missing, a member that is not a queued job.
    client.zadd(positions.key(QUEUE), {ids[0]: 0, ids[1]: positions.score(1, get_created(ids[1])), "gone": 1})
    assert reconcile_once(expire=False)["positions_fixed"] == 4
    for job_id in ids:
        assert from_set(job_id) == counted(job_id)
    assert reconcile_once(expire=False)["positions_fixed"] == 0


def get_created(job_id: str) -> Any:
    with session_scope() as session:
        return get_job(session, job_id).created_at
