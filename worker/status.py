"""What a worker process tells the rest of the cluster: a status report in Redis, job metrics, and whether
it has been asked to stop.

Each pool process (the one that holds the models and runs jobs) reports its id, heartbeat time, loaded
models, current job, counters and GPU memory every DARKROOM_WORKER_STATUS_INTERVAL seconds, with a TTL of
three intervals (shared.workers). When a job ends it records the job's durations and images in the
cluster metrics (shared.metrics), read back from the database so they are the stored truth.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy import select

from shared import metrics, workers
from shared.db import session_scope
from shared.settings import get_settings
from shared.tables import Job

log = logging.getLogger("darkroom.worker")


class _State:
    def __init__(self) -> None:
        self.started = time.time()
        self.current_job: str | None = None
        self.outcomes: Counter[str] = Counter()
        # Counted by the generating thread (a task's error) and by the store thread (a batch's outcomes).
        self.counting = threading.Lock()
        self.stop_requested = threading.Event()


state = _State()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def loaded_models() -> list[str]:
    from worker import tasks

    return tasks.loaded_models()


def snapshot() -> dict[str, Any]:
    report: dict[str, Any] = {
        "id": worker_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "heartbeat": time.time(),
        "started": state.started,
        "loaded_models": loaded_models(),
        "current_job": state.current_job,
        "jobs": dict(state.outcomes),
        "stopping": state.stop_requested.is_set(),
    }
    import torch  # here, not at the top: Celery's main process imports this module (worker/job_task.py)

    if torch.cuda.is_available():
        report["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated()
        report["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved()
        report["gpu_memory_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return report


def _report_forever() -> None:
    interval = get_settings().worker_status_interval
    while True:
        try:
            workers.report(worker_id(), snapshot(), ttl=interval * 3)
        except Exception as exc:  # Redis down: the report simply lapses until it is back
            log.debug("worker status not reported: %s", type(exc).__name__)
        time.sleep(interval)


def start_reporting() -> None:
    threading.Thread(target=_report_forever, name="darkroom-status", daemon=True).start()


def job_started(job_id: str) -> None:
    state.current_job = job_id
    install_stop_handler()


def job_ended(job_id: str, outcome: str | None) -> None:
    state.current_job = None
    if outcome is None:
        with state.counting:
            state.outcomes["error"] += 1


def count_outcomes(outcomes: dict[str, str]) -> None:
    """Count each job a task ran (a batch runs several), for this worker's status report."""
    with state.counting:
        state.outcomes.update(outcomes.values())


def record_metrics(job_ids: list[str]) -> None:
    """Record the cluster metrics of jobs that ended, read back from the database (never raises)."""
    if job_ids:
        try:
            _record_metrics(job_ids)
        except Exception as exc:
            log.debug("metrics of jobs %s not recorded: %s", ", ".join(job_ids), type(exc).__name__)


def _record_metrics(job_ids: list[str]) -> None:
    # One read and one Redis round trip for the whole batch: per job, they were the last thing standing
    # between a finished batch and the worker taking its next message.
    with session_scope() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids))).all()
    _record_metrics_of(list(jobs))


def record_metrics_of(jobs: list[Job]) -> None:
    """`record_metrics` for jobs at hand as they ended (the RETURNING of the UPDATE that ended them): no
    read back. Never raises."""
    try:
        _record_metrics_of(jobs)
    except Exception as exc:
        log.debug("metrics of %d jobs not recorded: %s", len(jobs), type(exc).__name__)


def _record_metrics_of(jobs: list[Job]) -> None:
    observations: list[tuple[str, dict[str, str], float]] = []
    counts: list[tuple[str, dict[str, str], float]] = []
    for job in jobs:
        if job.started_at is None or job.finished_at is None:
            continue
        model = {"model": job.model}
        observations.append(("job_queued_seconds", model, (job.started_at - job.created_at).total_seconds()))
        running = (job.finished_at - job.started_at).total_seconds()
        observations.append(("job_running_seconds", {**model, "status": job.status}, running))
        if job.outputs:
            counts.append(("images_total", model, len(job.outputs)))
    metrics.record(observations, counts)


def stop_requested() -> bool:
    return state.stop_requested.is_set()


def install_stop_handler() -> None:
    """SIGTERM in a pool process: hand the current job back (see tasks.StepHook) instead of dying mid-job.

    Installed when a job starts, not at process start: billiard sets its own SIGTERM handler after the
    process initialiser has run. An idle process still ends the way billiard intended (its handler, kept
    as `previous`), since the pool also uses SIGTERM to retire processes.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "darkroom", False):
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if state.current_job is None:
            if callable(previous):
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("SIGTERM: handing job %s back at its next step", state.current_job)
        state.stop_requested.set()

    on_sigterm.darkroom = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)
