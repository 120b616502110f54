"""Which job a worker claims next: priority, fair share between tenants, age; batch keys; atomic claims."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from shared.db import session_scope
from shared.jobs import create_job, succeed_job
from shared.scheduling import batch_key, claim_jobs
from shared.tables import Job
from shared.tenants import get_or_create_tenant

QUEUE = "model.tiny-sd"
REQUEST = {"task": "txt2img", "model": "tiny-sd", "prompt": "p", "width": 64, "height": 64, "steps": 2}


def submit(tenant: str, priority: int = 1, **overrides: Any) -> str:
    request = {**REQUEST, "guidance_scale": 7.0, "seed": 1, "num_images": 1, **overrides}
    with session_scope() as session:
        owner = get_or_create_tenant(session, tenant)
        return create_job(
            session,
            tenant_id=owner.id,
            model="tiny-sd",
            queue=QUEUE,
            request=request,
            metadata=None,
            priority=priority,
            batch_key=batch_key(request),
        ).id


def claim(**kwargs: Any) -> list[str]:
    with session_scope() as session:
        return [j.id for j in claim_jobs(session, QUEUE, worker_id="w", lease_seconds=30, **kwargs)]


def run_one() -> str | None:
    """What one worker does: claim the best job and finish it."""
    claimed = claim()
    if not claimed:
        return None
    with session_scope() as session:
        job = session.get(Job, claimed[0])
        assert job is not None
        succeed_job(session, job.id, attempt=job.attempts, outputs=[])
    return claimed[0]


def test_one_tenants_burst_does_not_hold_back_anothers_single_job(darkroom_env: dict[str, Any]) -> None:
    burst = [submit("tenant-a") for _ in range(30)]
    single = submit("tenant-b")
    while run_one():
        pass
    with session_scope() as session:
        started = session.scalars(select(Job.id).order_by(Job.started_at, Job.id)).all()
    assert set(started) == {*burst, single}
    # One worker, so both tenants have nothing running at each pick: they take turns. B's job starts
    # second, right after the first of A's, and A's run in their own order.
    assert started.index(single) == 1
    assert [j for j in started if j != single] == burst


def test_a_tenant_with_fewer_running_jobs_goes_first(darkroom_env: dict[str, Any]) -> None:
    submit("tenant-a"), submit("tenant-a")
    first = claim()  # A's oldest, now running on another worker
    single = submit("tenant-b")
    assert claim() == [single]
    assert first != [single]


def test_higher_priority_first_whoever_queued_it(darkroom_env: dict[str, Any]) -> None:
    normal = [submit("tenant-a") for _ in range(3)]
    low = submit("tenant-b", priority=0)
    high = submit("tenant-a", priority=2)
    order = [run_one() for _ in range(5)]
    assert order[0] == high
    assert order[-1] == low
    assert sorted(order[1:4]) == sorted(normal)


def test_a_batch_takes_only_its_key_and_mixes_tenants(darkroom_env: dict[str, Any]) -> None:
    burst = [submit("tenant-a", seed=i) for i in range(10)]
    other_size = submit("tenant-a", width=128)
    single = submit("tenant-b")
    key = batch_key({**REQUEST, "guidance_scale": 7.0})
    claimed = claim(max_jobs=4, key=key)
    assert len(claimed) == 4 and other_size not in claimed
    assert single in claimed[:2]  # filling a batch counts as serving, so B's job is not last in line
    assert set(claimed) <= {*burst, single}


def test_a_batch_respects_the_image_budget(darkroom_env: dict[str, Any]) -> None:
    jobs = [submit("tenant-a", num_images=n) for n in (5, 4, 3)]
    key = batch_key({**REQUEST, "guidance_scale": 7.0})
    assert claim(max_jobs=8, max_images=8, key=key) == [jobs[0], jobs[2]]  # 5 + 3; the 4 waits


# PostgreSQL only: SQLite has one writer at a time, so claims there are serial by construction.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_concurrent_claims_skip_each_others_rows(darkroom_env: dict[str, Any]) -> None:
    jobs = [submit("tenant-a") for _ in range(2)]
    with session_scope() as first, session_scope() as second:
        mine = claim_jobs(first, QUEUE, worker_id="w1", lease_seconds=30)
        # The first claim is not committed; the second neither waits for it nor takes the same job.
        theirs = claim_jobs(second, QUEUE, worker_id="w2", lease_seconds=30)
        assert [j.id for j in mine] == [jobs[0]] and [j.id for j in theirs] == [jobs[1]]


def test_nothing_queued_claims_nothing(darkroom_env: dict[str, Any]) -> None:
    assert claim() == []
