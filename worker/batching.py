"""Running a batch: gathering compatible jobs for a short window, one pipeline call for all of them, and
the per-step hook that cancels jobs one by one.

A batch is a leader job (picked by `shared.scheduling`) plus queued jobs with its batch key, up to
`DARKROOM_MAX_BATCH_IMAGES` images. Gathering waits `DARKROOM_BATCH_WINDOW_MS` for company; while company
keeps arriving (a burst, submitted over HTTP over a second or so), it waits on, up to
`DARKROOM_BATCH_WAIT_FRACTION` of the time a full call of that batch key last took.

A job canceled mid-call loses its images while the others go on; the call stops only once no job in it is
still wanted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from shared import broker
from shared.scheduling import batch_key
from shared.settings import Settings
from worker import failures, faults, status
from worker.acceleration import bucket_for, compiled_at, parse_shapes, stance
from worker.generate import StopGeneration, generate_batch
from worker.inputs import load_inputs
from worker.preview import Factors, preview_uri
from worker.progress import write_progress
from worker.sidecar import Later
from worker.upscale import is_upscaler

log = logging.getLogger("darkroom.worker")

# Pipelines known to take per-image prompt and generator lists; anything else runs one call per job.
BATCHABLE = (StableDiffusionPipeline, StableDiffusionXLPipeline)
# How often gathering looks for company again within its window.
GATHER_POLL_S = 0.002
# Least seconds between two looks for cancels during a call. A step of SD 1.5 alone on an H200 takes about
# 8 ms: looking at every step was a Redis round trip per step, 30 per job, on the path of an idle job.
# A cancel waits at most this long more to be seen; one that lands later still drops the job's images
# once the call returns (`_keep_live`).
CANCEL_CHECK_S = 0.05
# Seconds per image row of the last call of each batch key in this process (padding rows included).
_row_seconds: dict[str, float] = {}


def full_call_seconds(key: str, max_images: int) -> float:
    """How long a full call of batch key `key` takes, from its last call here; 0 before the first."""
    return _row_seconds.get(key, 0.0) * max_images


@dataclass(frozen=True)
class Member:
    """One claimed job in a batch: the attempt it was claimed as, and the request it runs."""

    job_id: str
    attempt: int
    request: dict[str, Any]

    @property
    def images(self) -> int:
        return int(self.request["num_images"])


def gather(
    claim_more: Callable[[int], int],
    *,
    images: int,
    max_images: int,
    window_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    looked: bool = False,
    stretch_s: float = 0.0,
) -> int:
    """Fill a batch that holds `images`: claim what is queued now, then look again until it is full or the
    window closes. `claim_more(room)` claims up to `room` images and returns how many it got. `looked`: the
    caller has just claimed what was queued, so the first look waits a poll interval.

    The window starts when gathering does. Each look that finds company opens it again, but never past
    `stretch_s` from the start: a burst still arriving fills the call, while a job that nothing joins is
    never held back longer than `window_s`. Once company has come, the window each arrival opens is a
    quarter of the stretch (if longer than `window_s`): a burst submitted over HTTP arrives in clumps
    with gaps longer than 10 ms between them (on an H200, a burst of 64 ran as 9 + 16 + 16 + 16 + 7,
    five calls padded to 16 where four would do). A batch that is full, or a window of 0, waits for
    nothing. Returns the images in the batch.
    """
    start = clock()
    quiet_at, give_up_at = start + window_s, start + max(window_s, stretch_s)
    while images < max_images:
        if looked:
            remaining = min(quiet_at, give_up_at) - clock()
            if remaining <= 0:
                break
            sleep(min(GATHER_POLL_S, remaining))
        got = claim_more(max_images - images)
        if got:
            quiet_at = clock() + max(window_s, stretch_s / 4)
        images += got
        looked = True
    return images


class StepHook:
    """Called after every denoising step: drops canceled or lost jobs, records progress at a bounded rate.

    Raises StopGeneration once no job of the call is left. `dropped` is shared with the heartbeat, which
    adds jobs whose lease it could no longer renew. `near_end` is called at a call's last step, before its
    decode (the worker claims its next batch then).

    With a `writer` (a submit of worker/sidecar.py), progress is written beside the call, not in it: the
    step goes on at once, and a job the write found no longer ours is dropped at the first step after the
    write returns (and at the latest by `settle`, when the call ends). In the call, each write was a
    transaction and a Redis round trip that the pipeline waited for, and at the last step it raced the
    next batch's claim for the GIL (3.5 ms alone on the 2-core VM, up to 15 ms with the claim beside it).
    """

    def __init__(
        self,
        members: list[Member],
        interval: float,
        dropped: set[str] | None = None,
        *,
        preview_every: int = 0,
        near_end: Callable[[], None] | None = None,
        writer: Callable[[Callable[[], set[str] | None]], Later] | None = None,
    ):
        self.members = members
        self.near_end = near_end
        self.writer = writer
        # Writes submitted to `writer` and not yet looked at, in order, with the jobs each one wrote.
        self.writes: list[tuple[list[Member], Later]] = []
        self.interval = interval
        self.dropped = dropped if dropped is not None else set()
        # The claim that set the jobs running counts as their first write: a call shorter than the interval
        # writes its progress once, at its last step, not also at its first.
        self.last_write = time.monotonic()
        self.last_cancel_check = -CANCEL_CHECK_S  # the first step looks
        self.preview_every = preview_every
        self.latents: tuple[int, torch.Tensor, Factors] | None = None
        self.last_preview = 0

    def only(self, members: list[Member]) -> StepHook:
        """The same hook over a subset of the jobs (one call per job), sharing what was dropped."""
        hook = StepHook(
            members,
            self.interval,
            self.dropped,
            preview_every=self.preview_every,
            near_end=self.near_end,
            writer=self.writer,
        )
        hook.writes = self.writes  # one call's writes are settled by whichever view of it ends the call
        return hook

    def see_latents(self, step: int, latents: torch.Tensor, factors: Factors) -> None:
        # Only a reference: a preview is drawn when progress is next written, not at every step.
        self.latents = (step, latents, factors)

    def previews(self, step: int, total: int, live: list[Member]) -> dict[str, str]:
        """A preview of each live job's first image, at most one per `preview_every` steps (none at the end,
        where the finished image follows)."""
        if not self.preview_every or self.latents is None or self.latents[0] != step or step >= total:
            return {}
        if step - self.last_preview < self.preview_every:
            return {}
        self.last_preview = step
        _step, latents, factors = self.latents
        first_row, row = {}, 0
        for member in self.members:
            first_row[member.job_id] = row
            row += member.images
        return {m.job_id: preview_uri(latents[first_row[m.job_id]], factors) for m in live}

    def live(self) -> list[Member]:
        return [m for m in self.members if m.job_id not in self.dropped]

    def drop_canceled(self) -> None:
        live = self.live()
        for member, canceled in zip(live, broker.cancels_requested([m.job_id for m in live]), strict=True):
            if canceled:
                log.info("job %s canceled; its images are dropped", member.job_id)
                self.dropped.add(member.job_id)

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last_cancel_check >= CANCEL_CHECK_S:
            self.last_cancel_check = now
            self.drop_canceled()
        if status.stop_requested():
            raise StopGeneration("worker shutting down")
        self._look_at_writes(wait=False)
        live = self.live()
        if live and (step == total or now - self.last_write >= self.interval):
            self.last_write = now
            # Drawn here, while these latents are the step's: the pipeline overwrites them at the next step.
            previews = self.previews(step, total, live)
            write = partial(write_progress, {m.job_id: m.attempt for m in live}, step, total, previews)
            if self.writer is None:
                self._drop_lost(live, write())
            else:
                self.writes.append((live, self.writer(write)))
        # After the write: on the same thread, the claim would otherwise hold the last step's write back.
        if step == total and self.near_end is not None:
            self.near_end()
        if not self.live():
            raise StopGeneration("every job of this call was canceled or taken over")

    def settle(self) -> None:
        """Wait for this call's progress writes, dropping the jobs they found no longer ours."""
        self._look_at_writes(wait=True)

    def abandon(self) -> None:
        """Stop listening for the writes not settled: a call that ended in an error or StopGeneration has
        no use for what they found, and the sidecar would otherwise keep their replies for good."""
        for _live, write in self.writes:
            write.cancel()
        self.writes.clear()

    def _look_at_writes(self, *, wait: bool) -> None:
        while self.writes and (wait or self.writes[0][1].done()):
            live, write = self.writes.pop(0)
            self._drop_lost(live, write.result())

    def _drop_lost(self, live: list[Member], ours: set[str] | None) -> None:
        if ours is None:
            return  # not written: nothing learnt
        for member in live:
            if member.job_id not in ours and member.job_id not in self.dropped:
                log.info("job %s is no longer running on this worker", member.job_id)
                self.dropped.add(member.job_id)


