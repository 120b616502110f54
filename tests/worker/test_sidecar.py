"""The sidecar process (worker/sidecar.py): calls run there, in order, answered when asked; a dead sidecar
loses no call; and a run of batches through it claims, writes progress and finishes its jobs."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared.db import session_scope
from shared.jobs import get_job
from tests.support import reset_caches
from tests.worker.test_batching import cancel_at_step, load, submit
from worker import batching, sidecar, store, tasks
from worker.progress import write_progress


@pytest.fixture
def helpers(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DARKROOM_ENCODE_PROCESSES", "1")
    reset_caches()
    yield
    sidecar.shutdown()
    store.shutdown()


def slow_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fails(message: str) -> None:
    raise ValueError(message)


def slow_write(*args: Any) -> set[str] | None:
    time.sleep(0.3)  # still on its way when the call stops
    return write_progress(*args)


def test_calls_run_in_the_sidecar_in_order_and_are_answered_when_asked(helpers: None) -> None:
    car = sidecar.get()
    assert car is not None and car.process.pid != os.getpid()
    slow = car.submit(slow_pid, 0.3)
    quick = car.submit(os.getpid)
    assert not slow.done()  # asking does not wait
    assert quick.result() == slow.result() == car.process.pid
    with pytest.raises(ValueError, match="no such thing"):
        car.submit(fails, "no such thing").result()
    assert sidecar.get() is car  # one per worker process


def test_without_helper_processes_the_work_beside_a_call_runs_on_a_thread(darkroom_env: dict[str, Any]) -> None:
    assert sidecar.get() is None
    with sidecar.beside() as beside:
        assert beside.submit(os.getpid).result() == os.getpid()


def test_a_dead_sidecars_calls_run_in_the_worker_and_a_new_one_starts(helpers: None) -> None:
    car = sidecar.get()
    assert car is not None
    car.submit(os.getpid).result()  # up
    os.kill(car.process.pid, signal.SIGKILL)
    car.process.join(5)
    unanswered = car.submit(os.getpid)
    assert unanswered.result() == os.getpid()  # run here instead
    again = sidecar.get()
    assert again is not None and again is not car
    assert again.submit(os.getpid).result() == again.process.pid


def test_batches_run_with_their_claims_and_progress_on_the_sidecar(helpers: None) -> None:
    # Two batches (two sizes): the second is claimed by the sidecar during the first call's last step, and
    # every step's progress is written there.
    first, second = submit(width=96), submit(width=128)
    assert tasks.run_job(first) == "succeeded"
    for job_id in (first, second):
        job = load(job_id)
        assert job.status == "succeeded" and job.attempts == 1
        assert job.progress_step == job.progress_total == 3
    with session_scope() as session:
        assert get_job(session, first).started_at < get_job(session, second).started_at


def test_a_call_stopped_by_a_cancel_leaves_no_reply_behind_on_the_sidecar(
    helpers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Progress written at every step, slowly: the writes of steps 1 and 2 are unanswered when the job,
    # canceled at step 3, stops the call. Nobody will read their replies, so the sidecar must not keep them.
    monkeypatch.setenv("DARKROOM_PROGRESS_INTERVAL", "0")
    reset_caches()
    monkeypatch.setattr(batching, "write_progress", slow_write)
    monkeypatch.setattr(batching, "CANCEL_CHECK_S", 0)
    job_id = submit(steps=8)
    cancel_at_step(monkeypatch, job_id, 3)
    assert tasks.run_job(job_id) == "stopped"
    assert load(job_id).status == "canceled"
    car = sidecar.get()
    assert car is not None
    time.sleep(0.8)  # both writes done there
    car.submit(os.getpid).result()  # reads every reply that came before this one
    assert car.unread == 0
