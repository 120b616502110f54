"""The worker's Celery app: the shared app with the tasks registered and the process hooks installed."""

from __future__ import annotations

import logging

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from shared import broker, db, reconciler
from shared.settings import get_settings
from worker import tasks, webhooks
from worker.acceleration import configure_compile_cache

app = broker.get_celery()
tasks.register(app)
webhooks.register(app)
_stop_reconciler = None


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must not share the parent's database or Redis sockets.
    db.reset_connections()
    broker.get_redis.cache_clear()
    # Before anything imports torch's inductor, so compiled shapes come from (and go to) the lasting cache.
    settings = get_settings()
    configure_compile_cache(settings)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


@worker_ready.connect
def _start_reconciler(**_: object) -> None:
    global _stop_reconciler
    _stop_reconciler = reconciler.start_thread()
    logging.getLogger("darkroom.worker").info("reconciler started")


@worker_shutdown.connect
def _stop(**_: object) -> None:
    if _stop_reconciler is not None:
        _stop_reconciler.set()
