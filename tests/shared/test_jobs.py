"""The job state machine on SQLite and PostgreSQL: each move happens once, for its rightful owner only."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from shared.db import session_scope
from shared.errors import Conflict, IllegalTransition, NotFound
from shared.jobs import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    cancel_job,
    claim_job,
    expire_leases,
    get_job,
    hand_back,
    list_jobs,
    succeed_job,
    succeed_jobs,
    transition,
)
from shared.tables import Job, utcnow

LEASE = 30
OUTPUTS = [{"key": "jobs/x/0.png", "content_type": "image/png"}]


def after_lease() -> datetime:
    """A moment when every lease taken during this test has run out."""
    return utcnow() + timedelta(seconds=LEASE + 60)


def read(job_id: str) -> Job:
    with session_scope() as session:
        return get_job(session, job_id)


def claim(job_id: str, worker: str = "w1") -> Job | None:
    with session_scope() as session:
        return claim_job(session, job_id, worker_id=worker, lease_seconds=LEASE)


def expire(max_attempts: int = 3) -> list[str]:
    with session_scope() as session:
        return [job.id for job in expire_leases(session, max_attempts=max_attempts, now=after_lease())]


def test_a_new_job_is_queued(tenants: tuple[str, str], new_job: Callable[..., str]) -> None:
    job = read(new_job())
    assert job.status == QUEUED
    assert job.tenant_id == tenants[0]
    assert job.attempts == 0
    assert job.request == {"prompt": "a lighthouse"}
    assert job.worker_id is None and job.started_at is None and job.finished_at is None


def test_a_job_is_claimed_once(new_job: Callable[..., str]) -> None:
    job_id = new_job()
    first = claim(job_id, "w1")
    assert first is not None
    assert (first.status, first.attempts, first.worker_id) == (RUNNING, 1, "w1")
    assert first.lease_expires_at is not None and first.lease_expires_at > utcnow()

    assert claim(job_id, "w2") is None
    job = read(job_id)
    assert (job.status, job.attempts, job.worker_id) == (RUNNING, 1, "w1")


def test_an_illegal_transition_raises_and_changes_nothing(new_job: Callable[..., str]) -> None:
    job_id = new_job()
    claimed = claim(job_id)
    assert claimed is not None
    with session_scope() as session:
        assert succeed_job(session, job_id, attempt=claimed.attempts, outputs=OUTPUTS)

    with pytest.raises(IllegalTransition), session_scope() as session:
        transition(session, job_id, from_=[SUCCEEDED], to=RUNNING)
    assert read(job_id).status == SUCCEEDED
    assert claim(job_id) is None


def test_a_stale_attempt_cannot_finish_the_job(new_job: Callable[..., str]) -> None:
    job_id = new_job()
    stale = claim(job_id, "slow-worker")
    assert stale is not None
    assert expire() == [job_id]
    current = claim(job_id, "new-worker")
    assert current is not None and current.attempts == stale.attempts + 1

    with session_scope() as session:
        assert not succeed_job(session, job_id, attempt=stale.attempts, outputs=OUTPUTS)
    job = read(job_id)
    assert (job.status, job.attempts, job.worker_id, job.outputs) == (RUNNING, 2, "new-worker", None)

    with session_scope() as session:
        assert succeed_job(session, job_id, attempt=current.attempts, outputs=OUTPUTS)
    job = read(job_id)
    assert (job.status, job.outputs) == (SUCCEEDED, OUTPUTS)
    assert job.finished_at is not None and job.lease_expires_at is None


def test_a_batch_succeeds_in_one_go_each_job_with_its_own_outputs(new_job: Callable[..., str]) -> None:
    first, second, taken_over = new_job(), new_job(), new_job()
    claimed = {job_id: claim(job_id) for job_id in (first, second, taken_over)}
    stale = claimed[taken_over]
    assert stale is not None
    with session_scope() as session:  # another worker took this one over: its attempt moved on
        session.execute(update(Job).where(Job.id == taken_over).values(attempts=stale.attempts + 1))
    outputs = {job_id: [{"key": f"jobs/{job_id}/0.png", "content_type": "image/png"}] for job_id in claimed}

    with session_scope() as session:
        won = succeed_jobs(session, {job_id: (job.attempts, outputs[job_id]) for job_id, job in claimed.items() if job})
    assert set(won) == {first, second}
    assert all(won[job_id].outputs == outputs[job_id] for job_id in won)  # as the UPDATE left them
    for job_id in (first, second):
        job = read(job_id)
        assert (job.status, job.outputs, job.lease_expires_at) == (SUCCEEDED, outputs[job_id], None)
    assert (read(taken_over).status, read(taken_over).outputs) == (RUNNING, None)


def test_cancel_a_queued_job(tenants: tuple[str, str], new_job: Callable[..., str]) -> None:
    job_id = new_job()
    with session_scope() as session:
        job = cancel_job(session, job_id, tenants[0])
    assert job.status == CANCELED
    assert read(job_id).status == CANCELED
    assert read(job_id).finished_at is not None
    assert claim(job_id) is None


def test_cancel_a_finished_job_is_a_conflict(tenants: tuple[str, str], new_job: Callable[..., str]) -> None:
    job_id = new_job()
    claimed = claim(job_id)
    assert claimed is not None
    with session_scope() as session:
        assert succeed_job(session, job_id, attempt=claimed.attempts, outputs=OUTPUTS)

    with pytest.raises(Conflict) as excinfo, session_scope() as session:
        cancel_job(session, job_id, tenants[0])
    assert excinfo.value.status_code == 409
    assert excinfo.value.code == "job_finished"
    job = read(job_id)
    assert (job.status, job.outputs) == (SUCCEEDED, OUTPUTS)


def test_another_tenants_job_is_invisible(tenants: tuple[str, str], new_job: Callable[..., str]) -> None:
    ours, theirs = tenants
    job_id = new_job(tenant_id=theirs)

    with pytest.raises(NotFound), session_scope() as session:
        get_job(session, job_id, ours)
    with pytest.raises(NotFound) as excinfo, session_scope() as session:
        cancel_job(session, job_id, ours)
    assert excinfo.value.status_code == 404
    assert read(job_id).status == QUEUED

    with session_scope() as session:
        assert get_job(session, job_id, theirs).id == job_id
        assert list_jobs(session, ours, status=None, limit=10, after=None) == []


def test_an_expired_lease_puts_the_job_back_then_fails_it(new_job: Callable[..., str]) -> None:
    job_id = new_job()
    untouched = new_job()
    claimed = claim(job_id)
    assert claimed is not None
    claimed_too = claim(untouched)
    assert claimed_too is not None
    with session_scope() as session:
        # Leases still running: nothing to do yet.
        assert expire_leases(session, max_attempts=2, now=utcnow()) == []
        assert succeed_job(session, untouched, attempt=claimed_too.attempts, outputs=OUTPUTS)

    assert expire(max_attempts=2) == [job_id]
    job = read(job_id)
    assert (job.status, job.attempts, job.worker_id, job.lease_expires_at) == (QUEUED, 1, None, None)

    assert claim(job_id) is not None
    assert expire(max_attempts=2) == []
    job = read(job_id)
    assert (job.status, job.attempts, job.error_code) == (FAILED, 2, "worker_crashed")
    assert job.error_message and job.finished_at is not None
    assert claim(job_id) is None
    assert read(untouched).status == SUCCEEDED


def test_hand_back_does_not_use_up_an_attempt(new_job: Callable[..., str]) -> None:
    job_id = new_job()
    claimed = claim(job_id, "shutting-down")
    assert claimed is not None
    with session_scope() as session:
        assert hand_back(session, job_id, attempt=claimed.attempts)
    job = read(job_id)
    assert (job.status, job.attempts, job.worker_id, job.lease_expires_at) == (QUEUED, 0, None, None)

    again = claim(job_id, "w2")
    assert again is not None and (again.attempts, again.worker_id) == (1, "w2")


def set_created_at(job_ids: list[str], when: datetime) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(created_at=when))


def test_list_jobs_newest_first_and_by_status(tenants: tuple[str, str], new_job: Callable[..., str]) -> None:
    ours, theirs = tenants
    base = datetime(2030, 1, 1, tzinfo=UTC)
    ids = [new_job(prompt=f"p{i}") for i in range(4)]
    for i, job_id in enumerate(ids):
        set_created_at([job_id], base + timedelta(minutes=i))
    new_job(tenant_id=theirs)
    claimed = claim(ids[1])
    assert claimed is not None

    with session_scope() as session:
        everything = list_jobs(session, ours, status=None, limit=10, after=None)
        queued = list_jobs(session, ours, status=QUEUED, limit=10, after=None)
        running = list_jobs(session, ours, status=RUNNING, limit=10, after=None)
    assert [j.id for j in everything] == ids[::-1]
    assert [j.id for j in queued] == [ids[3], ids[2], ids[0]]
    assert [j.id for j in running] == [ids[1]]


@pytest.mark.parametrize("same_created_at", [False, True], ids=["distinct", "same-created-at"])
def test_keyset_pages_return_each_job_once(
    tenants: tuple[str, str], new_job: Callable[..., str], same_created_at: bool
) -> None:
    ids = [new_job(prompt=f"p{i}") for i in range(7)]
    base = datetime(2030, 1, 1, tzinfo=UTC)
    if same_created_at:
        set_created_at(ids, base)
    else:
        # Two pairs collide, so a page boundary falls between jobs sharing a timestamp.
        for i, job_id in enumerate(ids):
            set_created_at([job_id], base + timedelta(seconds=i // 2))

    pages: list[list[str]] = []
    after = None
    with session_scope() as session:
        # Bounded: a cursor that does not advance must fail the test, not hang it.
        for _ in range(len(ids) + 2):
            page = list_jobs(session, tenants[0], status=None, limit=3, after=after)
            if not page:
                break
            pages.append([j.id for j in page])
            after = (page[-1].created_at, page[-1].id)
        everything = [j.id for j in list_jobs(session, tenants[0], status=None, limit=100, after=None)]

    seen = [job_id for page in pages for job_id in page]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert seen == everything
    assert sorted(seen) == sorted(ids)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_racing_claims_have_one_winner(new_job: Callable[..., str]) -> None:
    job_id = new_job()
    contenders = 8
    barrier = threading.Barrier(contenders)
    results: dict[str, bool] = {}
    errors: list[BaseException] = []

    def contend(worker: str) -> None:
        try:
            with session_scope() as session:
                barrier.wait(timeout=30)
                results[worker] = claim_job(session, job_id, worker_id=worker, lease_seconds=LEASE) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    winners = [worker for worker, won in results.items() if won]
    assert len(results) == contenders
    assert len(winners) == 1
    job = read(job_id)
    assert (job.status, job.attempts, job.worker_id) == (RUNNING, 1, winners[0])
