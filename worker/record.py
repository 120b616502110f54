"""Recording a stored batch: each job's end in the database (succeeded, or failed because storage gave up)
and the metrics of every job of the batch that ended.

This is SQLAlchemy and Redis work in Python, several milliseconds per batch. It runs on an encoder process
when there are any (worker/store.py), like the encoding and uploads before it: on the store thread it would
take the generating process's GIL while the next batch's call runs (bench.e2e measured that call about 15%
slower than the same call made directly). Nothing here imports torch.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.db import retry_unit_of_work
from shared.jobs import fail_job, succeed_jobs
from shared.settings import get_settings
from shared.storage import StorageUnavailable
from worker import status

log = logging.getLogger("darkroom.worker")

# job id -> (attempt, its outputs records or the StorageUnavailable that stopped its uploads)
Stored = dict[str, tuple[int, list[dict[str, Any]] | StorageUnavailable]]


def record_batch(stored: Stored, *, ended_before: list[str]) -> dict[str, str]:
    """Fail the jobs whose uploads gave up, mark the others succeeded in one UPDATE (unless canceled or
    taken over meanwhile: `discarded`), then record the metrics of these and of `ended_before` (the batch's
    jobs that failed earlier). Returns each stored job's outcome."""
    gave_up = {
        job_id: (attempt, str(o)) for job_id, (attempt, o) in stored.items() if isinstance(o, StorageUnavailable)
    }
    uploaded = {
        job_id: (attempt, o) for job_id, (attempt, o) in stored.items() if not isinstance(o, StorageUnavailable)
    }
    retry_seconds = get_settings().db_retry_seconds
    outcomes: dict[str, str] = {}
    if gave_up:

        def fail(session: Any) -> None:
            for job_id, (attempt, message) in gave_up.items():
                fail_job(session, job_id, attempt=attempt, code="storage_unavailable", message=message)

        retry_unit_of_work(fail, seconds=retry_seconds, what="failure of a batch")
        for job_id, (_, message) in gave_up.items():
            outcomes[job_id] = "failed"
            log.warning("job %s failed: storage_unavailable: %s", job_id, message)
    if uploaded:
        # Nothing is listed for a job before this UPDATE: its outputs appear with its `succeeded` status.
        won = retry_unit_of_work(
            lambda session: succeed_jobs(session, uploaded), seconds=retry_seconds, what="results of a batch"
        )
        for job_id, (_, outputs) in uploaded.items():
            if job_id in won:
                outcomes[job_id] = "succeeded"
                log.info("job %s succeeded with %d images", job_id, len(outputs))
            else:
                outcomes[job_id] = "discarded"
                log.info("job %s finished but was canceled or taken over meanwhile; outputs discarded", job_id)
    ended = [job_id for job_id, outcome in outcomes.items() if outcome in ("succeeded", "failed")]
    status.record_metrics([*ended_before, *ended])
    return outcomes
