"""The `jobs.run` task: claim a job, generate its images, upload them, and record the result.

Tasks take ids, re-read the job, and do nothing if the job is no longer queued, so a duplicate or
republished message is harmless.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from shared import broker
from shared.broker import TASK_RUN_JOB
from shared.db import session_scope
from shared.jobs import claim_job, fail_job, record_progress, succeed_job
from shared.registry import get_registry
from shared.settings import get_settings
from shared.storage import get_storage
from worker.generate import StopGeneration, generate
from worker.inputs import load_inputs
from worker.lease import Heartbeat
from worker.outputs import store_outputs
from worker.pipelines import PipelineCache, resolve_device
from worker.safety import nsfw_flags
from worker.variants import prepare_pipeline, sampler_name

log = logging.getLogger("darkroom.worker")

_cache: PipelineCache | None = None


def pipeline_cache() -> PipelineCache:
    global _cache
    if _cache is None:
        _cache = PipelineCache(resolve_device(get_settings().device))
    return _cache


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
        now = time.monotonic()
        if step == total or now - self.last_write >= self.interval:
            self.last_write = now
            with session_scope() as session:
                still_ours = record_progress(session, self.job_id, attempt=self.attempt, step=step, total=total)
            if not still_ours:
                raise StopGeneration("job is no longer running on this worker")


def run_job(job_id: str) -> str:
    settings = get_settings()
    with session_scope() as session:
        job = claim_job(session, job_id, worker_id=worker_id(), lease_seconds=settings.lease_seconds)
    if job is None:
        return "skipped"  # already claimed, finished or canceled: this message is a duplicate
    attempt, request = job.attempts, job.request
    log.info("job %s started (attempt %d)", job_id, attempt)

    def fail(code: str, message: str) -> str:
        with session_scope() as session:
            fail_job(session, job_id, attempt=attempt, code=code, message=message)
        log.warning("job %s failed: %s: %s", job_id, code, message)
        return "failed"

    with Heartbeat(job_id, attempt, settings.lease_seconds):
        spec = get_registry().get(job.model)
        if spec is None:
            return fail("unknown_model", f"model {job.model!r} is not in this worker's registry")
        try:
            base = pipeline_cache().get(spec)
            pipe = prepare_pipeline(base, request)  # the task's pipeline, scheduler and LoRAs over base's modules
            images = generate(
                pipe, request, StepHook(job_id, attempt, settings.progress_interval), load_inputs(request)
            )
            nsfw = nsfw_flags(base, images)
        except StopGeneration as stop:
            log.info("job %s stopped: %s", job_id, stop)
            return "stopped"
        except SoftTimeLimitExceeded:
            return fail("timeout", f"the job ran past its time limit of {settings.job_soft_time_limit} s")
        except Exception as exc:
            log.exception("job %s: generation failed", job_id)
            return fail("generation_failed", f"{type(exc).__name__}: {exc}")

        if any(nsfw) and request.get("nsfw", "withhold") == "withhold":
            return fail("content_policy", "the model's safety checker flagged the output, so it was withheld")
        outputs = store_outputs(get_storage(), job_id, request, images, nsfw, sampler=sampler_name(pipe, request))
        with session_scope() as session:
            won = succeed_job(session, job_id, attempt=attempt, outputs=outputs)
    if not won:
        log.info("job %s finished but was canceled or taken over meanwhile; outputs discarded", job_id)
        return "discarded"
    log.info("job %s succeeded with %d images", job_id, len(outputs))
    return "succeeded"


def register(app: Celery) -> None:
    app.task(name=TASK_RUN_JOB, ignore_result=True)(run_job)
