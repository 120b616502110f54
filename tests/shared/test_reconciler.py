"""The reconciler against real Redis and a real database: lost messages come back, dead workers' jobs too."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import update

from shared import broker
from shared.db import session_scope
from shared.jobs import FAILED, QUEUED, RUNNING, claim_job, get_job
from shared.reconciler import PUBLISH_GRACE, reconcile_once
from shared.tables import Job, utcnow

QUEUE = broker.queue_for_model("tiny-sd")


@pytest.fixture
def client(darkroom_env: dict[str, Any]) -> redis.Redis:
    return broker.get_redis()


@pytest.fixture
def prefix(darkroom_env: dict[str, Any]) -> str:
    return darkroom_env["DARKROOM_REDIS_PREFIX"]


def queued_job_ids(client: redis.Redis, prefix: str) -> list[str]:
    """The job id of every run message waiting in the model's Celery queue (a Redis list)."""
    ids = []
    for raw in client.lrange(f"{prefix}{QUEUE}", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == broker.TASK_RUN_JOB
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


def published_marker(prefix: str, job_id: str) -> str:
    return f"{prefix}published:{job_id}"


def lose_messages(client: redis.Redis, prefix: str, job_id: str) -> None:
    """What a Redis restart without persistence does: the queue and the marker are gone."""
    assert client.delete(f"{prefix}{QUEUE}", published_marker(prefix, job_id)) == 2


def backdate(job_id: str, **columns: Any) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**columns))


def older_than_grace() -> Any:
    return utcnow() - PUBLISH_GRACE - timedelta(minutes=1)


def read(job_id: str) -> Job:
    with session_scope() as session:
        return get_job(session, job_id)


def claim_and_die(job_id: str, client: redis.Redis, prefix: str) -> int:
    """A worker takes the message and claims the job, then goes silent until its lease runs out."""
    client.delete(f"{prefix}{QUEUE}")
    with session_scope() as session:
        job = claim_job(session, job_id, worker_id="doomed", lease_seconds=30)
        assert job is not None
        attempt = job.attempts
    backdate(job_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    return attempt


def job_counts(report: dict[str, int]) -> dict[str, int]:
    """The part of a reconciler pass that concerns jobs (it also tends webhooks and idempotency keys)."""
    return {k: report[k] for k in ("requeued", "republished")}


def test_a_published_job_is_not_republished(new_job: Callable[..., str], client: redis.Redis, prefix: str) -> None:
    job_id = new_job()
    broker.publish_job(job_id, QUEUE)
    assert client.exists(published_marker(prefix, job_id))
    assert broker.is_published([job_id]) == [True]
    backdate(job_id, updated_at=older_than_grace())

    assert job_counts(reconcile_once()) == {"requeued": 0, "republished": 0}
    assert queued_job_ids(client, prefix) == [job_id]


def test_a_lost_message_is_republished_after_the_grace(
    new_job: Callable[..., str], client: redis.Redis, prefix: str
) -> None:
    job_id = new_job()
    broker.publish_job(job_id, QUEUE)
    lose_messages(client, prefix, job_id)
    assert broker.is_published([job_id]) == [False]

    # Within the grace the API may still be between its commit and its publish: leave it be.
    assert job_counts(reconcile_once()) == {"requeued": 0, "republished": 0}
    assert queued_job_ids(client, prefix) == []

    backdate(job_id, updated_at=older_than_grace())
    assert job_counts(reconcile_once()) == {"requeued": 0, "republished": 1}
    assert queued_job_ids(client, prefix) == [job_id]
    assert broker.is_published([job_id]) == [True]
    assert read(job_id).status == QUEUED

    # Marked again, so the next pass leaves it alone.
    assert job_counts(reconcile_once()) == {"requeued": 0, "republished": 0}
    assert queued_job_ids(client, prefix) == [job_id]


def test_a_dead_workers_job_is_requeued_and_republished(
    new_job: Callable[..., str], client: redis.Redis, prefix: str
) -> None:
    job_id = new_job()
    broker.publish_job(job_id, QUEUE)
    attempt = claim_and_die(job_id, client, prefix)
    assert read(job_id).status == RUNNING
    assert queued_job_ids(client, prefix) == []

    assert job_counts(reconcile_once()) == {"requeued": 1, "republished": 0}
    job = read(job_id)
    assert (job.status, job.attempts, job.worker_id) == (QUEUED, attempt, None)
    assert queued_job_ids(client, prefix) == [job_id]
    assert broker.is_published([job_id]) == [True]


def test_a_job_out_of_attempts_fails_and_is_not_republished(
    new_job: Callable[..., str], client: redis.Redis, prefix: str, darkroom_env: dict[str, Any]
) -> None:
    from shared.settings import get_settings

    max_attempts = get_settings().max_attempts
    job_id = new_job()
    broker.publish_job(job_id, QUEUE)
    for _ in range(max_attempts - 1):
        claim_and_die(job_id, client, prefix)
        assert job_counts(reconcile_once()) == {"requeued": 1, "republished": 0}

    claim_and_die(job_id, client, prefix)
    assert job_counts(reconcile_once()) == {"requeued": 0, "republished": 0}
    job = read(job_id)
    assert (job.status, job.attempts, job.error_code) == (FAILED, max_attempts, "worker_crashed")
    assert queued_job_ids(client, prefix) == []

    # Even with its marker gone and long past the grace, a failed job stays out of the queue.
    client.delete(published_marker(prefix, job_id))
    backdate(job_id, updated_at=older_than_grace())
    assert job_counts(reconcile_once()) == {"requeued": 0, "republished": 0}
    assert queued_job_ids(client, prefix) == []
