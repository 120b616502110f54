"""The `jobs.run` task: claim the best queued job and compatible company, run them, record the results.

A message is a wake-up token for its queue (see `shared.scheduling`): the task claims whatever job is best
to run now, which need not be the one the message names, so a duplicate or republished message is
harmless: it finds nothing queued, or runs the next job in line.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from shared import broker, limits
from shared.db import DB_UNAVAILABLE, retry_unit_of_work, session_scope
from shared.jobs import hand_back
from shared.registry import get_registry
from shared.scheduling import held_back_queues, queue_of
from shared.settings import Settings, get_settings
from shared.tables import Job
from worker import acceleration, claims, failures, sidecar, status, store
from worker.batching import Member, StepHook, full_call_seconds, gather, run_batch
from worker.generate import StopGeneration
from worker.lease import Heartbeat
from worker.next_batch import NextBatch
from worker.pipelines import ModelTooLarge, PipelineCache, resolve_device
from worker.record import fail_jobs
from worker.safety import nsfw_flags_by_job
from worker.sidecar import Later
from worker.store import ToStore
from worker.variants import prepare_pipeline, sampler_name

__all__ = ["StepHook", "pipeline_cache", "run_job"]

log = logging.getLogger("darkroom.worker")

_cache: PipelineCache | None = None


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
    """Run the best queued job of `job_id`'s queue, with compatible jobs gathered into the same call; then,
    while the queue has more, the next best batch, with the last one's storing overlapping this one's call.

    Encoding, watermarking and uploading a batch's images is CPU work of about the size of the call itself
    on a GPU; done between calls, it leaves the accelerator idle that long. Here batch N is stored and
    recorded on a second thread (encoding itself on the encoder processes, worker/store.py) while batch
    N+1 generates. Batch N+1 is claimed while batch N's call decodes (worker/next_batch.py), so a job reads
    `running` from one decode before its call; claims follow the same scheduling rule as a fresh token's,
    so priorities and fair share hold, and the tokens of the jobs the loop ran find nothing queued and are
    skipped. It stops claiming once a quarter of the task's soft time limit has passed, so that the last
    batch keeps most of the limit for itself, and when the worker is stopping.
    """
    settings = get_settings()
    me = worker_id()

    # Claims are retried through a database outage: a token lost here would leave its job to the reconciler.
    # The token's queue is looked up in the claim's own transaction: one unit of work, not two, between a
    # message and its job starting.
    def claim(session: Any) -> list[Job]:
        queue = queue_of(session, job_id)
        return claims.claim_batch(session, queue, settings, me) if queue else []

    claimed = retry_unit_of_work(claim, seconds=settings.db_retry_seconds, what=f"claim for token {job_id}")
    if not claimed:
        return "skipped"  # nothing queued: this token's job ran with an earlier one, or was canceled
    queue = claimed[0].queue
    if job_id != claimed[0].id:
        log.debug("token of job %s ran job %s", job_id, claimed[0].id)
    stop_claiming_at = time.monotonic() + settings.job_soft_time_limit / 4

    claim_next = partial(claims.claim_next, queue, me)  # picklable: it may run on the sidecar

    outcomes: dict[str, str] = {}
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="store") as storer,
        # The database work of a call (its progress writes, then the next batch's claim), beside the call.
        sidecar.beside() as beside,
    ):
        storing: Future[Stored] | None = None
        while claimed:
            members, tenants = gather_company(claimed, settings, me)
            status.state.current_job = members[0].job_id
            following = NextBatch(beside, claim_next, until=stop_claiming_at, stopping=status.stop_requested)

            def near_end(following: NextBatch[Job] = following) -> None:
                if not acceleration.cold():  # else claimed after the warming below, not held through it
                    following.start()

            computed = compute(
                claimed[0].model, queue, members, tenants, settings, near_end=near_end, writer=beside.submit
            )
            if storing is not None:
                outcomes.update(settle(storing.result()))
            stopping = computed.stopped or status.stop_requested()
            # While a loaded model has compiled shapes to warm, one is warmed after each batch, once its
            # images are on their way to storage and before anything more is claimed (worker/acceleration.py).
            warming = not stopping and acceleration.cold()
            claimed = [] if stopping or warming else following.take()
            # With nothing to run next, the generating thread's core stores too (worker/store.py).
            storing = storer.submit(store_and_record, computed, settings, spare_here=not claimed and not warming)
            if warming:
                stopping = not warm_next()
                claimed = [] if stopping else following.take()
            if stopping:
                # Claimed during the last step of a call that then stopped the loop: never run, so not an attempt.
                outcomes.update(hand_back_all([member_of(job) for job in following.claimed()], queue))
                break
        if storing is not None:
            outcomes.update(settle(storing.result()))
    return summary(outcomes)


def warm_next() -> bool:
    """Warm the next compiled shape; False if the task's time limit came first (the next task goes on)."""
    try:
        acceleration.warm_next()
    except SoftTimeLimitExceeded:
        log.warning("the task's time limit came while warming a compiled shape")
        return False
    return True


