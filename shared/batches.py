"""Batches: many jobs a client submits together (one campaign, many variants), read and canceled as one.

A batch row and all its jobs are inserted in one transaction (the API validates every job first, exactly
as POST /v1/jobs would). Its countdown and `batch.completed` webhook live in shared.batch_events; its
rendering in shared.batch_view.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from shared import jobs
from shared.errors import Conflict, NotFound
from shared.tables import Batch, Job, utcnow


def create_batch(
    session: Session,
    *,
    tenant_id: str,
    total: int,
    webhook_url: str | None,
    metadata: dict[str, Any] | None,
    batch_id: str | None = None,
) -> Batch:
    """The batch row; the caller inserts its `total` jobs (batch_id, batch_index) in the same transaction."""
    batch = Batch(
        **({"id": batch_id} if batch_id else {}),
        tenant_id=tenant_id,
        total=total,
        remaining=total,
        webhook_url=webhook_url,
        client_metadata=metadata,
        created_at=utcnow(),
    )
    session.add(batch)
    session.flush()
    return batch


def get_batch(session: Session, batch_id: str, tenant_id: str) -> Batch:
    """The batch, or NotFound; another tenant's batch is indistinguishable from none."""
    batch = session.get(Batch, batch_id, populate_existing=True)
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFound(f"batch {batch_id!r} not found")
    return batch


def list_batches(session: Session, tenant_id: str, *, limit: int, after: tuple[datetime, str] | None) -> list[Batch]:
    """A tenant's batches, newest first, starting below the keyset cursor `after` (created_at, id)."""
    stmt = select(Batch).where(Batch.tenant_id == tenant_id)
    if after is not None:
        created, batch_id = after
        stmt = stmt.where(or_(Batch.created_at < created, and_(Batch.created_at == created, Batch.id < batch_id)))
    return list(session.scalars(stmt.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)).all())


def cancel_batch(session: Session, batch_id: str, tenant_id: str) -> list[str]:
    """Cancel every job of the batch that has not ended; returns their ids (for the workers' cancel flags).

    409 when every job had already ended. The unfinished jobs' rows are locked before the batch's, the
    order a worker ending one of them takes them in, so a cancel and a finishing job cannot deadlock.
    """
    get_batch(session, batch_id, tenant_id)
    unfinished = session.scalars(
        select(Job.id).where(Job.batch_id == batch_id, Job.status.in_([jobs.QUEUED, jobs.RUNNING])).with_for_update()
    ).all()
    if not unfinished:
        raise Conflict(f"batch {batch_id!r} has no unfinished jobs left to cancel", code="batch_finished")
    # Before the jobs end, so a `batch.completed` written by the last of them already says "canceled".
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(canceled_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return jobs.cancel_batch_jobs(session, batch_id)
