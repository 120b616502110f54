"""A batch's countdown: each of its jobs that ends counts it down by one, and the job that takes it to zero
writes the `batch.completed` webhook into the outbox.

shared.events calls `job_ended` in the transaction of the job's terminal transition. The countdown is one
conditional `UPDATE batches SET remaining = remaining - 1 WHERE remaining > 0 RETURNING remaining`: when the
last two jobs end at once in two transactions, the second UPDATE waits for the first's row lock and then
sees its result, so exactly one of them reads 0 and the webhook is written once, committed with that job.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared import webhooks
from shared.batch_view import batch_view
from shared.tables import Batch, utcnow


def job_ended(session: Session, batch_id: str) -> str | None:
    """Count the batch down; returns the id of a `batch.completed` delivery to send after commit, if any."""
    left = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.remaining > 0)
        .values(remaining=Batch.remaining - 1)
        .returning(Batch.remaining)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if left != 0:
        return None
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(completed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    batch = session.get(Batch, batch_id, populate_existing=True)
    if batch is None or not batch.webhook_url:
        return None
    return webhooks.add_row(
        session,
        tenant_id=batch.tenant_id,
        url=batch.webhook_url,
        event=webhooks.BATCH_COMPLETED,
        data=batch_view(session, batch),
        batch_id=batch.id,
    )
