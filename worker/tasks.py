"""The `jobs.run` task: claim the best queued job and compatible company, run them, record the results.

A message is a wake-up token for its queue (see `shared.scheduling`): the task claims whatever job is best
to run now, which need not be the one the message names, so a duplicate or republished message is
harmless: it finds nothing queued, or runs the next job in line.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from shared import broker, limits
from shared.broker import TASK_RUN_JOB
from shared.db import retry_unit_of_work, session_scope
from shared.jobs import fail_job, hand_back, succeed_job
from shared.registry import get_registry
from shared.scheduling import claim_jobs, held_back_queues, queue_of
from shared.settings import Settings, get_settings
from shared.storage import S3Storage, Storage, StorageUnavailable, get_storage, put_with_retry
from shared.tables import Job
from worker import failures, status
from worker.batching import Member, StepHook, gather, run_batch
from worker.generate import StopGeneration
from worker.lease import Heartbeat
from worker.outputs import store_outputs
from worker.pipelines import ModelTooLarge, PipelineCache, resolve_device
from worker.safety import nsfw_flags
from worker.variants import prepare_pipeline, sampler_name

__all__ = ["StepHook", "pipeline_cache", "register", "run_job"]

log = logging.getLogger("darkroom.worker")

_cache: PipelineCache | None = None
# Jobs of one batch stored at once (encoding and upload) on S3.
STORE_THREADS = 4


def pipeline_cache() -> PipelineCache:
    global _cache
    if _cache is None:
        settings = get_settings()
        _cache = PipelineCache(resolve_device(settings.device), budget_bytes=settings.model_memory_mb * 2**20)
    return _cache


def loaded_models() -> list[str]:
    return _cache.loaded if _cache is not None else []


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str) -> str:
    """Run the best queued job of `job_id`'s queue, with compatible jobs gathered into the same call."""
    settings = get_settings()
    me = worker_id()

    # Claims are retried through a database outage: a token lost here would leave its job to the reconciler.
    # The token's queue is looked up in the claim's own transaction: one unit of work, not two, between a
    # message and its job starting.
    def claim(session: Any) -> list[Job]:
        queue = queue_of(session, job_id)
        return claim_jobs(session, queue, worker_id=me, lease_seconds=settings.lease_seconds) if queue else []

    claimed = retry_unit_of_work(claim, seconds=settings.db_retry_seconds, what=f"claim for token {job_id}")
    if not claimed:
        return "skipped"  # nothing queued: this token's job ran with an earlier one, or was canceled
    leader = claimed[0]
    members = [member_of(leader)]
    tenants = {job.tenant_id for job in claimed}
    # Image tasks (img2img, inpaint, upscale) run one call per job, so gathering them would only queue
    # them behind each other on this worker.
    # A job on its second attempt or later may be the one that crashed its last worker: it runs alone.
    batchable = leader.request.get("task", "txt2img") == "txt2img" and leader.attempts == 1
    if leader.batch_key and batchable and members[0].images < settings.max_batch_images:

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
            tenants.update(job.tenant_id for job in more)
            return sum(int(job.request["num_images"]) for job in more)

        gather(
            claim_more,
            images=members[0].images,
            max_images=settings.max_batch_images,
            window_s=settings.batch_window_ms / 1000,
        )
    if job_id != leader.id:
        log.debug("token of job %s ran job %s", job_id, leader.id)
    status.state.current_job = leader.id
    outcomes = run_members(leader.model, leader.queue, members, settings)
    status.record_outcomes(outcomes)
    wake_held_back(tenants, len(members))
    return summary(outcomes)


def wake_held_back(tenants: set[str], freed: int) -> None:
    """Our jobs ended, freeing `freed` running slots: give queues where a capped tenant's jobs wait (their
    tokens spent while it was at its cap, see shared.scheduling) a token per freed slot."""
    if not limits.any_running_caps():
        return
    try:
        with session_scope() as session:
            waiting = held_back_queues(session, tenants)
        for queue, job_id in waiting:
            for _ in range(freed):
                broker.publish_job(job_id, queue)
    except Exception as exc:  # the reconciler republishes eventually; never fail a finished job over this
        log.warning("waking held-back jobs failed: %s", type(exc).__name__)


def member_of(job: Job) -> Member:
    return Member(job.id, job.attempts, job.request)


