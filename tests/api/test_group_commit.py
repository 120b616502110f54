"""Submits committed together (api.group_commit), on real Redis and both databases: each job is inserted,
published and placed in line as if it had been submitted alone, and one bad job does not sink the others."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api import aio_reads, group_commit
from api.routes.jobs import job_fields, prepare_job
from api.schemas import JobCreate, JobRead
from shared import broker, events, jobs, limits
from shared.db import session_scope
from shared.errors import Unauthorized
from shared.job_view import place_of, record_run_seconds
from shared.settings import get_settings
from shared.tables import Job, new_id
from shared.tenants import create_key, get_or_create_tenant, hash_key, revoke_key
from tests.api.test_jobs import queued_messages


def new_jobs(tenant_id: str, prompts: list[str]) -> list[Job]:
    made = []
    for prompt in prompts:
        prepared = prepare_job(JobCreate(prompt=prompt, metadata={"prompt": prompt}), tenant_id)
        made.append(jobs.new_job(**job_fields(prepared, tenant_id, new_id())))
    return made


def commit_together(
    made: list[Job], monkeypatch: pytest.MonkeyPatch, key_hashes: list[str | None] | None = None
) -> tuple[list[Any], list[int]]:
    """Commit the jobs from one event loop at once (each submitted with its key's hash, if given); returns
    the outcomes and the size of each group run."""
    keys = key_hashes or [None] * len(made)
    groups: list[int] = []
    real, real_async = group_commit._commit_group, group_commit._commit_group_async

    def counted(new: list[Job]) -> list[JobRead | Exception]:
        groups.append(len(new))
        return real(new)

    async def counted_async(new: list[Job], key_hashes: list[str | None]) -> list[JobRead | Exception]:  # PostgreSQL
        groups.append(len(new))
        return await real_async(new, key_hashes)

    monkeypatch.setattr(group_commit, "_commit_group", counted)
    monkeypatch.setattr(group_commit, "_commit_group_async", counted_async)

    async def submit_all() -> list[Any]:
        try:
            # gather starts every commit before the group's drain task first runs: they make one group.
            commits = (group_commit.commit(job, key) for job, key in zip(made, keys, strict=True))
            return await asyncio.gather(*commits, return_exceptions=True)
        finally:
            # As the API's shutdown does: a pool left open has tasks still connecting when the loop ends,
            # and cancelling those could hang asyncio.run's exit.
            await aio_reads.close()

    return asyncio.run(submit_all()), groups


def settings_model() -> str:
    return get_settings().default_model


def jobs_view_place(job: Job) -> tuple[int, int | None]:
    with session_scope() as session:
        return place_of(session, job)


@pytest.fixture
def tenant_id(darkroom_env: dict[str, Any]) -> str:
    with session_scope() as session:
        return get_or_create_tenant(session, "acme").id


def test_jobs_committed_together_are_each_stored_published_and_placed(
    tenant_id: str, darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [f"a lighthouse, take {i}" for i in range(5)]
    made = new_jobs(tenant_id, prompts)
    views, groups = commit_together(made, monkeypatch)
    assert groups == [5]
    assert [v.id for v in views] == [job.id for job in made]
    assert [v.queue_position for v in views] == [0, 1, 2, 3, 4]
    assert [v.metadata for v in views] == [{"prompt": p} for p in prompts]
    with session_scope() as session:
        stored = {job.id: job for job in session.scalars(select(Job).where(Job.tenant_id == tenant_id))}
    assert {job_id: (job.status, job.request["prompt"]) for job_id, job in stored.items()} == {
        job.id: ("queued", prompt) for job, prompt in zip(made, prompts, strict=True)
    }
    assert stored[made[0].id].outputs is None  # never set: SQL NULL, as a unit-of-work insert leaves it
    assert sorted(queued_messages(darkroom_env["DARKROOM_REDIS_PREFIX"])) == sorted(job.id for job in made)
    # Each job's live stream starts with its `queued` event, as a job submitted alone does.
    for job in made:
        first = broker.get_redis().xrange(events.stream_key(job.id))[0][1]
        assert (first[b"type"], json.loads(first[b"data"])) == (b"queued", {"status": "queued"})
    # Marked as sent, so the reconciler does not send them again.
    assert broker.is_published([job.id for job in made]) == [True] * 5


def test_a_group_is_placed_in_the_order_workers_take_it_with_its_models_eta(
    tenant_id: str, darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    record_run_seconds(settings_model(), 2.0)
    made = new_jobs(tenant_id, ["first", "second", "urgent", "third"])
    made[2].priority = limits.PRIORITIES["high"]  # submitted third, taken first
    views, groups = commit_together(made, monkeypatch)
    assert groups == [4]
    # No worker runs the queue: the jobs ahead are waited for one after another.
    assert [(v.queue_position, v.eta_seconds) for v in views] == [(1, 4), (2, 6), (0, 2), (3, 8)]
    # A poll reads the same place from the position set the group entered.
    assert jobs_view_place(made[3]) == (3, 8)


def test_a_job_that_breaks_its_group_fails_alone(
    tenant_id: str, darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = new_jobs(tenant_id, ["first", "orphan", "third"])
    made[1].tenant_id = "no-such-tenant"  # its insert breaks the tenants foreign key
    outcomes, groups = commit_together(made, monkeypatch)
    assert groups[0] == 3  # tried together, then one by one
    assert isinstance(outcomes[0], JobRead) and isinstance(outcomes[2], JobRead)
    assert isinstance(outcomes[1], IntegrityError | psycopg.IntegrityError)
    with session_scope() as session:
        stored = set(session.scalars(select(Job.id)))
    assert stored == {made[0].id, made[2].id}
    assert sorted(queued_messages(darkroom_env["DARKROOM_REDIS_PREFIX"])) == sorted([made[0].id, made[2].id])


def test_jobs_committed_are_answered_even_when_their_place_in_line_cannot_be_read(
    tenant_id: str, darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(new: list[Job]) -> list[Any]:
        raise OSError("the database went away just after the commit")

    async def unreachable_async(new: list[Job]) -> list[Any]:
        raise OSError("the database went away just after the commit")

    monkeypatch.setattr(group_commit, "_places", unreachable)
    monkeypatch.setattr(group_commit, "_publish_and_place", unreachable_async)
    made = new_jobs(tenant_id, ["first", "second"])
    views, _ = commit_together(made, monkeypatch)
    assert [(v.id, v.status, v.queue_position) for v in views] == [(job.id, "queued", None) for job in made]
    with session_scope() as session:
        assert set(session.scalars(select(Job.id))) == {job.id for job in made}


# Keys are checked by the insert on PostgreSQL only; on SQLite a submit looks its key up first.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_job_whose_key_was_revoked_before_its_insert_is_refused_alone(
    tenant_id: str, darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with session_scope() as session:
        live, revoked = create_key(session, "acme"), create_key(session, "acme")
        revoke_key(session, revoked)
    aio_reads._seen_keys[hash_key(revoked)] = tenant_id  # seen live by this process, before the revocation
    made = new_jobs(tenant_id, ["first", "second", "third"])
    outcomes, groups = commit_together(made, monkeypatch, [hash_key(live), hash_key(revoked), None])
    assert groups == [3]  # one statement: the revoked key's job left out, not a failed group
    assert isinstance(outcomes[0], JobRead) and isinstance(outcomes[2], JobRead)
    assert isinstance(outcomes[1], Unauthorized)
    with session_scope() as session:
        assert set(session.scalars(select(Job.id))) == {made[0].id, made[2].id}
    assert sorted(queued_messages(darkroom_env["DARKROOM_REDIS_PREFIX"])) == sorted([made[0].id, made[2].id])
    assert [v.queue_position for v in (outcomes[0], outcomes[2])] == [0, 1]
    assert aio_reads.seen_tenant(hash_key(revoked)) is None  # its next request is looked up again
