"""Service faults: Redis lost and restarted empty, PostgreSQL stopped under load, the S3 server stopped while
workers upload, and a burst of 10,000 submissions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.faults.conftest import Cluster, PrivatePostgres, PrivateRedis, PrivateS3, check_invariants, report
from tests.faults.test_workers import QUICK, SLOW, start_workers
from tests.support import wait_for

pytestmark = pytest.mark.faults


def test_redis_restarted_empty_loses_no_job(make_cluster: Any, private_redis: PrivateRedis) -> None:
    cluster: Cluster = make_cluster()
    start_workers(cluster, 1)
    running = cluster.submit(**SLOW)
    cluster.wait(running, until=("running",), timeout=60)
    queued = [cluster.submit(**QUICK) for _ in range(8)]

    private_redis.kill()  # every queued message, published marker and unacked delivery is gone
    down_at = time.monotonic()
    time.sleep(2)
    private_redis.start()  # empty: no persistence
    done = cluster.wait_all(timeout=120)
    recovery = time.monotonic() - down_at

    assert all(job["status"] == "succeeded" for job in done.values()), {j: d["status"] for j, d in done.items()}
    counts = check_invariants(cluster)
    report(
        "Redis killed and restarted empty",
        {**counts, "queued_at_kill": len(queued), "running_at_kill": 1, "all_done_after_s": round(recovery, 2)},
    )


def test_postgres_stopped_30s_under_load(make_cluster: Any, private_pg: PrivatePostgres) -> None:
    cluster: Cluster = make_cluster(DARKROOM_LEASE_SECONDS="6")
    start_workers(cluster, 1)
    before = [cluster.submit(**QUICK) for _ in range(4)]
    finishing = cluster.submit(width=256, height=256, steps=30)
    cluster.wait(finishing, until=("running",), timeout=60)

    private_pg.stop()
    stopped_at = time.monotonic()
    latencies, statuses, retry_after = [], [], set()
    while time.monotonic() - stopped_at < 30:
        started = time.monotonic()
        response = httpx.post(f"{cluster.url}/v1/jobs", json={"prompt": "during"}, headers=cluster.auth, timeout=30)
        latencies.append(time.monotonic() - started)
        statuses.append(response.status_code)
        if response.status_code == 202:
            cluster.accepted.append(response.json()["id"])
        retry_after.add(response.headers.get("retry-after"))
        time.sleep(0.5)
    private_pg.start()
    restarted_at = time.monotonic()

    assert set(statuses) <= {202, 503}, statuses
    assert statuses.count(503) >= len(statuses) - 1, statuses  # at most one raced the stop
    assert max(latencies) < 2 * int(cluster.env["DARKROOM_DB_CONNECT_TIMEOUT"]) + 3, latencies
    assert "5" in retry_after
    # Without restarting anything: the API answers again, and every accepted job ends, the one that
    # finished during the outage included (its worker held on to the result and retried the write).
    wait_for(
        lambda: httpx.get(f"{cluster.url}/v1/jobs", headers=cluster.auth, timeout=10).status_code == 200,
        timeout=30,
        what="API serving again",
    )
    api_back = time.monotonic() - restarted_at
    after = [cluster.submit(**QUICK) for _ in range(3)]
    done = cluster.wait_all(timeout=120)
    assert all(job["status"] == "succeeded" for job in done.values()), {j: d["status"] for j, d in done.items()}
    assert cluster.rows()[finishing]["attempts"] == 1, "the result held through the outage was kept, not redone"
    assert before and after
    counts = check_invariants(cluster)
    report(
        "PostgreSQL stopped 30 s under load",
        {
            **counts,
            "requests_during_outage": len(statuses),
            "answered_503": statuses.count(503),
            "max_latency_during_outage_s": round(max(latencies), 2),
            "api_serving_after_restart_s": round(api_back, 2),
        },
    )


def test_s3_stopped_during_uploads(make_cluster: Any, private_s3: PrivateS3) -> None:
    cluster: Cluster = make_cluster(DARKROOM_STORAGE_RETRY_SECONDS="10")
    start_workers(cluster, 1)
    cluster.wait(cluster.submit(**QUICK))  # warm: the model is loaded, uploads come seconds after a start

    # 1. Storage back within the retry budget: the upload is retried and the job succeeds.
    private_s3.stop()
    retried = cluster.submit(num_images=2, **QUICK)
    wait_for(lambda: "storage upload failed" in cluster.worker_logs(), timeout=30, what="an upload retry")
    time.sleep(3)
    private_s3.start()
    assert cluster.wait(retried)["status"] == "succeeded"

    # 2. Storage away for longer than the budget: the job fails, bounded in time, listing no outputs.
    private_s3.stop()
    stopped_at = time.monotonic()
    gave_up = cluster.submit(num_images=2, **QUICK)
    failed = cluster.wait(gave_up, timeout=60)
    waited = time.monotonic() - stopped_at
    private_s3.start()
    assert (failed["status"], failed["error"]["code"]) == ("failed", "storage_unavailable"), failed
    assert failed["outputs"] == []
    assert waited < 10 + 15, waited
    counts = check_invariants(cluster)
    report("S3 stopped during uploads", {**counts, "storage_retry_seconds": 10, "gave_up_after_s": round(waited, 2)})


def test_a_burst_of_10000_submissions(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster()
    total, in_flight = 10_000, 64
    outcomes: dict[int, int] = {}
    accepted: list[str] = []
    unanswered = 0

    async def burst() -> None:
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout, so the client never sends
        # on a connection the server is closing (that race surfaces as a ReadError, not as a refusal).
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=cluster.url, headers=cluster.auth, limits=limits, timeout=120) as client:
            gate = asyncio.Semaphore(in_flight)

            async def one(i: int) -> None:
                nonlocal unanswered
                async with gate:
                    try:
                        response = await client.post("/v1/jobs", json={"prompt": f"burst {i}", "steps": 1})
                    except httpx.TransportError:
                        # No answer: the job may or may not exist; counted apart, checked below.
                        unanswered += 1
                        return
                outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
                if response.status_code == 202:
                    accepted.append(response.json()["id"])

            await asyncio.gather(*(one(i) for i in range(total)))

    started = time.monotonic()
    asyncio.run(burst())
    elapsed = time.monotonic() - started

    assert set(outcomes) <= {202, 429, 503}, outcomes
    assert sum(outcomes.values()) + unanswered == total
    assert unanswered <= total // 1000, f"{unanswered} requests got no answer at all"
    rows = cluster.rows()
    assert set(accepted) <= set(rows), "a job answered 202 is missing from the database"
    # A refused request creates nothing; a request that got no answer created at most its one job.
    assert len(accepted) <= len(rows) <= len(accepted) + unanswered, (len(rows), len(accepted), unanswered)
    assert all(row["status"] == "queued" for row in rows.values())
    report(
        "burst of 10,000 submissions (64 in flight)",
        {
            "submitted": total,
            "accepted": outcomes.get(202, 0),
            "refused_429": outcomes.get(429, 0),
            "refused_503": outcomes.get(503, 0),
            "unanswered": unanswered,
            "in_db": len(rows),
            "lost": 0,
            "duplicated": 0,
            "half_created": 0,
            "seconds": round(elapsed, 1),
            "requests_per_second": round(total / elapsed, 1),
        },
    )
