"""What a failed job is told: exceptions mapped to the job error codes clients see, and recovery after them.

`out_of_memory` frees what the allocator caches before the worker takes its next job, so one oversized
request does not leave the GPU too full for the ones behind it.
"""

from __future__ import annotations

import gc
import logging

import torch

from shared.db import session_scope
from shared.jobs import RUNNING, fail_job, get_job

log = logging.getLogger("darkroom.worker")


def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(exc: BaseException) -> tuple[str, str]:
    """(error code, message) for a job whose generation raised `exc`."""
    if isinstance(exc, torch.OutOfMemoryError):
        # TODO(batching): when this job ran in a batch of more than one, retry it once alone (or at half
        # the batch) before failing; a lone job that does not fit fails here as it does today.
        free_accelerator_memory()
        return "out_of_memory", "the GPU ran out of memory; try a smaller size or fewer images"
    return "generation_failed", f"{type(exc).__name__}: {exc}"


def fail_after_hard_time_limit(job_id: str, limit: float) -> None:
    """Called in the worker's main process once Celery killed the pool process that ran past the hard limit."""
    with session_scope() as session:
        job = get_job(session, job_id)
        if job.status != RUNNING:
            return
        failed = fail_job(
            session,
            job_id,
            attempt=job.attempts,
            code="timeout",
            message=f"the job ran past its hard time limit of {limit:g} s and its process was stopped",
        )
    if failed:
        log.warning("job %s failed: timeout (hard limit of %g s)", job_id, limit)
