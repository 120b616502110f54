"""The jobs API in-process against real Redis and both databases: submit, read, list, cancel, isolation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from shared import broker
from shared.db import session_scope
from shared.jobs import get_job
from shared.settings import get_settings


def queued_messages(prefix: str, queue: str = "model.tiny-sd") -> list[str]:
    """Job ids of the run messages waiting in a Celery queue in Redis."""
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    raw = client.lrange(f"{prefix}{queue}", 0, -1)
    ids = []
    for item in raw:
        message = json.loads(item)
        assert message["headers"]["task"] == "jobs.run"
        ids.append(message["headers"]["argsrepr"].strip("()[],' "))
    return ids


def test_submit_returns_202_with_a_queued_job_and_publishes_it(
    api: TestClient, auth: dict[str, str], darkroom_env: dict[str, Any]
) -> None:
    response = api.post("/v1/jobs", json={"prompt": "a red fox", "metadata": {"campaign": "spring"}}, headers=auth)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["model"] == "tiny-sd"
    assert job["metadata"] == {"campaign": "spring"}
    assert job["outputs"] == [] and job["error"] is None and job["progress"] is None
    request = job["request"]
    # Defaults come from the registry, and a seed is chosen and returned so the job is reproducible.
    assert (request["width"], request["height"], request["steps"]) == (64, 64, 4)
    assert isinstance(request["seed"], int)
    with session_scope() as session:
        assert get_job(session, job["id"]).status == "queued"
    assert queued_messages(darkroom_env["DARKROOM_REDIS_PREFIX"]) == [job["id"]]
    assert api.get(f"/v1/jobs/{job['id']}", headers=auth).json() == job


def test_submit_keeps_the_job_when_redis_is_down(
    api: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis unreachable after the row is committed: the client still gets its job, the row stays queued,
    # and the reconciler publishes it later.
    monkeypatch.setattr(get_settings(), "redis_url", "redis://127.0.0.1:1/0")
    broker.get_redis.cache_clear()
    broker.get_celery.cache_clear()
    response = api.post("/v1/jobs", json={"prompt": "kept"}, headers=auth)
    assert response.status_code == 202, response.text
    with session_scope() as session:
        assert get_job(session, response.json()["id"]).status == "queued"


def test_explicit_parameters_are_kept(api: TestClient, auth: dict[str, str]) -> None:
    body = {
        "prompt": "p",
        "negative_prompt": "n",
        "width": 128,
        "height": 96,
        "steps": 7,
        "guidance_scale": 3,
        "seed": 123,
        "num_images": 3,
    }
    request = api.post("/v1/jobs", json=body, headers=auth).json()["request"]
    assert {k: request[k] for k in body} == {**body, "guidance_scale": 3.0}


def test_tenants_never_see_each_other(api: TestClient, make_key: Callable[[str], dict[str, str]]) -> None:
    alice, bob = make_key("alice"), make_key("bob")
    job = api.post("/v1/jobs", json={"prompt": "alice's"}, headers=alice).json()
    assert api.get(f"/v1/jobs/{job['id']}", headers=bob).status_code == 404
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    assert api.get("/v1/jobs", headers=bob).json()["data"] == []
    assert [j["id"] for j in api.get("/v1/jobs", headers=alice).json()["data"]] == [job["id"]]
    # Bob's attempt to cancel changed nothing.
    assert api.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "queued"


def test_list_is_newest_first_and_paginates(api: TestClient, auth: dict[str, str]) -> None:
    ids = [api.post("/v1/jobs", json={"prompt": f"n{i}"}, headers=auth).json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/jobs", params=params, headers=auth).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    canceled = api.get("/v1/jobs", params={"status": "canceled"}, headers=auth).json()["data"]
    assert [j["id"] for j in canceled] == [ids[0]]


def test_cancel_a_queued_job(api: TestClient, auth: dict[str, str], darkroom_env: dict[str, Any]) -> None:
    job = api.post("/v1/jobs", json={"prompt": "never"}, headers=auth).json()
    response = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert response.json()["finished_at"] is not None
    assert broker.cancel_requested(job["id"])
    again = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"


def test_unknown_job_is_404(api: TestClient, auth: dict[str, str]) -> None:
    response = api.get("/v1/jobs/does-not-exist", headers=auth)
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "job 'does-not-exist' not found"}}


def test_models_lists_the_registry_with_limits(api: TestClient, auth: dict[str, str]) -> None:
    models = api.get("/v1/models", headers=auth).json()["data"]
    tiny = next(m for m in models if m["name"] == "tiny-sd")
    assert tiny["family"] == "sd1"
    assert tiny["defaults"]["steps"] == 4
    assert tiny["limits"]["max_width"] == 512 and tiny["limits"]["max_steps"] == 50


def test_health_and_readiness(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok"}


def test_readiness_is_503_naming_what_is_down(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "redis_url", "redis://127.0.0.1:1/0")
    broker.get_redis.cache_clear()
    ready = api.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("unavailable")
    assert ready.json()["checks"]["database"] == "ok"


def test_openapi_documents_routes_errors_and_examples(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    post = spec["paths"]["/v1/jobs"]["post"]
    assert {"202", "401", "413", "422"} <= set(post["responses"])
    assert spec["components"]["schemas"]["JobCreate"]["examples"][0]["prompt"]
    assert "/v1/jobs/{job_id}/cancel" in spec["paths"]
    assert "/v1/models" in spec["paths"]
