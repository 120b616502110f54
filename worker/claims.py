"""Claiming a batch: the best queued job of a queue and the compatible jobs queued with it, in one
transaction (the order is shared.scheduling's). Nothing here imports torch: the worker's sidecar
(worker/sidecar.py) claims the next batch while the current call runs.
"""

from __future__ import annotations

from typing import Any

from shared.db import retry_unit_of_work
from shared.scheduling import claim_jobs
from shared.settings import Settings, get_settings
from shared.tables import Job


def claim_next(queue: str, me: str) -> list[Job]:
    """The next batch of `queue` for worker `me`, retried through a database outage."""
    settings = get_settings()

    def claim(session: Any) -> list[Job]:
        return claim_batch(session, queue, settings, me)

    return retry_unit_of_work(claim, seconds=settings.db_retry_seconds, what="claim of a next batch")


def batchable(leader: Job, settings: Settings) -> bool:
    """Whether compatible jobs may join the leader's call."""
    # Image tasks (img2img, inpaint, upscale) run one call per job, so gathering them would only queue
    # them behind each other on this worker.
    # A job on its second attempt or later may be the one that crashed its last worker: it runs alone.
    return (
        bool(leader.batch_key)
        and leader.request.get("task", "txt2img") == "txt2img"
        and leader.attempts == 1
        and int(leader.request["num_images"]) < settings.max_batch_images
    )


def claim_batch(session: Any, queue: str, settings: Settings, me: str) -> list[Job]:
    """Claim the best queued job of `queue` and, in the same transaction, the compatible jobs queued now."""
    claimed = claim_jobs(session, queue, worker_id=me, lease_seconds=settings.lease_seconds)
    if claimed and batchable(claimed[0], settings):
        room = settings.max_batch_images - int(claimed[0].request["num_images"])
        claimed += claim_company(session, claimed[0], room, settings, me)
    return claimed


def claim_company(session: Any, leader: Job, room: int, settings: Settings, me: str) -> list[Job]:
    """Claim queued jobs that can share the leader's call, up to `room` images."""
    lease = settings.lease_seconds
    return claim_jobs(
        session, leader.queue, worker_id=me, lease_seconds=lease, max_jobs=room, max_images=room, key=leader.batch_key
    )
