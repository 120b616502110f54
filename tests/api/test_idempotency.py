"""Idempotency-Key on creating POSTs, in-process on real Redis and both databases."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from shared import idempotency
from shared.db import session_scope
from shared.tables import Job, Tenant, Upload
from tests.api.test_jobs import queued_messages


def job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_retry_with_the_same_key_and_body_returns_the_first_job_and_runs_nothing_twice(
    api: TestClient, auth: dict[str, str], darkroom_env: dict[str, Any]
) -> None:
    headers = {**auth, "Idempotency-Key": "order-1234"}
    first = api.post("/v1/jobs", json={"prompt": "a fox", "steps": 2}, headers=headers)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    # Key order and whitespace do not make a different request.
    again = api.post(
        "/v1/jobs",
        content='{ "steps": 2, "prompt": "a fox" }',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    # The seed the server chose the first time is what the replay shows: it is the same job.
    assert again.json()["request"] == first.json()["request"]
    assert job_count() == 1
    assert queued_messages(darkroom_env["DARKROOM_REDIS_PREFIX"]) == [first.json()["id"]]


def test_the_same_key_with_another_body_is_refused(api: TestClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Idempotency-Key": "k1"}
    assert api.post("/v1/jobs", json={"prompt": "one"}, headers=headers).status_code == 202
    response = api.post("/v1/jobs", json={"prompt": "two"}, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert job_count() == 1


def test_a_request_while_the_first_is_in_flight_gets_409(api: TestClient, auth: dict[str, str]) -> None:
    # The first request has claimed the key and not committed its job yet.
    with session_scope() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    body = {"prompt": "slow"}
    assert idempotency.claim(tenant_id, "k2", idempotency.fingerprint("POST", "/v1/jobs", body)) is None
    response = api.post("/v1/jobs", json=body, headers={**auth, "Idempotency-Key": "k2"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_key_in_flight"
    assert response.headers["retry-after"]
    assert job_count() == 0


def test_keys_are_per_tenant(api: TestClient, make_key: Callable[[str], dict[str, str]]) -> None:
    acme, globex = make_key("acme"), make_key("globex")
    a = api.post("/v1/jobs", json={"prompt": "p"}, headers={**acme, "Idempotency-Key": "shared"})
    b = api.post("/v1/jobs", json={"prompt": "p"}, headers={**globex, "Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_an_invalid_request_does_not_use_up_its_key(api: TestClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Idempotency-Key": "k3"}
    assert api.post("/v1/jobs", json={"prompt": "p", "width": 65}, headers=headers).status_code == 422
    assert api.post("/v1/jobs", json={"prompt": "p", "width": 64}, headers=headers).status_code == 202


def test_an_overlong_key_is_refused(api: TestClient, auth: dict[str, str]) -> None:
    response = api.post("/v1/jobs", json={"prompt": "p"}, headers={**auth, "Idempotency-Key": "x" * 256})
    assert response.status_code == 422 and "Idempotency-Key" in response.json()["error"]["message"]


def test_rotating_the_webhook_secret_is_idempotent_too(api: TestClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Idempotency-Key": "rotate-1"}
    first = api.post("/v1/webhook-secret", json={"grace_period_seconds": 60}, headers=headers)
    again = api.post("/v1/webhook-secret", json={"grace_period_seconds": 60}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert (
        again.json()["secret"] == first.json()["secret"] == api.get("/v1/webhook-secret", headers=auth).json()["secret"]
    )


def test_an_upload_retried_with_its_key_stores_one_image(api: TestClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Idempotency-Key": "upload-1"}

    def upload(colour: str) -> Any:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
        return api.post("/v1/uploads", files={"file": ("in.png", buffer.getvalue(), "image/png")}, headers=headers)

    first, again = upload("red"), upload("red")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Upload)) == 1
    reused = upload("blue")  # another file under the same key
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"


def test_expired_keys_are_forgotten(api: TestClient, auth: dict[str, str], darkroom_env: dict[str, Any]) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from shared.tables import IdempotencyKey, utcnow

    headers = {**auth, "Idempotency-Key": "old"}
    first = api.post("/v1/jobs", json={"prompt": "p"}, headers=headers).json()
    with session_scope() as session:
        session.execute(update(IdempotencyKey).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert idempotency.delete_expired(session) == 1
    second = api.post("/v1/jobs", json={"prompt": "p"}, headers=headers)
    assert second.status_code == 202 and second.json()["id"] != first["id"]