@dataclass
class BatchResult:
    images: dict[str, list[Image.Image]] = field(default_factory=dict)  # jobs still wanted at the end
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # job id -> (error code, message)
    timed_out: str | None = None  # the job whose own call ran into the task's soft time limit
    unrun: list[Member] = field(default_factory=list)  # jobs the time limit left no time for


def run_batch(pipe: Any, members: list[Member], hook: StepHook, settings: Settings) -> BatchResult:
    """Run the batch. Jobs dropped on the way appear in neither `images` nor `failed`.

    One call for the whole batch when the pipeline can take it; otherwise, or if that call fails, one call
    per job, so that one job's bad input cannot fail its neighbours. A batched call that runs out of memory
    is retried at half the batch (see `_run_together`). Raises StopGeneration when every job was dropped
    before any image was made.
    """
    result = BatchResult()
    # A test fault armed by one job must fire in that job's call alone, so such batches run job by job.
    armed = any(faults.requested(m.request) for m in members)
    # Image tasks (img2img, inpaint, upscale) bring their own input images: always one call per job.
    text_only = members[0].request.get("task", "txt2img") == "txt2img"
    if len(members) > 1 and text_only and isinstance(pipe, BATCHABLE) and not armed:
        _run_together(pipe, members, hook, settings, result)
    else:
        _run_each(pipe, members, hook, settings, result)
    if not result.images and not result.failed and result.timed_out is None:
        raise StopGeneration("every job of this batch was canceled or taken over")
    return result