def gather_company(claimed: list[Job], settings: Settings, me: str) -> tuple[list[Member], set[str]]:
    """The members of a claimed batch and their tenants, after waiting out the gathering window for more
    compatible jobs if the batch is not full."""
    leader = claimed[0]
    members = [member_of(job) for job in claimed]
    tenants = {job.tenant_id for job in claimed}
    images = sum(m.images for m in members)
    if not claims.batchable(leader, settings) or images >= settings.max_batch_images:
        return members, tenants

    unavailable = False

    def claim_more(room: int) -> int:
        nonlocal unavailable
        if unavailable:
            return 0
        try:
            with session_scope() as session:
                more = claims.claim_company(session, leader, room, settings, me)
        except DB_UNAVAILABLE as exc:
            # Company is optional, and the jobs already claimed are ours to run: failing here would leave
            # them `running` with nobody renewing their lease, to be redone after it lapses.
            log.warning("gathering stopped: database unavailable (%s)", type(exc).__name__)
            unavailable = True
            return 0
        members.extend(member_of(job) for job in more)
        tenants.update(job.tenant_id for job in more)
        return sum(int(job.request["num_images"]) for job in more)

    window_s = settings.batch_window_ms / 1000
    # A burst submitted over HTTP arrives over longer than the window; split, it costs a call more (on a
    # compiled worker, padded to the full shape). So while it keeps arriving, it is waited for, within a
    # fraction of the call it will share.
    full = full_call_seconds(leader.batch_key or "", settings.max_batch_images)
    stretch_s = settings.batch_wait_fraction * full
    gather(
        claim_more,
        images=images,
        max_images=settings.max_batch_images,
        window_s=window_s,
        looked=True,
        stretch_s=stretch_s,
    )
    return members, tenants


def settle(stored: Stored) -> dict[str, str]:
    """Account for a stored batch on the generating thread: the held-back queues its freed slots can wake.
    (Its counters and metrics were recorded on the store thread, off the path between two calls.)"""
    wake_held_back(stored.tenants, len(stored.outcomes))
    return stored.outcomes


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


@dataclass
class Finished:
    """A job whose images passed the safety check, waiting to be stored."""

    member: Member
    images: list[Any]
    nsfw: list[bool]
    sampler: str


@dataclass
class Computed:
    """A batch whose generation is over: failed jobs are recorded, `finished` ones remain to be stored."""

    members: list[Member]
    tenants: set[str]
    outcomes: dict[str, str] = field(default_factory=dict)
    finished: list[Finished] = field(default_factory=list)
    stopped: bool = False  # a graceful shutdown stopped the call: claim nothing more


@dataclass
class Stored:
    """A batch done with: each job's outcome, and the tenants whose running slots it frees."""

    outcomes: dict[str, str]
    tenants: set[str]


def fail_members(targets: list[Member], code: str, message: str, outcomes: dict[str, str]) -> None:
    fail_jobs({member.job_id: (member.attempt, message) for member in targets}, code, outcomes)


