"""Which job a worker claims next: priority, fair share between tenants, age; batch keys; atomic claims."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from shared.db import session_scope
from shared.jobs import create_job, succeed_job
from shared.scheduling import batch_key, claim_jobs, held_back_queues
from shared.tables import Job, Tenant
from shared.tenant_config import reset_tenant_config
from shared.tenants import get_or_create_tenant
from tests.support import reset_caches, wait_for

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


def finish(job_id: str) -> None:
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        succeed_job(session, job.id, attempt=job.attempts, outputs=[])


# PostgreSQL: the claim path as several workers run it, each claim in its own transaction at the same time.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_fair_share_bound_with_two_tenants_and_hundreds_of_jobs(darkroom_env: dict[str, Any]) -> None:
    workers = 4
    with session_scope() as session:
        owner = get_or_create_tenant(session, "tenant-a").id
        request = {**REQUEST, "guidance_scale": 7.0, "seed": 1, "num_images": 1}
        for _ in range(320):
            create_job(session, tenant_id=owner, model="tiny-sd", queue=QUEUE, request=request, metadata=None)
    stop = threading.Event()

    def work(n: int) -> None:
        while not stop.is_set():
            with session_scope() as session:
                got = [(j.id, j.attempts) for j in claim_jobs(session, QUEUE, worker_id=f"w{n}", lease_seconds=30)]
            for job_id, attempt in got:
                with session_scope() as session:
                    succeed_job(session, job_id, attempt=attempt, outputs=[])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    try:
        # Tenant B submits one job while all workers are busy with A's burst.
        wait_for(lambda: count(Job.status == "succeeded") >= 20, timeout=120, what="A's burst under way")
        single = submit("tenant-b")
        wait_for(lambda: count(Job.id == single, Job.status == "succeeded"), timeout=120, what="B's job done")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    with session_scope() as session:
        b = session.get_one(Job, single)
        between = count(Job.tenant_id == owner, Job.started_at > b.created_at, Job.started_at < b.started_at)
        after = count(Job.tenant_id == owner, (Job.started_at > b.started_at) | (Job.status == "queued"))
    # Only claims already under way when B's job was committed may start before it: one per worker.
    # A FIFO queue would have started all of A's remaining burst first.
    assert between <= workers, between
    assert after > 200, after


def count(*where: Any) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(*where)) or 0)


def cap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tenant: str, max_running: int) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(f"[tenants.{tenant}]\nmax_running = {max_running}\n")
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(path))
    reset_caches()
    reset_tenant_config()


def test_a_tenant_at_its_running_cap_waits_while_others_run(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cap(monkeypatch, tmp_path, "tenant-a", 2)
    a = [submit("tenant-a") for _ in range(4)]
    b = [submit("tenant-b") for _ in range(2)]
    order = [claim() for _ in range(5)]
    # A's two running jobs use its cap; B's jobs go on; then nothing is claimable until one of A's ends.
    assert order == [[a[0]], [b[0]], [a[1]], [b[1]], []]
    with session_scope() as session:
        tenant_a = session.scalar(select(Tenant.id).where(Tenant.name == "tenant-a"))
        assert tenant_a is not None
        assert held_back_queues(session, {tenant_a}) == [(QUEUE, min(a[2], a[3]))]
    finish(a[0])
    assert claim() == [a[2]]
    assert claim() == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_concurrent_claim_never_runs_a_tenant_past_its_cap(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cap(monkeypatch, tmp_path, "tenant-a", 1)
    jobs = [submit("tenant-a") for _ in range(3)]
    theirs: list[str] = []

    def second_worker() -> None:
        with session_scope() as session:
            theirs.extend(j.id for j in claim_jobs(session, QUEUE, worker_id="w2", lease_seconds=30))

    with session_scope() as first:
        mine = [j.id for j in claim_jobs(first, QUEUE, worker_id="w1", lease_seconds=30)]
        # Our claim is not committed yet, so a second worker counting rows alone would see A with nothing
        # running and claim too. It must wait for us instead.
        other = threading.Thread(target=second_worker)
        other.start()
        wait_for(lambda: waiting_for_a_lock() or not other.is_alive(), timeout=30, what="second claim under way")
    other.join()
    assert mine == [jobs[0]]
    assert theirs == []
    assert count(Job.status == "running") == 1


def waiting_for_a_lock() -> bool:
    with session_scope() as session:
        return bool(session.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")))
