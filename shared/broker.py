"""The queue: the Celery app both sides share, queue names, publishing, and the per-job flags in Redis.

The API publishes by task name and never imports the worker; the worker registers the tasks on this
same app. Redis also carries two small flags per job: "published" (to spot messages that Redis lost)
and "cancel" (checked by the worker at every denoising step).
"""

from __future__ import annotations

import base64
import json
import socket
import uuid
from functools import lru_cache
from typing import Any

import redis
from celery import Celery

from shared.settings import Settings, get_settings

TASK_RUN_JOB = "jobs.run"
# Long enough that a deep queue is not republished needlessly; a republished duplicate is harmless
# anyway, because a job only runs if its conditional claim (queued -> running) succeeds.
PUBLISHED_MARKER_TTL = 6 * 3600


def queue_for_model(model: str) -> str:
    """One queue per model, so a worker only takes jobs for models it serves."""
    return f"model.{model}"


def make_celery(settings: Settings) -> Celery:
    app = Celery("darkroom", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # A GPU job is long and precious: ack only once it is done, put it back if the worker dies,
        # and never let one worker hoard messages another idle worker could run.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_hard_time_limit,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "global_keyprefix": settings.redis_prefix,
        },
        broker_connection_retry_on_startup=True,
        # The API publishes after its commit; when Redis is down it must answer quickly and leave the job
        # to the reconciler rather than hold the request in long publish retries.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue=queue_for_model(settings.default_model),
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


@lru_cache
def get_redis() -> redis.Redis:
    settings = get_settings()
    return redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)


def _key(kind: str, job_id: str) -> str:
    return f"{get_settings().redis_prefix}{kind}:{job_id}"


def publish_job(job_id: str, queue: str) -> None:
    """Send the run message. Call only after the job row is committed."""
    pipe = get_redis().pipeline(transaction=False)
    publish_in(pipe, job_id, queue)
    pipe.execute()


def publish_in(pipe: Any, job_id: str, queue: str) -> None:
    """`publish_job` as commands in the caller's pipeline (sync or asyncio): the message, and the marker that
    it was sent."""
    settings = get_settings()
    pipe.lpush(queue_key(queue, settings), run_message(job_id, queue, settings))
    pipe.set(published_key(job_id), 1, ex=PUBLISHED_MARKER_TTL)


def queue_key(queue: str, settings: Settings) -> str:
    """The Redis list kombu's Redis transport keeps `queue` in."""
    return f"{settings.redis_prefix}{queue}"


def published_key(job_id: str) -> str:
    """Set once the job's run message was sent: the reconciler republishes a queued job without it."""
    return _key("published", job_id)


_ORIGIN = f"darkroom@{socket.gethostname()}"
_EMBED = json.dumps({"callbacks": None, "errbacks": None, "chain": None, "chord": None})


def run_message(job_id: str, queue: str, settings: Settings) -> bytes:
    """The Celery message (protocol 2) of `jobs.run(job_id)`, as kombu's Redis transport stores it in `queue`.

    Written here rather than by `send_task`: building and sending it through Celery and kombu took about
    0.6 ms of CPU per job on the API's hot path (bench.api), and a round trip of its own. The worker's Celery
    reads it as one of its own; every end-to-end test runs jobs through it.
    """
    task_id = str(uuid.uuid4())
    body = f"[{json.dumps([job_id])}, {{}}, {_EMBED}]"
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_RUN_JOB,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [settings.job_hard_time_limit, settings.job_soft_time_limit],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr([job_id]),
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()


def is_published(job_ids: list[str]) -> list[bool]:
    if not job_ids:
        return []
    values = get_redis().mget([published_key(j) for j in job_ids])
    return [v is not None for v in values]


def request_cancel(job_id: str) -> None:
    get_redis().set(_key("cancel", job_id), 1, ex=24 * 3600)


def cancel_requested(job_id: str) -> bool:
    # Redis down must not fail a running job: a cancel is also seen through the database, at the job's
    # next progress write, so "not requested" is a safe answer here.
    try:
        return bool(get_redis().exists(_key("cancel", job_id)))
    except redis.RedisError:
        return False


def queue_length(queue: str) -> int:
    """Messages waiting in a queue's Redis list (what Celery has not handed to a worker yet)."""
    return int(get_redis().llen(queue_key(queue, get_settings())))


def cancels_requested(job_ids: list[str]) -> list[bool]:
    """`cancel_requested` for a whole batch in one round trip."""
    if not job_ids:
        return []
    try:
        return [v is not None for v in get_redis().mget([_key("cancel", j) for j in job_ids])]
    except redis.RedisError:
        return [False] * len(job_ids)  # as in cancel_requested: the database still carries the cancel


def lock(name: str, timeout: float) -> redis.lock.Lock:
    return get_redis().lock(f"{get_settings().redis_prefix}lock:{name}", timeout=timeout, blocking=False)
