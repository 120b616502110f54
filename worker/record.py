"""Recording a stored batch: each job's end in the database (succeeded, or failed because storage gave up)
and the metrics of every job of the batch that ended (from what the final UPDATE returned, not read back).

This is SQLAlchemy and Redis work in Python, several milliseconds per batch. It runs on an encoder process
when there are any (worker/store.py), like the encoding and uploads before it: on the store thread it would
take the generating process's GIL while the next batch's call runs (in bench.e2e that call waited 15 ms
beyond its CPU with the store thread busy beside it, 11 to 12 ms with this work here). Nothing here
imports torch: an encoder process loads no pipeline code.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.db import retry_unit_of_work
from shared.jobs import fail_job, succeed_jobs
from shared.settings import get_settings
from shared.storage import StorageUnavailable
from shared.tables import Job
from worker import status

log = logging.getLogger("darkroom.worker")

# job id -> (attempt, its outputs records or the StorageUnavailable that stopped its uploads)
Stored = dict[str, tuple[int, list[dict[str, Any]] | StorageUnavailable]]


def fail_jobs(failures: dict[str, tuple[int, str]], code: str, outcomes: dict[str, str]) -> None:
    """Fail each job (job id -> (attempt, message)) with `code`, retried through a database outage; their
    outcomes go into `outcomes`."""

    def write(session: Any) -> None:
        for job_id, (attempt, message) in failures.items():
            fail_job(session, job_id, attempt=attempt, code=code, message=message)

    retry_unit_of_work(write, seconds=get_settings().db_retry_seconds, what="failure of a batch")
    for job_id, (_, message) in failures.items():
        outcomes[job_id] = "failed"
        log.warning("job %s failed: %s: %s", job_id, code, message)


def record_batch(stored: Stored, *, ended_before: list[str]) -> dict[str, str]:
    """Fail the jobs whose uploads gave up, mark the others succeeded in one UPDATE (unless canceled or
    taken over meanwhile: `discarded`), then record the metrics of these and of `ended_before` (the batch's
    jobs that failed earlier). Returns each stored job's outcome."""
    gave_up: dict[str, tuple[int, str]] = {}
    uploaded: dict[str, tuple[int, list[dict[str, Any]]]] = {}
    for job_id, (attempt, outputs) in stored.items():
        if isinstance(outputs, StorageUnavailable):
            gave_up[job_id] = (attempt, str(outputs))
        else:
            uploaded[job_id] = (attempt, outputs)
    outcomes: dict[str, str] = {}
    won: dict[str, Job] = {}
    if gave_up:
        fail_jobs(gave_up, "storage_unavailable", outcomes)
    if uploaded:
        # Nothing is listed for a job before this UPDATE: its outputs appear with its `succeeded` status.
        won = retry_unit_of_work(
            lambda session: succeed_jobs(session, uploaded),
            seconds=get_settings().db_retry_seconds,
            what="results of a batch",
        )
        for job_id, (_, outputs) in uploaded.items():
            if job_id in won:
                outcomes[job_id] = "succeeded"
                log.info("job %s succeeded with %d images", job_id, len(outputs))
            else:
                outcomes[job_id] = "discarded"
                log.info("job %s finished but was canceled or taken over meanwhile; outputs discarded", job_id)
    # The succeeded jobs as their UPDATE returned them; the failed ones (rare) are read back.
    status.record_metrics_of(list(won.values()))
    status.record_metrics([*ended_before, *gave_up])
    return outcomes
