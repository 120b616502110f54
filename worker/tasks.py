"""The `jobs.run` task: claim a job, generate its images, upload them, and record the result.

Tasks take ids, re-read the job, and do nothing if the job is no longer queued, so a duplicate or
republished message is harmless.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from shared import broker
from shared.broker import TASK_RUN_JOB
from shared.db import DB_UNAVAILABLE, retry_unit_of_work, session_scope
from shared.jobs import claim_job, fail_job, hand_back, record_progress, succeed_job
from shared.registry import get_registry
from shared.settings import get_settings
from shared.storage import StorageUnavailable, get_storage, output_key, put_with_retry
from worker import failures, faults, status
from worker.generate import StopGeneration, encode_png, generate
from worker.lease import Heartbeat
from worker.pipelines import PipelineCache, resolve_device

log = logging.getLogger("darkroom.worker")

_cache: PipelineCache | None = None


def pipeline_cache() -> PipelineCache:
    global _cache
    if _cache is None:
        _cache = PipelineCache(resolve_device(get_settings().device))
    return _cache


def loaded_models() -> list[str]:
    return _cache.loaded if _cache is not None else []


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StepHook:
    """Called after every denoising step: stops on cancel, records progress at a bounded rate."""

    def __init__(self, job_id: str, attempt: int, interval: float):
        self.job_id = job_id
        self.attempt = attempt
        self.interval = interval
        self.last_write = 0.0

    def __call__(self, step: int, total: int) -> None:
        if broker.cancel_requested(self.job_id):
            raise StopGeneration("canceled")
        if status.stop_requested():
            raise StopGeneration("worker shutting down")
        now = time.monotonic()
        if step == total or now - self.last_write >= self.interval:
            self.last_write = now
            try:
                with session_scope() as session:
                    still_ours = record_progress(session, self.job_id, attempt=self.attempt, step=step, total=total)
            except DB_UNAVAILABLE:
                # Progress is a nicety: a database outage must not fail the job, only leave its progress stale.
                log.warning("progress of job %s not recorded: database unavailable", self.job_id)
                return
            if not still_ours:
                raise StopGeneration("job is no longer running on this worker")


def run_job(job_id: str) -> str:
    settings = get_settings()
    # Database writes are retried through an outage: a claim lost here would leave the message acked and
    # the job waiting for the reconciler; a result lost at the end would redo the whole job.
    job = retry_unit_of_work(
        lambda s: claim_job(s, job_id, worker_id=worker_id(), lease_seconds=settings.lease_seconds),
        seconds=settings.db_retry_seconds,
        what=f"claim of job {job_id}",
    )
    if job is None:
        return "skipped"  # already claimed, finished or canceled: this message is a duplicate
    attempt, request = job.attempts, job.request
    log.info("job %s started (attempt %d)", job_id, attempt)

    def fail(code: str, message: str) -> str:
        retry_unit_of_work(
            lambda s: fail_job(s, job_id, attempt=attempt, code=code, message=message),
            seconds=settings.db_retry_seconds,
            what=f"failure of job {job_id}",
        )
        log.warning("job %s failed: %s: %s", job_id, code, message)
        return "failed"

    with Heartbeat(job_id, attempt, settings.lease_seconds):
        spec = get_registry().get(job.model)
        if spec is None:
            return fail("unknown_model", f"model {job.model!r} is not in this worker's registry")
        try:
            pipe = faults.wrap(pipeline_cache().get(spec), request)
            images = generate(pipe, request, StepHook(job_id, attempt, settings.progress_interval))
        except StopGeneration as stop:
            log.info("job %s stopped: %s", job_id, stop)
            if status.stop_requested():
                return _hand_back(job_id, attempt, job.queue)
            return "stopped"
        except SoftTimeLimitExceeded:
            return fail("timeout", f"the job ran past its time limit of {settings.job_soft_time_limit} s")
        except Exception as exc:
            log.exception("job %s: generation failed", job_id)
            return fail(*failures.describe(exc))

        outputs: list[dict[str, Any]] = []
        storage = get_storage()
        for index, image in enumerate(images):
            key = output_key(job_id, index)
            try:
                put_with_retry(storage, key, encode_png(image), "image/png", seconds=settings.storage_retry_seconds)
            except StorageUnavailable as exc:
                return fail("storage_unavailable", str(exc))
            outputs.append(
                {
                    "key": key,
                    "width": image.width,
                    "height": image.height,
                    "seed": int(request["seed"]) + index,
                    "content_type": "image/png",
                }
            )
        won = retry_unit_of_work(
            lambda s: succeed_job(s, job_id, attempt=attempt, outputs=outputs),
            seconds=settings.db_retry_seconds,
            what=f"result of job {job_id}",
        )
    if not won:
        log.info("job %s finished but was canceled or taken over meanwhile; outputs discarded", job_id)
        return "discarded"
    log.info("job %s succeeded with %d images", job_id, len(outputs))
    return "succeeded"


def _hand_back(job_id: str, attempt: int, queue: str) -> str:
    """Graceful shutdown mid-job: back to the queue, not counted as an attempt, for another worker."""
    with session_scope() as session:
        handed = hand_back(session, job_id, attempt=attempt)
    if handed:
        broker.publish_job(job_id, queue)
        log.info("job %s handed back to queue %s (worker shutting down)", job_id, queue)
    return "handed_back"


def register(app: Celery) -> None:
    app.task(name=TASK_RUN_JOB, ignore_result=True)(run_job)
