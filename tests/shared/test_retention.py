"""Retention against real storage (local files and an S3 server over HTTP) and both databases: the sweep
deletes the images of jobs past their tenant's retention and marks them expired, on a compressed clock;
everything younger, unfinished or kept longer by its tenant stays; expired uploads go too."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update

from shared import broker, retention
from shared.batch_view import batch_view
from shared.batches import create_batch
from shared.broker import queue_for_model
from shared.db import session_scope
from shared.errors import IllegalTransition, InvalidRequest
from shared.job_view import job_view
from shared.jobs import (
    CANCELED,
    EXPIRED,
    QUEUED,
    claim_job,
    create_job,
    expire_job,
    get_job,
    status_counts,
    succeed_job,
    transition,
)
from shared.storage import Storage, get_storage, input_key, output_key
from shared.tables import Batch, Job, WebhookDelivery, utcnow
from shared.uploads import create_upload, resolve_upload
from tests.conftest import BUCKET
from tests.support import reset_caches

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@pytest.fixture(params=["local", "s3"])
def storage(
    request: pytest.FixtureRequest, darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Storage:
    """The configured storage; with acme keeping images 1 hour and everyone else the default 720."""
    if request.param == "s3":
        monkeypatch.setenv("DARKROOM_STORAGE_URL", f"s3://{BUCKET}/retention-{uuid.uuid4().hex[:8]}")
        monkeypatch.setenv("DARKROOM_S3_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
    tenants_file = tmp_path / "tenants.toml"
    tenants_file.write_text("[tenants.acme]\nretention_hours = 1\n\n[tenants.keeper]\nretention_hours = 0\n")
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(tenants_file))
    reset_caches()
    return get_storage()


def exists(storage: Storage, key: str) -> bool:
    try:
        storage.get(key)
    except FileNotFoundError:
        return False
    return True


def finished_job(storage: Storage, tenant_id: str, batch_id: str | None = None) -> str:
    """A job a worker ran to success: an input and an output in storage."""
    with session_scope() as session:
        job = create_job(
            session,
            tenant_id=tenant_id,
            model="tiny-sd",
            queue=queue_for_model("tiny-sd"),
            request={"prompt": "p", "image": "set below"},
            metadata=None,
            batch_id=batch_id,
        )
        job_id = job.id
    run_to_success(storage, job_id)
    return job_id


def run_to_success(storage: Storage, job_id: str) -> None:
    """What a worker does: store an output and an input, then succeed through the state machine."""
    storage.put(input_key(job_id, "image"), PNG, "image/png")
    storage.put(output_key(job_id, 0), PNG, "image/png")
    output = {"key": output_key(job_id, 0), "width": 8, "height": 8, "seed": 1, "content_type": "image/png"}
    with session_scope() as session:
        assert claim_job(session, job_id, worker_id="w", lease_seconds=30) is not None
    with session_scope() as session:
        assert succeed_job(session, job_id, attempt=1, outputs=[output])


def keys(job_id: str) -> list[str]:
    return [input_key(job_id, "image"), output_key(job_id, 0)]


def view(job_id: str) -> dict[str, Any]:
    with session_scope() as session:
        return job_view(session, get_job(session, job_id))


def test_the_sweep_expires_only_jobs_past_their_tenants_retention(
    storage: Storage, tenants: tuple[str, str], new_job: Callable[..., str]
) -> None:
    acme, globex = tenants
    ours, theirs = finished_job(storage, acme), finished_job(storage, globex)
    queued = new_job(acme)
    assert view(ours)["outputs"][0]["url"]

    # Half an hour on: acme keeps images one hour, so nothing is due yet.
    assert retention.sweep(now=utcnow() + timedelta(minutes=30))["jobs_expired"] == 0
    # Two hours on: acme's job expires; globex keeps the default 720 hours.
    assert retention.sweep(now=utcnow() + timedelta(hours=2))["jobs_expired"] == 1
    assert not any(exists(storage, k) for k in keys(ours))
    expired = view(ours)
    assert (expired["status"], expired["outputs"], expired["request"]["prompt"]) == ("expired", [], "p")
    assert all(exists(storage, k) for k in keys(theirs)) and view(theirs)["status"] == "succeeded"
    assert view(queued)["status"] == "queued"
    # Finished-job totals count an expired job under the status it ended with, so they never shrink.
    assert ("tiny-sd", "succeeded", None, 2) in status_counts_of_model()

    assert retention.sweep(now=utcnow() + timedelta(hours=721))["jobs_expired"] == 1
    assert view(theirs)["status"] == "expired" and not any(exists(storage, k) for k in keys(theirs))
    assert view(queued)["status"] == "queued"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_only_an_ended_job_can_expire_and_an_expired_one_stays_so(new_job: Callable[..., str]) -> None:
    job_id = new_job()
    with session_scope() as session, pytest.raises(IllegalTransition):
        transition(session, job_id, from_=[QUEUED], to=EXPIRED)
    with session_scope() as session:
        assert not expire_job(session, job_id)  # queued: not a source of `expired`, nothing changes
        assert get_job(session, job_id).status == QUEUED
    with session_scope() as session, pytest.raises(IllegalTransition):
        transition(session, job_id, from_=[EXPIRED], to=CANCELED)


def status_counts_of_model() -> list[tuple[str, str, str | None, int]]:
    with session_scope() as session:
        return status_counts(session)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_tenant_with_retention_zero_keeps_images_forever(storage: Storage, darkroom_env: dict[str, Any]) -> None:
    from shared.tenants import get_or_create_tenant

    with session_scope() as session:
        keeper = get_or_create_tenant(session, "keeper").id
    job_id = finished_job(storage, keeper)
    assert retention.sweep(now=utcnow() + timedelta(days=3650))["jobs_expired"] == 0
    assert all(exists(storage, k) for k in keys(job_id))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_each_pass_handles_a_bounded_chunk_and_one_worker_sweeps_at_a_time(
    storage: Storage, tenants: tuple[str, str]
) -> None:
    acme = tenants[0]
    jobs = [finished_job(storage, acme) for _ in range(3)]
    # The compressed clock, the other way round: these jobs ended two hours ago.
    with session_scope() as session:
        session.execute(update(Job).values(updated_at=utcnow() - timedelta(hours=2)))

    lock = broker.lock("retention", timeout=60)
    assert lock.acquire()  # another worker is sweeping
    assert retention.run_pass() is None
    assert [view(j)["status"] for j in jobs] == ["succeeded"] * 3
    lock.release()

    assert retention.sweep(limit=2)["jobs_expired"] == 2
    assert sorted(view(j)["status"] for j in jobs) == ["expired", "expired", "succeeded"]
    assert retention.run_pass() == {"jobs_expired": 1, "uploads_deleted": 0}
    assert all(view(j)["status"] == "expired" for j in jobs)
    assert not any(exists(storage, k) for j in jobs for k in keys(j))


def test_expired_uploads_are_deleted(storage: Storage, tenants: tuple[str, str]) -> None:
    acme = tenants[0]
    with session_scope() as session:
        upload = create_upload(session, storage, acme, Image.new("RGB", (8, 8)), ttl=60)
        key = upload.key
    assert exists(storage, key)
    assert retention.sweep(now=utcnow() + timedelta(seconds=30))["uploads_deleted"] == 0
    assert retention.sweep(now=utcnow() + timedelta(minutes=2))["uploads_deleted"] == 1
    assert not exists(storage, key)
    with session_scope() as session, pytest.raises(InvalidRequest, match="unknown or expired upload"):
        resolve_upload(session, acme, key, "image")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_expiring_batch_job_does_not_complete_its_batch_again(storage: Storage, tenants: tuple[str, str]) -> None:
    acme = tenants[0]
    with session_scope() as session:
        batch_id = create_batch(
            session, tenant_id=acme, total=1, webhook_url="http://127.0.0.1:9/hook", metadata=None
        ).id
    job_id = finished_job(storage, acme, batch_id=batch_id)
    assert retention.sweep(now=utcnow() + timedelta(hours=2))["jobs_expired"] == 1
    with session_scope() as session:
        batch = session.get_one(Batch, batch_id)
        seen = batch_view(session, batch)
        deliveries = session.query(WebhookDelivery).filter_by(batch_id=batch_id).count()
    assert deliveries == 1 and batch.remaining == 0
    assert seen["status"] == "completed" and seen["counts"]["expired"] == 1
    assert seen["jobs"][0]["id"] == job_id and seen["jobs"][0]["outputs"] == []
