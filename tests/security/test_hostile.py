"""Hostile requests: other tenants' ids (BOLA), deeply nested JSON, oversized headers, request ids, and API
keys that must never reach a log or an error message."""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.security.conftest import make_key
from tests.support import Process, delete_redis_prefix, free_port, run_cli, wait_http


@pytest.fixture(scope="module")
def client(app: Any) -> Any:
    with TestClient(app) as test_client:
        yield test_client


def test_every_route_with_an_id_hides_other_tenants_objects(client: TestClient, app: Any) -> None:
    alice, bob = make_key("alice"), make_key("bob")
    job = client.post("/v1/jobs", json={"prompt": "mine", "steps": 1}, headers=alice).json()["id"]
    paths = app.openapi()["paths"]
    routes = [(m.upper(), path) for path, ops in paths.items() if "{job_id}" in path for m in ops]
    assert len(routes) >= 2, routes
    for method, path in routes:
        url = path.replace("{job_id}", job)
        response = client.request(method, url, headers=bob)
        assert response.status_code == 404, (method, path, response.status_code)
        # Same answer as for an id that does not exist at all: nothing tells the two apart.
        missing = client.request(method, path.replace("{job_id}", uuid.uuid4().hex), headers=bob)
        assert response.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    assert job not in [j["id"] for j in client.get("/v1/jobs", headers=bob).json()["data"]]
    assert client.get(f"/v1/jobs/{job}", headers=alice).json()["status"] == "queued"


def test_every_batch_route_hides_other_tenants_batches(client: TestClient, app: Any) -> None:
    alice, bob = make_key("alice-batches"), make_key("bob-batches")
    created = client.post("/v1/batches", json={"job": {"prompt": "mine", "steps": 1}, "seeds": [1, 2]}, headers=alice)
    batch = created.json()["id"]
    paths = app.openapi()["paths"]
    routes = [(m.upper(), path) for path, ops in paths.items() if "{batch_id}" in path for m in ops]
    assert len(routes) >= 3, routes
    for method, path in routes:
        response = client.request(method, path.replace("{batch_id}", batch), headers=bob)
        assert response.status_code == 404, (method, path, response.status_code)
        missing = client.request(method, path.replace("{batch_id}", uuid.uuid4().hex), headers=bob)
        assert response.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    assert batch not in [b["id"] for b in client.get("/v1/batches", headers=bob).json()["data"]]
    assert client.get(f"/v1/batches/{batch}", headers=alice).json()["status"] == "queued"


def test_admin_routes_need_an_admin_tenant(client: TestClient) -> None:
    for path in ("/v1/admin/workers", "/v1/admin/queues"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=make_key("plain")).status_code == 403
        assert client.get(path, headers=make_key("ops", admin=True)).status_code == 200


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_json_is_refused_with_422(client: TestClient, auth_depth: dict[str, str], depth: int) -> None:
    body = '{"prompt": "x", "metadata": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    response = client.post("/v1/jobs", content=body, headers={**auth_depth, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text[:300]
    assert "nested deeper" in response.json()["error"]["message"]


def test_brackets_inside_strings_do_not_count_as_nesting(client: TestClient, auth_depth: dict[str, str]) -> None:
    body = json.dumps({"prompt": "[" * 500 + "{" * 500, "steps": 1})
    response = client.post("/v1/jobs", content=body, headers={**auth_depth, "Content-Type": "application/json"})
    assert response.status_code == 202, response.text


@pytest.fixture(scope="module")
def auth_depth(sqlite_env: dict[str, str]) -> dict[str, str]:
    return make_key("depth")


def test_an_oversized_key_is_refused_without_a_lookup(client: TestClient) -> None:
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer " + "a" * 5000})
    assert response.status_code == 401


def test_request_ids_are_echoed_validated_and_generated(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123.x_y"}).headers["x-request-id"] == "abc-123.x_y"
    for bad in ("a" * 65, "has space", "semi;colon", "<script>"):
        echoed = client.get("/healthz", headers={"X-Request-ID": bad}).headers
        assert echoed["x-request-id"] != bad and len(echoed["x-request-id"]) == 32
    assert len(client.get("/healthz").headers["x-request-id"]) == 32


@pytest.fixture(scope="module")
def real_api(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Any:
    tmp = tmp_path_factory.mktemp("hostile-api")
    prefix = f"darkroom-hostile:{uuid.uuid4().hex[:8]}:"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp),
        "DARKROOM_ENV_FILE": "",
        "DARKROOM_DATA_DIR": str(tmp),
        "DARKROOM_REDIS_PREFIX": prefix,
        "DARKROOM_REDIS_URL": "redis://127.0.0.1:6379/0",
        "DARKROOM_MODEL_CACHE_DIR": str(models_dir),
    }
    assert run_cli(["migrate"], env).returncode == 0
    port = free_port()
    api = Process(["api", "--port", str(port), "--log-level", "info"], env, tmp / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=api)
        yield env, f"http://127.0.0.1:{port}", api
    finally:
        api.stop()
        delete_redis_prefix(prefix)


def test_keys_never_reach_logs_or_error_messages(real_api: Any) -> None:
    env, url, api = real_api
    key = run_cli(["keys", "create", "--tenant", "secretive"], env).stdout.strip()
    wrong = "dr_" + secrets.token_urlsafe(32)
    answers = [
        httpx.post(f"{url}/v1/jobs", json={"prompt": "x", "steps": 1}, headers={"Authorization": f"Bearer {key}"}),
        httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {wrong}"}),
        httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}", "X-Request-ID": key}),
        httpx.get(f"{url}/v1/jobs", params={"cursor": key}, headers={"Authorization": f"Bearer {key}"}),
        httpx.get(f"{url}/v1/jobs/{wrong}", headers={"Authorization": f"Bearer {key}"}),
        httpx.post(f"{url}/v1/jobs", json={"prompt": key, "model": key}, headers={"Authorization": f"Bearer {key}"}),
        httpx.get(f"{url}/v1/admin/workers", headers={"Authorization": f"Bearer {key}"}),
    ]
    assert [a.status_code for a in answers] == [202, 401, 200, 422, 404, 422, 403]
    for answer in answers[1:]:
        assert key not in answer.text and wrong not in answer.text, answer.text
    log = api.output()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert any(line.get("request_id") for line in lines)
    assert key not in log and wrong not in log


def test_each_request_is_logged_once_with_its_id_status_and_client(real_api: Any) -> None:
    _, url, api = real_api
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    assert httpx.get(f"{url}/v1/jobs", headers={"X-Request-ID": request_id}).status_code == 401

    def logged() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in api.output().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("request_id") == request_id]

    # The line is written once the response is sent: give it a moment, and another line the time to follow.
    deadline = time.monotonic() + 5
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    mine = logged()
    assert [line["logger"] for line in mine] == ["darkroom.access"]
    assert re.fullmatch(r"GET /v1/jobs 401 [\d.]+ ms from 127\.0\.0\.1:\d+", mine[0]["msg"])
