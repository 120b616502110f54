"""What a failed job is told: exceptions mapped to the job error codes clients see, and recovery after them.

`out_of_memory` frees what the allocator caches before the worker takes its next job, so one oversized
request does not leave the GPU too full for the ones behind it. A batched call that runs out of memory never
gets here: `worker.batching` retries its jobs at half the batch first; only a job alone in its call fails.

torch is imported inside the functions that use it: Celery's main process imports this module for its
hard-time-limit hook and must never load torch (worker/job_task.py says why).
"""

from __future__ import annotations

import gc
import json
import logging
from typing import Any

from celery import current_task

from shared import broker
from shared.db import session_scope
from shared.jobs import fail_job
from shared.settings import Settings, get_settings

log = logging.getLogger("darkroom.worker")


def free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(exc: BaseException) -> tuple[str, str]:
    """(error code, message) for a job whose generation raised `exc`."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        free_accelerator_memory()
        return "out_of_memory", "the GPU ran out of memory; try a smaller size or fewer images"
    return "generation_failed", f"{type(exc).__name__}: {exc}"


def _running_key(task_id: str) -> str:
    return f"{get_settings().redis_prefix}task-jobs:{task_id}"


def remember_running(members: list[Any], settings: Settings) -> None:
    """Note which jobs this task runs, so the main process can fail them if the hard time limit kills us.

    The task's own argument is only a wake-up token: the jobs it runs are whichever it claimed.
    """
    task = current_task
    task_id = getattr(getattr(task, "request", None), "id", None)
    if not task_id:
        return  # called outside Celery (tests)
    value = json.dumps([[m.job_id, m.attempt] for m in members])
    try:
        broker.get_redis().set(_running_key(task_id), value, ex=settings.job_hard_time_limit * 2 + 60)
    except Exception as exc:  # Redis down: a hard timeout then shows as a crash, retried by lease expiry
        log.warning("running jobs of task %s not recorded: %s", task_id, type(exc).__name__)


def fail_after_hard_time_limit(task_id: str, limit: float) -> None:
    """Called in the worker's main process once Celery killed the pool process that ran past the hard limit."""
    raw = broker.get_redis().get(_running_key(task_id))
    for job_id, attempt in json.loads(raw) if raw else []:
        with session_scope() as session:
            failed = fail_job(
                session,
                job_id,
                attempt=attempt,
                code="timeout",
                message=f"the job ran past its hard time limit of {limit:g} s and its process was stopped",
            )
        if failed:
            log.warning("job %s failed: timeout (hard limit of %g s)", job_id, limit)
