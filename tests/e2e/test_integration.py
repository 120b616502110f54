"""Integration features with real processes: two API processes and a worker on PostgreSQL, Redis and S3.

Idempotent submits under concurrency, SSE progress with resumption, Prefer: wait, webhooks from the
worker's `webhooks` queue to a real receiver, the Python clients and `darkroom submit --wait`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks import Webhook

from client import AsyncClient, Client, Event
from tests.e2e.conftest import Service, running_service
from tests.receiver import Receiver
from tests.support import (
    Process,
    run_cli,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e


class TwoApiService(Service):
    def start_api(self) -> None:
        # Two API processes: idempotency must hold across processes, not only across threads.
        args = ["api", "--port", str(self.port), "--workers", "2", "--log-level", "warning"]
        self.api = Process(args, self.env, self.logs / "api.log")
        wait_http(f"{self.url}/healthz", proc=self.api)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, s3_endpoint: str) -> Iterator[Service]:
    settings = {
        "DARKROOM_PROGRESS_INTERVAL": "0",
        "DARKROOM_WEBHOOK_ALLOW_PRIVATE": "true",
        "DARKROOM_WEBHOOK_BACKOFF_SCALE": "0.01",
        "DARKROOM_WEBHOOK_TIMEOUT": "2",
    }
    data = tmp_path_factory.mktemp("e2e-integration")
    with running_service(data, models_dir, s3_endpoint=s3_endpoint, env=settings, kind=TwoApiService) as service:
        yield service


def api_key(auth: dict[str, str]) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


def without_urls(job: dict[str, Any]) -> dict[str, Any]:
    # S3 presigned URLs carry their signing time, so two renderings of one output differ only there.
    return {**job, "outputs": [{k: v for k, v in o.items() if k != "url"} for o in job["outputs"]]}


def test_fifty_concurrent_identical_submits_create_exactly_one_job(svc: Service) -> None:
    auth = svc.key("idem")
    headers = {**auth, "Idempotency-Key": str(uuid.uuid4())}
    body = {"prompt": "once", "steps": 2}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{svc.url}/v1/jobs", json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(post, range(50)))
    assert {r.status_code for r in answers} <= {200, 202, 409}, [r.text for r in answers if r.status_code >= 400]
    assert [r.status_code for r in answers].count(202) == 1
    assert all(r.json()["error"]["code"] == "idempotency_key_in_flight" for r in answers if r.status_code == 409)
    ids = {r.json()["id"] for r in answers if r.status_code < 300}
    assert len(ids) == 1
    [job_id] = ids
    assert svc.wait(auth, job_id)["status"] == "succeeded"
    listed = httpx.get(f"{svc.url}/v1/jobs", headers=auth, timeout=30).json()["data"]
    assert [j["id"] for j in listed] == [job_id]
    replay = post(0)
    assert replay.status_code == 200 and replay.json()["id"] == job_id and replay.json()["status"] == "succeeded"


def test_sse_tells_the_whole_story_and_resumes_after_last_event_id(svc: Service) -> None:
    auth = svc.key("sse")
    with Client(svc.url, api_key(auth)) as client:
        job = client.submit("streamed", steps=4)
        events = list(client.events(job["id"]))
        types = [e.type for e in events]
        assert types[0] == "queued" and "queue_position" in events[0].data
        assert types[1] == "started" and types[-1] == "succeeded"
        steps = [e.data["step"] for e in events if e.type == "progress"]
        assert steps == sorted(steps) and steps[-1] == 4 and all(e.data["total"] == 4 for e in events[2:-1])
        final = events[-1].data
        assert final["status"] == "succeeded" and len(final["outputs"]) == 1
        assert without_urls(final) == without_urls(client.get(job["id"]))
        # Reconnecting after the second event gives exactly what followed it.
        resumed = list(client.events(job["id"], last_event_id=events[1].id))
        assert [(e.type, e.id) for e in resumed] == [(e.type, e.id) for e in events[2:]]


def test_prefer_wait_and_long_polls_return_the_finished_job(svc: Service) -> None:
    auth = svc.key("wait")
    response = httpx.post(
        f"{svc.url}/v1/jobs", json={"prompt": "quick", "steps": 2}, headers={**auth, "Prefer": "wait=60"}, timeout=90
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded" and response.headers["preference-applied"] == "wait=60"
    job = svc.submit(auth, steps=2)
    polled = httpx.get(f"{svc.url}/v1/jobs/{job['id']}?wait=60", headers=auth, timeout=90).json()
    assert polled["status"] == "succeeded"


def test_webhooks_from_the_worker_reach_a_receiver_that_recovers(svc: Service) -> None:
    auth = svc.key("hooks")
    secret = httpx.get(f"{svc.url}/v1/webhook-secret", headers=auth, timeout=30).json()["secret"]
    with Receiver([503, 500]) as receiver:
        job = svc.submit(auth, steps=2, webhook_url=f"{receiver.url}/hook", webhook_events=["started", "succeeded"])
        done = svc.wait(auth, job["id"])

        def delivered() -> list[dict[str, Any]] | None:
            rows = httpx.get(f"{svc.url}/v1/jobs/{job['id']}/webhooks", headers=auth, timeout=30).json()["data"]
            return rows if len(rows) == 2 and all(r["status"] == "delivered" for r in rows) else None

        rows = wait_for(delivered, timeout=60, what="both webhooks delivered")
    payloads = [Webhook(secret).verify(r.body, r.headers) for r in receiver.received]
    by_type = {p["type"]: p for p in payloads}
    assert set(by_type) == {"job.started", "job.succeeded"}
    assert without_urls(by_type["job.succeeded"]["data"]) == without_urls(done)
    assert by_type["job.started"]["data"]["status"] == "running"
    assert sum(r["attempts"] for r in rows) == 4  # two failures retried, then both delivered
    failed_ids = [r.headers["webhook-id"] for r in receiver.received[:2]]
    assert all(msg_id in {r["id"] for r in rows} for msg_id in failed_ids)


def test_python_clients_and_the_cli_wait_with_progress(svc: Service) -> None:
    auth = svc.key("clients")
    seen: list[Event] = []
    with Client(svc.url, api_key(auth)) as client:
        job = client.submit("sync client", steps=3, idempotency_key="client-1")
        assert client.submit("sync client", steps=3, idempotency_key="client-1")["id"] == job["id"]
        done = client.wait(job["id"], on_event=seen.append)
        assert done["status"] == "succeeded" and seen[-1].type == "succeeded"
        assert [e.data["step"] for e in seen if e.type == "progress"][-1] == 3
        polled: list[Event] = []
        again = client.wait(client.submit("polling", steps=2)["id"], on_event=polled.append, use_sse=False)
        assert again["status"] == "succeeded" and polled[-1].type == "succeeded"
        assert client.list(limit=5)["data"][0]["id"] == again["id"]

    async def use_async() -> str:
        async with AsyncClient(svc.url, api_key(auth)) as aclient:
            submitted = await aclient.submit("async client", steps=2)
            finished = await aclient.wait(submitted["id"])
            return finished["status"]

    assert asyncio.run(use_async()) == "succeeded"

    env = {**svc.env, "DARKROOM_API_KEY": api_key(auth), "DARKROOM_API_URL": svc.url}
    result = run_cli(["submit", "from the cli", "--steps", "2", "--wait"], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded"


def test_the_cli_uploads_local_input_images_and_saves_each_output_in_its_format(svc: Service, tmp_path: Path) -> None:
    auth = svc.key("cli-inputs")
    # 96x64, where the model's default is 64x64: an output of this size was made from this input.
    image, mask = tmp_path / "house.png", tmp_path / "door.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(image)
    door = Image.new("L", (96, 64), 0)
    door.paste(255, (32, 16, 64, 48))
    door.save(mask)
    env = {**svc.env, "DARKROOM_API_KEY": api_key(auth), "DARKROOM_API_URL": svc.url}
    out = tmp_path / "out"
    args = ["submit", "a red door", "--task", "inpaint", "--image", str(image), "--mask", str(mask)]
    args += ["--strength", "0.8", "--scheduler", "ddim", "--output-format", "jpeg", "--steps", "2"]
    result = run_cli([*args, "--wait", "--out", str(out)], env)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded", job["error"]
    assert {k: job["request"][k] for k in ("task", "strength", "scheduler")} == {
        "task": "inpaint",
        "strength": 0.8,
        "scheduler": "ddim",
    }
    saved = list(out.iterdir())
    assert [p.name for p in saved] == [f"{job['id']}-0.jpg"]
    with Image.open(saved[0]) as picture:
        assert (picture.format, picture.size) == ("JPEG", (96, 64))

    missing = run_cli(["submit", "x", "--task", "img2img", "--image", str(tmp_path / "nope.png")], env)
    assert missing.returncode != 0 and "--image" in missing.stderr and "no such file" in missing.stderr

    async def upload() -> dict[str, Any]:
        async with AsyncClient(svc.url, api_key(auth)) as aclient:
            return dict(await aclient.upload(image.read_bytes()))

    uploaded = asyncio.run(upload())
    assert (uploaded["width"], uploaded["height"]) == (96, 64)
    with Client(svc.url, api_key(auth)) as client:
        job = client.submit("from an upload", task="img2img", image=uploaded["key"], steps=2, wait=60)
    assert job["status"] == "succeeded" and (job["outputs"][0]["width"], job["outputs"][0]["height"]) == (96, 64)