def compute(
    model: str,
    queue: str,
    members: list[Member],
    tenants: set[str],
    settings: Settings,
    *,
    near_end: Callable[[], None] | None = None,
    writer: Callable[[Callable[[], Any]], Later] | None = None,
) -> Computed:
    """Generate a claimed batch and run the safety check; what fails on the way is recorded here.
    `near_end` is called when a call of the batch reaches its last denoising step; `writer` runs its
    progress writes (see StepHook)."""
    computed = Computed(members, tenants)
    outcomes = computed.outcomes

    def fail(targets: list[Member], code: str, message: str) -> None:
        fail_members(targets, code, message, outcomes)

    log.info("running %d jobs (%d images) of %s", len(members), sum(m.images for m in members), model)
    for member in members:
        log.info("job %s started (attempt %d)", member.job_id, member.attempt)
    with Heartbeat({m.job_id: m.attempt for m in members}, settings.lease_seconds) as beat:
        # An upscale job on a model with an upscaler runs the upscaler's weights (worker/upscale.py).
        runs = members[0].request.get("upscaler") or model
        spec = get_registry().get(runs)
        if spec is None:
            fail(members, "unknown_model", f"model {runs!r} is not in this worker's registry")
            return computed
        hook = StepHook(
            members,
            settings.progress_interval,
            beat.lost,
            preview_every=settings.preview_every_steps,
            near_end=near_end,
            writer=writer,
        )
        try:
            base = pipeline_cache().get(spec)
            # Every member shares task, scheduler and LoRAs (they are in the batch key): one pipeline serves all.
            pipe = prepare_pipeline(base, members[0].request)
            result = run_batch(pipe, members, hook, settings)
        except StopGeneration as stop:
            log.info("jobs %s stopped: %s", ", ".join(m.job_id for m in members), stop)
            if status.stop_requested():
                outcomes.update(hand_back_all(hook.live(), queue))
                computed.stopped = True
            return computed
        except ModelTooLarge as exc:
            fail(members, "model_too_large", str(exc))
            return computed
        except SoftTimeLimitExceeded:
            fail(hook.live(), "timeout", f"the job ran past its time limit of {settings.job_soft_time_limit} s")
            return computed
        except Exception as exc:
            log.exception("generation failed")
            fail(hook.live(), *failures.describe(exc))
            return computed
        finally:
            hook.abandon()  # a finished call's writes were settled; a stopped or failed one's are dropped

        by_id = {m.job_id: m for m in members}
        for job_id, (code, message) in result.failed.items():
            fail([by_id[job_id]], code, message)
        if result.timed_out is not None:
            limit = settings.job_soft_time_limit
            fail([by_id[result.timed_out]], "timeout", f"the job ran past its time limit of {limit} s")
            outcomes.update(hand_back_all(result.unrun, queue))
            computed.stopped = True
        # The safety check runs the base model's checker on the accelerator: here, not on the store thread.
        verdicts = nsfw_flags_by_job(base, result.images)
        for job_id, images in result.images.items():
            member, nsfw = by_id[job_id], verdicts[job_id]
            if isinstance(nsfw, Exception):
                log.error("job %s: safety check failed", job_id, exc_info=nsfw)
                fail([member], *failures.describe(nsfw))
                continue
            if any(nsfw) and member.request.get("nsfw", "withhold") == "withhold":
                fail([member], "content_policy", "the model's safety checker flagged the output, so it was withheld")
                continue
            computed.finished.append(Finished(member, images, nsfw, sampler_name(pipe, member.request)))
    return computed


def store_and_record(computed: Computed, settings: Settings, *, spare_here: bool = False) -> Stored:
    """Encode and upload each finished job's images (retried through a storage outage), then mark the jobs
    succeeded together and record the batch's metrics. Runs on the store thread, under its own heartbeat,
    while the next batch generates; the work itself runs on the encoder processes (worker/store.py), and
    on this thread as well with `spare_here` (nothing generates meanwhile)."""
    outcomes = dict(computed.outcomes)
    finished = computed.finished
    ended_before = [job_id for job_id, outcome in outcomes.items() if outcome == "failed"]
    if finished:
        with Heartbeat({f.member.job_id: f.member.attempt for f in finished}, settings.lease_seconds):
            started = time.monotonic()
            jobs = [
                ToStore(f.member.job_id, f.member.request, f.images, f.nsfw, f.sampler, f.member.attempt)
                for f in finished
            ]
            outcomes.update(store.store_and_record(jobs, ended_before=ended_before, spare_here=spare_here))
        # While a batch's storing takes longer than the next call, that call's end waits on it.
        log.info("stored and recorded %d jobs in %.0f ms", len(finished), (time.monotonic() - started) * 1000)
    else:
        status.record_metrics(ended_before)
    for member in computed.members:
        outcomes.setdefault(member.job_id, "stopped")
    status.count_outcomes(outcomes)
    return Stored(outcomes, computed.tenants)


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