def run_members(model: str, queue: str, members: list[Member], settings: Settings) -> dict[str, str]:
    """Generate, upload and record a claimed batch; returns each job's outcome."""
    outcomes: dict[str, str] = {}

    def fail(targets: list[Member], code: str, message: str) -> None:
        def write(session: Any) -> None:
            for member in targets:
                fail_job(session, member.job_id, attempt=member.attempt, code=code, message=message)

        retry_unit_of_work(write, seconds=settings.db_retry_seconds, what="failure of a batch")
        for member in targets:
            outcomes[member.job_id] = "failed"
            log.warning("job %s failed: %s: %s", member.job_id, code, message)

    log.info("running %d jobs (%d images) of %s", len(members), sum(m.images for m in members), model)
    for member in members:
        log.info("job %s started (attempt %d)", member.job_id, member.attempt)
    with Heartbeat({m.job_id: m.attempt for m in members}, settings.lease_seconds) as beat:
        # An upscale job on a model with an upscaler runs the upscaler's weights (worker/upscale.py).
        runs = members[0].request.get("upscaler") or model
        spec = get_registry().get(runs)
        if spec is None:
            fail(members, "unknown_model", f"model {runs!r} is not in this worker's registry")
            return outcomes
        hook = StepHook(members, settings.progress_interval, beat.lost, preview_every=settings.preview_every_steps)
        try:
            base = pipeline_cache().get(spec)
            # Every member shares task, scheduler and LoRAs (they are in the batch key): one pipeline serves all.
            pipe = prepare_pipeline(base, members[0].request)
            result = run_batch(pipe, members, hook, settings)
        except StopGeneration as stop:
            log.info("jobs %s stopped: %s", ", ".join(m.job_id for m in members), stop)
            if status.stop_requested():
                outcomes.update(hand_back_all(hook.live(), queue))
            return outcomes or {m.job_id: "stopped" for m in members}
        except ModelTooLarge as exc:
            fail(members, "model_too_large", str(exc))
            return outcomes
        except SoftTimeLimitExceeded:
            fail(hook.live(), "timeout", f"the job ran past its time limit of {settings.job_soft_time_limit} s")
            return outcomes
        except Exception as exc:
            log.exception("generation failed")
            fail(hook.live(), *failures.describe(exc))
            return outcomes

        by_id = {m.job_id: m for m in members}
        for job_id, (code, message) in result.failed.items():
            fail([by_id[job_id]], code, message)
        if result.timed_out is not None:
            limit = settings.job_soft_time_limit
            fail([by_id[result.timed_out]], "timeout", f"the job ran past its time limit of {limit} s")
            outcomes.update(hand_back_all(result.unrun, queue))
        done = [(by_id[job_id], images) for job_id, images in result.images.items()]
        outcomes.update(record_successes(done, base, pipe, settings, fail))
    for member in members:
        outcomes.setdefault(member.job_id, "stopped")
    return outcomes


class RetryingStorage:
    """The storage, with every put retried through an outage (raises StorageUnavailable once spent)."""

    def __init__(self, storage: Storage, seconds: float):
        self.storage, self.seconds = storage, seconds

    def put(self, key: str, data: bytes, content_type: str) -> None:
        put_with_retry(self.storage, key, data, content_type, seconds=self.seconds)


def record_successes(
    done: list[tuple[Member, list[Any]]],
    base: Any,
    pipe: Any,
    settings: Settings,
    fail: Callable[[list[Member], str, str], None],
) -> dict[str, str]:
    """Check each job's images with the base model's safety checker, upload them (retried through a storage
    outage), then mark the jobs succeeded together. `pipe` is the pipeline that ran: its sampler is recorded."""
    storage = RetryingStorage(get_storage(), settings.storage_retry_seconds)
    outputs: dict[str, list[dict[str, Any]]] = {}
    uploaded: list[Member] = []
    passed: list[tuple[Member, list[Any], list[bool]]] = []
    for member, images in done:
        try:
            nsfw = nsfw_flags(base, images)
        except Exception as exc:
            log.exception("job %s: safety check failed", member.job_id)
            fail([member], *failures.describe(exc))
            continue
        if any(nsfw) and member.request.get("nsfw", "withhold") == "withhold":
            fail([member], "content_policy", "the model's safety checker flagged the output, so it was withheld")
            continue
        passed.append((member, images, nsfw))

    def store(member: Member, images: list[Any], nsfw: list[bool]) -> list[dict[str, Any]]:
        request = member.request
        return store_outputs(storage, member.job_id, request, images, nsfw, sampler=sampler_name(pipe, request))

    # Uploads to S3 wait on the network, so a batch's jobs are stored side by side there, in about the time of
    # the slowest. Local disk is not worth it: threads encoding at once only fight over the GIL (bench.e2e
    # measured 0.53 of direct serially, 0.44 with four threads).
    threads = STORE_THREADS if isinstance(storage.storage, S3Storage) else 1
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(passed)))) as pool:
        stored = [(member, pool.submit(store, member, images, nsfw)) for member, images, nsfw in passed]
        for member, future in stored:
            try:
                outputs[member.job_id] = future.result()
            except StorageUnavailable as exc:
                # Nothing is listed for this job: its outputs appear only with the `succeeded` UPDATE.
                fail([member], "storage_unavailable", str(exc))
                continue
            uploaded.append(member)

    def write(session: Any) -> dict[str, str]:
        return {
            m.job_id: "succeeded"
            if succeed_job(session, m.job_id, attempt=m.attempt, outputs=outputs[m.job_id])
            else "discarded"
            for m in uploaded
        }

    outcomes = retry_unit_of_work(write, seconds=settings.db_retry_seconds, what="results of a batch")
    for job_id, outcome in outcomes.items():
        if outcome == "discarded":
            log.info("job %s finished but was canceled or taken over meanwhile; outputs discarded", job_id)
        else:
            log.info("job %s succeeded with %d images", job_id, len(outputs[job_id]))
    return outcomes


def hand_back_all(members: list[Member], queue: str) -> dict[str, str]:
    """Graceful shutdown mid-call: the jobs go back to the queue, not counted as attempts, for another worker."""
    outcomes = {}
    for member in members:
        with session_scope() as session:
            handed = hand_back(session, member.job_id, attempt=member.attempt)
        if handed:
            broker.publish_job(member.job_id, queue)
            log.info("job %s handed back to queue %s (worker shutting down)", member.job_id, queue)
            outcomes[member.job_id] = "handed_back"
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