def _run_together(pipe: Any, members: list[Member], hook: StepHook, settings: Settings, result: BatchResult) -> None:
    """One call for `members`. Out of memory, each half gets its own call, halving again down to single
    jobs: the batch, not any one job, was too big, and every image is the same whatever shares its call."""
    try:
        result.images.update(_keep_live(hook, members, _call(pipe, members, hook.only(members), settings)))
        return
    except (StopGeneration, SoftTimeLimitExceeded):
        raise
    except torch.OutOfMemoryError:
        # What the failed call allocated must be free before the smaller calls try.
        failures.free_accelerator_memory()
        live = [m for m in members if m.job_id not in hook.dropped]
        log.warning("batched call of %d jobs ran out of memory; retrying at half the batch", len(live))
        half = (len(live) + 1) // 2
        for part in (live[:half], live[half:]):
            try:
                if len(part) > 1:
                    _run_together(pipe, part, hook, settings, result)
                else:
                    _run_each(pipe, part, hook, settings, result)
            except StopGeneration:
                continue  # every job of this half was canceled or taken over; the other half goes on
    except Exception:
        log.warning("batched call of %d jobs failed; running them one by one", len(members), exc_info=True)
        _run_each(pipe, members, hook, settings, result)


def _run_each(pipe: Any, members: list[Member], hook: StepHook, settings: Settings, result: BatchResult) -> None:
    """One call per job; a job that fails (out of memory included) fails alone."""
    for index, member in enumerate(members):
        if member.job_id in hook.dropped:
            continue
        try:
            call = _call(faults.wrap(pipe, member.request), [member], hook.only([member]), settings)
            result.images.update(_keep_live(hook, [member], call))
        except StopGeneration:
            continue
        except SoftTimeLimitExceeded:
            # Only this job overran; the ones after it never started and go back to the queue.
            result.timed_out = member.job_id
            result.unrun = [m for m in members[index + 1 :] if m.job_id not in hook.dropped]
            break
        except Exception as exc:
            log.exception("job %s: generation failed", member.job_id)
            result.failed[member.job_id] = failures.describe(exc)


def _call(pipe: Any, members: list[Member], hook: StepHook, settings: Settings) -> list[list[Image.Image]]:
    # If the hard time limit kills this process mid-call, only these jobs are failed with `timeout`;
    # the batch's others still queued behind them are taken back by lease expiry.
    failures.remember_running(members, settings)
    first = members[0].request
    images = sum(m.images for m in members)
    width, height, guidance, pad_to = int(first["width"]), int(first["height"]), float(first["guidance_scale"]), 0
    # Padding is for compiled shapes, and a shape not warmed yet runs eagerly (worker/acceleration.py).
    if settings.compile and not is_upscaler(pipe):  # upscalers are not compiled
        bucket = bucket_for(images, width, height, parse_shapes(settings.compile_shapes))
        pad_to = bucket if compiled_at(pipe, width, height, bucket, guidance) else 0
    # Only a call of its own carries a job's input images (run_batch never batches image tasks).
    inputs = load_inputs(first) if len(members) == 1 else None
    started = time.monotonic()
    with stance(pipe, width, height, max(images, pad_to), guidance):
        images_out = generate_batch(
            pipe,
            [m.request for m in members],
            hook,
            pad_to=pad_to,
            tiling_pixels=settings.vae_tiling_pixels,
            inputs=inputs,
            on_latents=hook.see_latents if hook.preview_every else None,
        )
    took = time.monotonic() - started
    _row_seconds[batch_key(first)] = took / max(images, pad_to)
    log.info("call of %d images (padded to %d) took %.0f ms", images, max(images, pad_to), took * 1000)
    return images_out


def _keep_live(hook: StepHook, members: list[Member], images: list[list[Image.Image]]) -> dict[str, list[Image.Image]]:
    # A cancel that arrived during the final decode still counts: nothing is uploaded for it. So does a job
    # that the last progress write (beside the decode) found canceled or taken over.
    hook.settle()
    hook.drop_canceled()
    return {m.job_id: imgs for m, imgs in zip(members, images, strict=True) if m.job_id not in hook.dropped}
