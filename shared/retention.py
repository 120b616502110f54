"""Retention: a finished job's images (outputs and inputs) are deleted from storage some hours after it
ends, and the job becomes `expired` -- its record stays. Expired uploads are deleted by the same sweep.

How long is a Setting (`DARKROOM_RETENTION_HOURS`) that a tenant's table in the operator's TOML file may
override (`retention_hours`); 0 keeps a tenant's images forever. The sweep runs from the reconciler loop
of the workers under a Redis lock of its own, a bounded chunk per pass. Objects are deleted before the
status changes, so a crash in between leaves a job that the next pass simply deletes again (deletes are
idempotent), never an `expired` job whose images are still there.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from datetime import datetime, timedelta

import redis
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared import broker, jobs
from shared.db import session_scope
from shared.errors import Conflict
from shared.settings import get_settings
from shared.storage import Storage, get_storage
from shared.tables import Job, Tenant, Upload, utcnow
from shared.tenant_config import tenant_entry

log = logging.getLogger("darkroom.retention")

# Jobs (and uploads) one pass handles at most: a pass stays short, and the next one goes on.
CHUNK = 100
# Longer than a pass of CHUNK deletes takes even against a slow S3; a crashed holder frees it after this.
LOCK_SECONDS = 300


def retention_hours(tenant_name: str) -> float | None:
    """Hours the tenant's images are kept after a job ends; None: forever."""
    hours = tenant_entry(tenant_name).get("retention_hours", get_settings().retention_hours)
    if isinstance(hours, bool) or not isinstance(hours, int | float) or hours < 0:
        raise ValueError(f"tenant {tenant_name!r}: retention_hours must be a number >= 0, got {hours!r}")
    return float(hours) or None


def delete_job_objects(storage: Storage, job_id: str) -> None:
    # Every object of a job lives under these two prefixes (shared.storage output_key and input_key).
    storage.delete_prefix(f"jobs/{job_id}")
    storage.delete_prefix(f"inputs/{job_id}")


def delete_job(job_id: str, tenant_id: str) -> Job:
    """DELETE /v1/jobs/{id}: the job's images now, and the job `expired`. A job still queued or running is
    refused (409): cancel it first, so its worker cannot write outputs after they were deleted."""
    with session_scope() as session:
        job = jobs.get_job(session, job_id, tenant_id)
        if job.status == jobs.EXPIRED:
            return job  # nothing left to delete: repeating a DELETE is harmless
        if job.status not in jobs.ENDED:
            raise Conflict(
                f"job {job_id!r} is {job.status}; cancel it first (POST /v1/jobs/{job_id}/cancel), then delete it",
                code="job_not_finished",
            )
    delete_job_objects(get_storage(), job_id)
    with session_scope() as session:
        jobs.expire_job(session, job_id)
        return jobs.get_job(session, job_id)


def _due_jobs(session: Session, now: datetime, limit: int) -> list[str]:
    """Ended jobs past their tenant's retention, oldest first, at most `limit`."""
    by_hours: dict[float | None, list[str]] = defaultdict(list)
    for tenant_id, name in session.execute(select(Tenant.id, Tenant.name)).all():
        by_hours[retention_hours(name)].append(tenant_id)
    due: list[str] = []
    for hours, tenant_ids in by_hours.items():
        if hours is None or len(due) >= limit:
            continue
        # An ended job's updated_at is when it ended: the (status, updated_at) index finds them.
        stmt = (
            select(Job.id)
            .where(
                Job.status.in_(sorted(jobs.ENDED)),
                Job.updated_at < now - timedelta(hours=hours),
                Job.tenant_id.in_(tenant_ids),
            )
            .order_by(Job.updated_at)
            .limit(limit - len(due))
        )
        due.extend(session.scalars(stmt).all())
    return due


def sweep(now: datetime | None = None, limit: int = CHUNK) -> dict[str, int]:
    """One pass: expire up to `limit` jobs past retention and delete up to `limit` expired uploads."""
    now = now or utcnow()
    storage = get_storage()
    with session_scope() as session:
        due = _due_jobs(session, now, limit)
        uploads = session.execute(
            select(Upload.id, Upload.key).where(Upload.expires_at < now).order_by(Upload.expires_at).limit(limit)
        ).all()
    deleted = []
    for job_id in due:
        try:
            delete_job_objects(storage, job_id)
            deleted.append(job_id)
        except Exception as exc:  # storage trouble: this job stays as it is and is tried again next pass
            log.warning("deleting the images of job %s failed: %s: %s", job_id, type(exc).__name__, exc)
    gone_uploads = []
    for upload_id, key in uploads:
        try:
            storage.delete(key)
            gone_uploads.append(upload_id)
        except Exception as exc:
            log.warning("deleting upload %s failed: %s: %s", key, type(exc).__name__, exc)
    with session_scope() as session:
        expired = sum(jobs.expire_job(session, job_id) for job_id in deleted)
        if gone_uploads:
            session.execute(delete(Upload).where(Upload.id.in_(gone_uploads)))
    if expired or gone_uploads:
        log.info("retention: %d jobs expired, %d uploads deleted", expired, len(gone_uploads))
    return {"jobs_expired": expired, "uploads_deleted": len(gone_uploads)}


def run_pass() -> dict[str, int] | None:
    """`sweep` under the retention lock; None when another worker holds it (it is sweeping now)."""
    lock = broker.lock("retention", timeout=LOCK_SECONDS)
    if not lock.acquire():
        return None
    try:
        return sweep()
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()
