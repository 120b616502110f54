"""Per-tenant limits hit from two API processes at once, and the running cap kept by real workers.

Two `darkroom api` processes share the port, so concurrent requests land on both; a worker with two
processes serves only `tiny-sd`, so `tiny-sd2` jobs stay queued for the tests that need a queue to fill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from client import AsyncClient, Client, DarkroomAPIError
from tests.e2e.conftest import Service, running_service
from tests.e2e.test_integration import TwoApiService
from tests.support import Process, wait_for

pytestmark = pytest.mark.e2e

TENANTS = """
[tenants.chatty]
rate_per_minute = 5

[tenants.bursty]
max_queued = 3

[tenants.thrifty]
images_per_period = 10
quota_period = "day"

[tenants.capped]
max_running = 1
max_priority = "normal"
"""


class LimitsService(TwoApiService):
    def start_worker(self) -> Process:
        # Two worker processes, so that only the running cap, not the worker count, keeps `capped` to one.
        args = ["worker", "--queues", "model.tiny-sd", "--concurrency", "2", "--log-level", "info"]
        self.worker = Process(args, self.env, self.logs / "worker.log")
        wait_for(lambda: "ready." in self.worker.output() or not self.worker.alive(), timeout=90, what="worker ready")
        assert self.worker.alive(), self.worker.output()[-3000:]
        return self.worker


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("e2e-limits")
    (data / "tenants.toml").write_text(TENANTS)
    settings = {"DARKROOM_TENANT_POLICY_FILE": str(data / "tenants.toml")}
    with running_service(data, models_dir, env=settings, kind=LimitsService) as service:
        yield service


def at_once(count: int, call: object) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(call, range(count)))  # type: ignore[arg-type]


def usage(svc: Service, auth: dict[str, str]) -> dict[str, dict[str, object]]:
    response = httpx.get(f"{svc.url}/v1/usage", headers=auth, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json()["limits"])


def refusals(answers: list[httpx.Response], code: str) -> int:
    refused = [r for r in answers if r.status_code == 429]
    assert all(r.json()["error"]["code"] == code and int(r.headers["Retry-After"]) >= 1 for r in refused)
    return len(refused)


def test_a_rate_of_five_admits_exactly_five_of_fifteen_concurrent_requests(svc: Service) -> None:
    auth = svc.key("chatty")
    answers = at_once(15, lambda _: httpx.get(f"{svc.url}/v1/jobs", headers=auth, timeout=60))
    assert sorted(r.status_code for r in answers) == [200] * 5 + [429] * 10
    assert refusals(answers, "rate_limited") == 10
    requests = usage(svc, auth)["requests"]
    assert (requests["limit"], requests["used"], requests["remaining"]) == (5, 5, 0)


def test_max_queued_holds_across_processes(svc: Service) -> None:
    auth = svc.key("bursty")

    def submit(i: int) -> httpx.Response:
        body = {"prompt": f"queued {i}", "model": "tiny-sd2", "steps": 1}
        return httpx.post(f"{svc.url}/v1/jobs", json=body, headers=auth, timeout=60)

    answers = at_once(12, submit)
    assert [r.status_code for r in answers].count(202) == 3
    assert refusals(answers, "too_many_queued_jobs") == 9
    queued = usage(svc, auth)["queued_jobs"]
    assert (queued["limit"], queued["used"], queued["remaining"]) == (3, 3, 0)


def test_the_images_quota_holds_across_processes_and_the_clients_see_it(svc: Service) -> None:
    auth = svc.key("thrifty")

    def submit(i: int) -> httpx.Response:
        body = {"prompt": f"two images {i}", "model": "tiny-sd2", "steps": 1, "num_images": 2}
        return httpx.post(f"{svc.url}/v1/jobs", json=body, headers=auth, timeout=60)

    answers = at_once(8, submit)
    assert [r.status_code for r in answers].count(202) == 5  # 10 images
    assert refusals(answers, "images_quota_exceeded") == 3
    key = auth["Authorization"].removeprefix("Bearer ")
    with Client(svc.url, key) as client:
        assert client.usage()["limits"]["images"]["used"] == 10
        # The quota resets tomorrow: the client raises at once instead of sleeping through its retries.
        with pytest.raises(DarkroomAPIError) as refused:
            client.submit("one more", model="tiny-sd2", steps=1)
        assert (refused.value.status_code, refused.value.code) == (429, "images_quota_exceeded")

    async def async_usage() -> int | None:
        async with AsyncClient(svc.url, key) as client:
            return (await client.usage())["limits"]["images"]["remaining"]

    assert asyncio.run(async_usage()) == 0


def test_the_scheduler_runs_a_capped_tenant_one_job_at_a_time(svc: Service) -> None:
    auth = svc.key("capped")
    jobs = [svc.submit(auth, prompt=f"capped {i}", steps=4, seed=i) for i in range(4)]
    done = [svc.wait(auth, job["id"], timeout=180) for job in jobs]
    assert [job["status"] for job in done] == ["succeeded"] * 4
    # Two worker processes were free the whole time, yet no two of these jobs ever ran at once.
    spans = sorted((datetime.fromisoformat(j["started_at"]), datetime.fromisoformat(j["finished_at"])) for j in done)
    assert all(later[0] >= earlier[1] for earlier, later in pairwise(spans))
    refused = httpx.post(f"{svc.url}/v1/jobs", json={"prompt": "rush", "priority": "high"}, headers=auth, timeout=30)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "priority_not_allowed"
