"""The `jobs.run` task: claim the best queued job and compatible company, run them, record the results.

A message is a wake-up token for its queue (see `shared.scheduling`): the task claims whatever job is best
to run now, which need not be the one the message names, so a duplicate or republished message is
harmless: it finds nothing queued, or runs the next job in line.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from shared.broker import TASK_RUN_JOB
from shared.db import session_scope
from shared.jobs import fail_job, succeed_job
from shared.registry import get_registry
from shared.scheduling import claim_jobs, queue_of
from shared.settings import Settings, get_settings
from shared.storage import get_storage, output_key
from shared.tables import Job
from worker.batching import Member, StepHook, gather, run_batch
from worker.generate import StopGeneration, encode_png
from worker.lease import Heartbeat
from worker.pipelines import ModelTooLarge, PipelineCache, resolve_device

__all__ = ["StepHook", "pipeline_cache", "register", "run_job"]

log = logging.getLogger("darkroom.worker")

_cache: PipelineCache | None = None


def pipeline_cache() -> PipelineCache:
    global _cache
    if _cache is None:
        settings = get_settings()
        _cache = PipelineCache(resolve_device(settings.device), budget_bytes=settings.model_memory_mb * 2**20)
    return _cache


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str) -> str:
    """Run the best queued job of `job_id`'s queue, with compatible jobs gathered into the same call."""
    settings = get_settings()
    me = worker_id()
    with session_scope() as session:
        queue = queue_of(session, job_id)
        claimed = claim_jobs(session, queue, worker_id=me, lease_seconds=settings.lease_seconds) if queue else []
    if not claimed:
        return "skipped"  # nothing queued: this token's job ran with an earlier one, or was canceled
    leader = claimed[0]
    members = [member_of(leader)]
    if leader.batch_key and members[0].images < settings.max_batch_images:

        def claim_more(room: int) -> int:
            with session_scope() as session:
                more = claim_jobs(
                    session,
                    leader.queue,
                    worker_id=me,
                    lease_seconds=settings.lease_seconds,
                    max_jobs=room,
                    max_images=room,
                    key=leader.batch_key,
                )
            members.extend(member_of(job) for job in more)
            return sum(int(job.request["num_images"]) for job in more)

        gather(
            claim_more,
            images=members[0].images,
            max_images=settings.max_batch_images,
            window_s=settings.batch_window_ms / 1000,
        )
    if job_id != leader.id:
        log.debug("token of job %s ran job %s", job_id, leader.id)
    return run_members(leader.model, members, settings)


def member_of(job: Job) -> Member:
    return Member(job.id, job.attempts, job.request)


def run_members(model: str, members: list[Member], settings: Settings) -> str:
    """Generate, upload and record a claimed batch; returns its outcome (one word per distinct outcome)."""
    outcomes: dict[str, str] = {}

    def fail(targets: list[Member], code: str, message: str) -> None:
        with session_scope() as session:
            for member in targets:
                fail_job(session, member.job_id, attempt=member.attempt, code=code, message=message)
                outcomes[member.job_id] = "failed"
                log.warning("job %s failed: %s: %s", member.job_id, code, message)

    log.info("running %d jobs (%d images) of %s", len(members), sum(m.images for m in members), model)
    with Heartbeat({m.job_id: m.attempt for m in members}, settings.lease_seconds) as beat:
        spec = get_registry().get(model)
        if spec is None:
            fail(members, "unknown_model", f"model {model!r} is not in this worker's registry")
            return summary(outcomes)
        hook = StepHook(members, settings.progress_interval, beat.lost)
        try:
            result = run_batch(pipeline_cache().get(spec), members, hook, settings)
        except StopGeneration as stop:
            log.info("jobs %s stopped: %s", ", ".join(m.job_id for m in members), stop)
            return "stopped"
        except ModelTooLarge as exc:
            fail(members, "model_too_large", str(exc))
            return summary(outcomes)
        except SoftTimeLimitExceeded:
            fail(hook.live(), "timeout", f"the job ran past its time limit of {settings.job_soft_time_limit} s")
            return summary(outcomes)
        except Exception as exc:
            log.exception("generation failed")
            fail(hook.live(), "generation_failed", f"{type(exc).__name__}: {exc}")
            return summary(outcomes)

        by_id = {m.job_id: m for m in members}
        for job_id, message in result.failed.items():
            fail([by_id[job_id]], "generation_failed", message)
        outcomes.update(record_successes([(by_id[job_id], images) for job_id, images in result.images.items()]))
    for member in members:
        outcomes.setdefault(member.job_id, "stopped")
    return summary(outcomes)


def record_successes(done: list[tuple[Member, list[Any]]]) -> dict[str, str]:
    """Upload each job's images, then mark them all succeeded in one transaction."""
    storage = get_storage()
    outputs: dict[str, list[dict[str, Any]]] = {}
    for member, images in done:
        outputs[member.job_id] = []
        for index, image in enumerate(images):
            key = output_key(member.job_id, index)
            storage.put(key, encode_png(image), "image/png")
            outputs[member.job_id].append(
                {
                    "key": key,
                    "width": image.width,
                    "height": image.height,
                    "seed": int(member.request["seed"]) + index,
                    "content_type": "image/png",
                }
            )
    outcomes = {}
    with session_scope() as session:
        for member, _ in done:
            won = succeed_job(session, member.job_id, attempt=member.attempt, outputs=outputs[member.job_id])
            outcomes[member.job_id] = "succeeded" if won else "discarded"
    for job_id, outcome in outcomes.items():
        if outcome == "discarded":
            log.info("job %s finished but was canceled or taken over meanwhile; outputs discarded", job_id)
        else:
            log.info("job %s succeeded with %d images", job_id, len(outputs[job_id]))
    return outcomes


def summary(outcomes: dict[str, str]) -> str:
    return ",".join(sorted(set(outcomes.values())))


def register(app: Celery) -> None:
    # A database outage while claiming or recording must not eat the token: the retry publishes it again.
    app.task(
        name=TASK_RUN_JOB,
        ignore_result=True,
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        retry_backoff_max=30,
        max_retries=None,
    )(run_job)
