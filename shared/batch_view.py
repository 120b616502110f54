"""A batch as clients see it (GET /v1/batches/{id} and the `batch.completed` webhook's `data`): its
aggregate status, the count of its jobs in each status, and the jobs themselves.

Like shared.job_view it lives in shared/, because the worker renders it too: the webhook body is written
in the transaction of the last job's end, and must be what GET returns.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.job_view import _iso, job_view
from shared.tables import Batch, Job

STATUSES = ("queued", "running", "succeeded", "failed", "canceled", "expired")
ENDED = ("succeeded", "failed", "canceled", "expired")


def status_counts(session: Session, batch_id: str) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all()
    found = {status: int(n) for status, n in rows}
    return {status: found.get(status, 0) for status in STATUSES}


def aggregate_status(batch: Batch, counts: dict[str, int]) -> str:
    """queued (nothing started yet), running, then completed -- or canceled, when the client canceled it."""
    if sum(counts[s] for s in ENDED) >= batch.total:
        return "canceled" if batch.canceled_at is not None else "completed"
    if counts["queued"] == batch.total:
        return "queued"
    return "running"


def batch_jobs(session: Session, batch_id: str) -> list[Job]:
    stmt = select(Job).where(Job.batch_id == batch_id).order_by(Job.batch_index, Job.id)
    return list(session.scalars(stmt.execution_options(populate_existing=True)).all())


def batch_view(session: Session, batch: Batch, *, with_jobs: bool = True) -> dict[str, Any]:
    """The JSON-ready dict of `BatchRead` (or of `BatchSummary` without jobs)."""
    counts = status_counts(session, batch.id)
    view: dict[str, Any] = {
        "id": batch.id,
        "status": aggregate_status(batch, counts),
        "total": batch.total,
        "counts": counts,
        "created_at": _iso(batch.created_at),
        "completed_at": _iso(batch.completed_at),
        "canceled_at": _iso(batch.canceled_at),
        "metadata": batch.client_metadata,
        "webhook_url": batch.webhook_url,
    }
    if with_jobs:
        # Without a session, so no per-job queue position: one batch can hold hundreds of queued jobs.
        view["jobs"] = [job_view(None, job) for job in batch_jobs(session, batch.id)]
    return view
