"""The worker's Celery app: the shared app with the tasks registered and the process hooks installed."""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import time
from typing import Any

from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from shared import broker, db, logs, reconciler
from shared.broker import TASK_RUN_JOB
from shared.settings import get_settings
from worker import failures, job_task, status, webhooks
from worker.acceleration import configure_compile_cache

app = broker.get_celery()
# Nothing here imports torch: see worker/job_task.py.
job_task.register(app)
# A pool process imports the pipeline code before it takes a job (seconds; 15 on a GPU host), which
# Celery's default of 4 s for a new pool process to come up would cut short by killing it.
app.conf.worker_proc_alive_timeout = 300
webhooks.register(app)
_stop_reconciler = None
log = logging.getLogger("darkroom.worker")


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must not share the parent's database or Redis sockets.
    db.reset_connections()
    # The encoder processes (worker/store.py) are started from here with multiprocessing, whose idea of the
    # current process billiard replaced with its own, in a state multiprocessing refuses: daemonic (it would
    # not wait for children at exit; encoders need no wait, they hold no state and exit with this process),
    # and with billiard's authkey type, which multiprocessing's spawn cannot pickle. Both reset.
    current = multiprocessing.current_process()
    current._config["daemon"] = False  # type: ignore[attr-defined]
    current._config["authkey"] = multiprocessing.process.AuthenticationString(os.urandom(32))  # type: ignore[attr-defined]
    broker.get_redis.cache_clear()
    # Before anything imports torch's inductor, so compiled shapes come from (and go to) the lasting cache.
    settings = get_settings()
    configure_compile_cache(settings)
    if settings.torch_threads:  # here: OpenMP's thread count belongs to the thread that sets it, this one
        import torch

        torch.set_num_threads(settings.torch_threads)
    logs.worker.set(status.worker_id())
    status.start_reporting()
    # The pipeline code (torch, diffusers) loads before this process takes its first job, so that a job's
    # time limits never count the import: after a hard-limit kill, the replacement process pays it again.
    start = time.monotonic()
    from worker import sidecar, store  # here, not at the top: the main process has no use for PIL and numpy

    store.start()  # the encoder processes and the sidecar start beside the import below
    sidecar.start()
    importlib.import_module("worker.tasks")
    log.info("pipeline code loaded in %.1f s", time.monotonic() - start)


@worker_ready.connect
def _start_reconciler(**_: object) -> None:
    global _stop_reconciler
    _stop_reconciler = reconciler.start_thread()
    log.info("reconciler started")


@worker_shutdown.connect
def _stop(**_: object) -> None:
    if _stop_reconciler is not None:
        _stop_reconciler.set()


def _job_id(sender: Any, args: Any) -> str | None:
    return str(args[0]) if getattr(sender, "name", None) == TASK_RUN_JOB and args else None


@task_prerun.connect
def _job_started(sender: Any = None, args: Any = None, **_: object) -> None:
    if job_id := _job_id(sender, args):
        logs.job_id.set(job_id)
        status.job_started(job_id)


@task_postrun.connect
def _job_ended(sender: Any = None, args: Any = None, retval: Any = None, **_: object) -> None:
    if job_id := _job_id(sender, args):
        status.job_ended(job_id, retval if isinstance(retval, str) else None)
        logs.job_id.set(None)


@task_failure.connect
def _hard_time_limit(
    sender: Any = None, task_id: str | None = None, exception: Any = None, args: Any = None, **_: object
) -> None:
    # Sent in the main process when Celery killed the pool process that overran the hard limit: nothing
    # ran the jobs' own failure path, so they are failed here rather than retried as a crash.
    if _job_id(sender, args) and task_id and isinstance(exception, TimeLimitExceeded):
        try:
            failures.fail_after_hard_time_limit(task_id, get_settings().job_hard_time_limit)
        except Exception:
            log.exception("could not fail the jobs of task %s after their hard time limit", task_id)
