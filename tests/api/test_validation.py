"""Bad input gets a 4xx naming the field and the reason, never a 500, and nothing is created."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from shared.db import session_scope
from shared.tables import Job


def job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"prompt": "x", "model": "nope"}, "model", "tiny-sd"),  # lists what is available
        ({"prompt": "x", "width": 100}, "width", "multiple of 8"),
        ({"prompt": "x", "height": 4096}, "height", "between"),
        ({"prompt": "x", "width": 0}, "width", "between"),
        ({"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
        ({"prompt": "x", "steps": 51}, "steps", "at most 50"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   "}, "prompt", "blank"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"prompt": "x", "num_images": 9}, "num_images", "less than or equal to 8"),
        ({"prompt": "x", "num_images": 0}, "num_images", "greater than or equal to 1"),
        ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "seed": 2**32}, "seed", "less than or equal to"),
        ({"prompt": "x", "guidance_scale": 99.0}, "guidance_scale", "at most"),
        ({"prompt": "x", "width": "64"}, "width", "valid integer"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"prompt": "x", "metadata": "nope"}, "metadata", "valid dictionary"),
        ({"prompt": "x", "metadata": {"blob": "y" * 5000}}, "metadata", "4096 bytes"),
        ({"prompt": "x", "sampler": "euler"}, "sampler", "unknown field"),
        ({}, "prompt", "field required"),
    ],
)
def test_bad_job_fields_are_422_naming_the_field(
    api: TestClient, auth: dict[str, str], body: dict[str, Any], field: str, reason: str
) -> None:
    response = api.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"].startswith(f"{field}:") or f"{field}:" in error["message"], error
    assert reason in error["message"], error
    assert job_count() == 0


def test_malformed_json_is_422(api: TestClient, auth: dict[str, str]) -> None:
    response = api.post("/v1/jobs", content=b'{"prompt": ', headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert "invalid JSON" in response.json()["error"]["message"]


def test_body_over_the_cap_is_413(api: TestClient, auth: dict[str, str]) -> None:
    body = b'{"prompt": "' + b"x" * 1_100_000 + b'"}'
    response = api.post("/v1/jobs", content=body, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert job_count() == 0


def test_chunked_body_over_the_cap_is_413(api: TestClient, auth: dict[str, str]) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'"}'

    response = api.post("/v1/jobs", content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert job_count() == 0


def test_bad_list_parameters_are_422(api: TestClient, auth: dict[str, str]) -> None:
    for params, field in (({"limit": 0}, "limit"), ({"status": "done"}, "status"), ({"cursor": "zz"}, "cursor")):
        response = api.get("/v1/jobs", params=params, headers=auth)
        assert response.status_code == 422, response.text
        assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer dr_not-a-key", "Basic dXNlcjpwYXNz"])
def test_missing_or_wrong_key_is_401(api: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/x"), ("GET", "/v1/models")):
        response = api.request(method, path, headers=headers, json={"prompt": "x"})
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
    assert job_count() == 0


def test_revoked_key_fails_at_once(api: TestClient) -> None:
    from shared.tenants import create_key, revoke_key

    with session_scope() as session:
        key = create_key(session, "acme")
    headers = {"Authorization": f"Bearer {key}"}
    job_id = api.post("/v1/jobs", json={"prompt": "p"}, headers=headers).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
    with session_scope() as session:
        assert revoke_key(session, key)
    assert api.get("/v1/jobs", headers=headers).status_code == 401
    refused = api.get(f"/v1/jobs/{job_id}", headers=headers)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    # A submit with the key this API process has already seen live: refused, and no job made, whichever way
    # the submit goes (a plain one, one with an idempotency key, one the body validation refuses).
    for extra, body in (({}, {"prompt": "p"}), ({"Idempotency-Key": "k1"}, {"prompt": "p"}), ({}, {"prompt": ""})):
        submitted = api.post("/v1/jobs", json=body, headers={**headers, **extra})
        assert submitted.status_code == 401, submitted.text
        assert submitted.json()["error"]["code"] == "unauthorized"
    assert job_count() == 1
