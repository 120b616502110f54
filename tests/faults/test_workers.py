"""Worker faults: killed mid-job, a poison job that kills its worker, SIGTERM, time limits, GPU OOM."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import pytest

from tests.faults.conftest import Cluster, check_invariants, report
from tests.support import Process, wait_for

pytestmark = pytest.mark.faults

# Slow enough on a CPU (a few seconds) to be caught mid-run; quick jobs take well under a second.
SLOW = {"width": 256, "height": 256, "steps": 25}
QUICK = {"steps": 2}


def start_workers(cluster: Cluster, n: int) -> list[Process]:
    workers = [cluster.start_worker(wait=False) for _ in range(n)]
    for worker in workers:
        wait_for(lambda w=worker: "ready." in w.output() or not w.alive(), timeout=120, what="worker ready")
        assert worker.alive(), worker.output()[-3000:]
    return workers


def runner_of(cluster: Cluster, job_id: str) -> Process:
    return wait_for(
        lambda: next((w for w in cluster.workers if f"job {job_id} started" in w.output()), None),
        timeout=30,
        what=f"worker running {job_id}",
    )


def test_a_worker_killed_mid_job_is_taken_over(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster()
    start_workers(cluster, 2)
    slow = cluster.submit(**SLOW)
    cluster.wait(slow, until=("running",), timeout=60)
    victim = runner_of(cluster, slow)

    killed_at = time.monotonic()
    victim.kill()  # kill -9 of the whole worker (main and pool process): no cleanup, no heartbeat
    wait_for(lambda: cluster.rows()[slow]["attempts"] == 2, timeout=60, interval=0.1, what="job taken over")
    recovery = time.monotonic() - killed_at
    for _ in range(4):
        cluster.submit(**QUICK)
    done = cluster.wait_all()

    lease = float(cluster.env["DARKROOM_LEASE_SECONDS"])
    # The lease runs out at most one lease after the last heartbeat; then one reconciler pass requeues
    # the job and the idle worker claims it. The slack absorbs a loaded 2-core machine.
    bound = 2 * lease + float(cluster.env["DARKROOM_RECONCILE_INTERVAL"]) * 2 + 15
    assert recovery <= bound, f"took {recovery:.1f} s to take the job over (bound {bound} s)"
    assert all(job["status"] == "succeeded" for job in done.values()), done
    counts = check_invariants(cluster)
    report("worker kill -9 mid-job", {**counts, "recovery_s": round(recovery, 2), "lease_seconds": lease})


def test_a_poison_job_fails_as_worker_crashed_and_others_keep_flowing(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(DARKROOM_MAX_ATTEMPTS="2")
    start_workers(cluster, 1)
    started = time.monotonic()
    poison = cluster.submit("fault:crash", **QUICK)
    others = [cluster.submit(**QUICK) for _ in range(5)]
    done = cluster.wait_all(timeout=120)
    elapsed = time.monotonic() - started

    assert done[poison]["status"] == "failed"
    assert done[poison]["error"]["code"] == "worker_crashed"
    assert cluster.rows()[poison]["attempts"] == 2
    assert all(done[j]["status"] == "succeeded" for j in others), done
    assert cluster.workers[0].alive(), "the worker's main process must survive its pool process dying"
    counts = check_invariants(cluster)
    report("poison job (kills its worker every time)", {**counts, "attempts": 2, "time_to_failed_s": round(elapsed, 2)})


def test_sigterm_hands_back_or_finishes_the_current_job(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster()
    first, _ = start_workers(cluster, 2)
    # 1. SIGTERM to the worker's main process only (what `docker stop` does): the job is finished first.
    job = cluster.submit(**SLOW)
    cluster.wait(job, until=("running",), timeout=60)
    victim = runner_of(cluster, job)
    os.kill(victim.proc.pid, signal.SIGTERM)
    victim.proc.wait(timeout=60)
    finished = cluster.wait(job)
    assert finished["status"] == "succeeded", finished
    assert cluster.rows()[job]["attempts"] == 1

    # 2. SIGTERM to the whole process group (Ctrl-C in a terminal, systemd's default): the pool process
    # hands the job back mid-run, and the other worker runs it from the start.
    survivor = next(w for w in cluster.workers if w is not victim)
    cluster.start_worker()
    job2 = cluster.submit(**SLOW)
    cluster.wait(job2, until=("running",), timeout=60)
    victim2 = runner_of(cluster, job2)
    stopped_at = time.monotonic()
    victim2.stop(signal.SIGTERM, timeout=60)
    assert f"job {job2} handed back" in victim2.output()
    done = cluster.wait(job2)
    recovery = time.monotonic() - stopped_at
    assert done["status"] == "succeeded", done
    assert cluster.rows()[job2]["attempts"] == 1, "a hand-back is not counted as an attempt"
    counts = check_invariants(cluster)
    report("worker SIGTERM (finish, then hand back)", {**counts, "hand_back_to_success_s": round(recovery, 2)})
    assert survivor is not None and first is not None


def test_time_limits_fail_the_job_with_timeout_and_the_worker_keeps_serving(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(DARKROOM_JOB_SOFT_TIME_LIMIT="8", DARKROOM_JOB_HARD_TIME_LIMIT="12")
    # Limits above a cold pool process's first model load (seconds on a busy 2-core machine), which the
    # job after the hard kill pays again in the replacement process.
    start_workers(cluster, 1)
    soft = cluster.submit("fault:hang", **QUICK)
    hard = cluster.submit("fault:hang_hard", **QUICK)
    after = cluster.submit(**QUICK)
    done = cluster.wait_all(timeout=90)
    assert (done[soft]["status"], done[soft]["error"]["code"]) == ("failed", "timeout"), done[soft]
    assert (done[hard]["status"], done[hard]["error"]["code"]) == ("failed", "timeout"), done[hard]
    assert done[after]["status"] == "succeeded", done[after]
    assert cluster.workers[0].alive()
    counts = check_invariants(cluster)
    report("job past its soft / hard time limit", {**counts, "soft_limit_s": 8, "hard_limit_s": 12})


def test_gpu_out_of_memory_fails_the_job_and_the_worker_keeps_serving(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster()
    start_workers(cluster, 1)
    oom = cluster.submit("fault:oom", **QUICK)
    after = [cluster.submit(**QUICK) for _ in range(3)]
    done = cluster.wait_all(timeout=60)
    assert (done[oom]["status"], done[oom]["error"]["code"]) == ("failed", "out_of_memory"), done[oom]
    assert cluster.rows()[oom]["attempts"] == 1, "an OOM is the job's fault: not retried as a crash"
    assert all(done[j]["status"] == "succeeded" for j in after)
    counts = check_invariants(cluster)
    report("GPU out of memory (simulated)", counts)

    # The worker reports itself (status in Redis), and /metrics counts what it did.
    admin = cluster.make_key("ops", admin=True)
    # Reports are periodic (DARKROOM_WORKER_STATUS_INTERVAL): wait for one sent after the jobs ended.
    listed = wait_for(
        lambda: [
            w
            for w in httpx.get(f"{cluster.url}/v1/admin/workers", headers=admin, timeout=10).json()["data"]
            if w["jobs"].get("succeeded") == 3
        ],
        timeout=10,
        what="worker status report of the three jobs",
    )
    assert listed[0]["loaded_models"] == ["tiny-sd"]
    images = 'darkroom_images_total{model="tiny-sd"} 3.0'
    text = wait_for(
        lambda: images in (page := httpx.get(f"{cluster.url}/metrics", timeout=10).text) and page,
        timeout=10,
        what="the images metric",
    )
    assert 'darkroom_jobs_finished_total{code="out_of_memory",model="tiny-sd",status="failed"} 1.0' in text
