"""Batches through the API: created all or nothing from a list, from prompts or from seeds; errors that name
the job at fault; aggregate counts as jobs move through the real state machine; cancel; and one
`batch.completed` webhook to a real loopback receiver, even when the last two jobs end at once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from standardwebhooks import Webhook

from shared import webhooks
from shared.db import session_scope
from shared.jobs import claim_job, fail_job, succeed_job
from shared.settings import get_settings
from shared.tables import WebhookDelivery
from tests.receiver import Receiver
from tests.support import reset_caches


def create(api: TestClient, auth: dict[str, str], body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = api.post("/v1/batches", json=body, headers={**auth, **headers})
    assert response.status_code == 202, response.text
    return response.json()


def refused(api: TestClient, auth: dict[str, str], body: dict[str, Any], field: str, reason: str) -> str:
    response = api.post("/v1/batches", json=body, headers=auth)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"{field}:") and reason in message, message
    return str(response.json()["error"]["code"])


def finish(job_id: str, how: str = "succeeded") -> None:
    """What a worker does with a job, through the same state machine."""
    with session_scope() as session:
        assert claim_job(session, job_id, worker_id="test", lease_seconds=30) is not None
    with session_scope() as session:
        if how == "succeeded":
            assert succeed_job(session, job_id, attempt=1, outputs=[])
        else:
            assert fail_job(session, job_id, attempt=1, code="boom", message="it broke")


def batch_deliveries(batch_id: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.batch_id == batch_id)).all())


def test_a_batch_from_a_list_queues_every_job_in_order(api: TestClient, auth: dict[str, str]) -> None:
    body = {
        "jobs": [{"prompt": "a lighthouse", "seed": 1}, {"prompt": "a harbour", "steps": 3, "num_images": 2}],
        "metadata": {"campaign": "spring"},
    }
    batch = create(api, auth, body)
    assert (batch["status"], batch["total"], batch["metadata"]) == ("queued", 2, {"campaign": "spring"})
    assert batch["counts"] == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0, "expired": 0}
    prompts = [j["request"]["prompt"] for j in batch["jobs"]]
    assert prompts == ["a lighthouse", "a harbour"]
    assert batch["jobs"][0]["request"]["seed"] == 1 and batch["jobs"][1]["request"]["num_images"] == 2
    # The jobs are ordinary jobs: readable one by one, and listed with the tenant's others.
    for job in batch["jobs"]:
        assert api.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "queued"
    assert api.get(f"/v1/batches/{batch['id']}", headers=auth).json() == batch
    listed = api.get("/v1/batches", headers=auth).json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]] and "jobs" not in listed["data"][0]


def test_a_batch_from_one_request_and_prompts_or_seeds(api: TestClient, auth: dict[str, str]) -> None:
    template = {"steps": 2, "width": 64, "height": 64, "seed": 5}
    batch = create(api, auth, {"job": template, "prompts": ["red shoe", "blue shoe", "green shoe"]})
    assert [j["request"]["prompt"] for j in batch["jobs"]] == ["red shoe", "blue shoe", "green shoe"]
    assert {(j["request"]["steps"], j["request"]["seed"]) for j in batch["jobs"]} == {(2, 5)}

    batch = create(api, auth, {"job": {"prompt": "a lighthouse", "steps": 2}, "seeds": [10, 20]})
    assert [(j["request"]["prompt"], j["request"]["seed"]) for j in batch["jobs"]] == [
        ("a lighthouse", 10),
        ("a lighthouse", 20),
    ]


def test_an_invalid_job_refuses_the_whole_batch_and_names_it(
    api: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    good = {"prompt": "fine"}
    refused(api, auth, {"jobs": [good, good, good, {"prompt": "x", "width": 65}]}, "jobs[3].width", "multiple of 8")
    refused(api, auth, {"jobs": [good, {"prompt": "x", "colour": "red"}]}, "jobs[1].colour", "unknown field")
    refused(api, auth, {"jobs": [good, {"prompt": "x", "model": "nope"}]}, "jobs[1].model", "unknown model")
    refused(api, auth, {"job": {"width": 12}, "prompts": ["a", "b"]}, "job.width", "multiple of 8")
    refused(api, auth, {"job": {}, "prompts": ["a", "  "]}, "prompts", "prompts[1] must not be blank")
    refused(api, auth, {"job": {"prompt": "a", "num_images": 8}, "seeds": [1, 2**32 - 3]}, "seeds[1]", "must not")
    refused(api, auth, {"job": {"prompt": "a"}, "seeds": [1], "prompts": ["b"]}, "body", "exactly one of")
    refused(api, auth, {"jobs": []}, "jobs", "at least 1")
    monkeypatch.setattr(get_settings(), "max_jobs_per_batch", 3)
    refused(api, auth, {"job": {"prompt": "a"}, "seeds": [1, 2, 3, 4]}, "seeds", "at most 3 jobs per batch")
    monkeypatch.setattr(get_settings(), "max_jobs_per_batch", 100)

    # The content policy applies to every job, as on POST /v1/jobs.
    policy = tmp_path / "tenants.toml"
    policy.write_text('[tenants.acme]\ndeny_terms = ["castle"]\n')
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(policy))
    reset_caches()
    code = refused(api, auth, {"job": {}, "prompts": ["a sea", "a castle"]}, "prompts[1]", "content policy")
    assert code == "content_policy"
    refused(api, auth, {"jobs": [good, {"prompt": "x", "negative_prompt": "castle"}]}, "jobs[1].negative_prompt", "")

    # Nothing of any refused batch was created.
    assert api.get("/v1/jobs", headers=auth).json()["data"] == []
    assert api.get("/v1/batches", headers=auth).json()["data"] == []


def test_counts_follow_the_jobs_to_completion(api: TestClient, auth: dict[str, str]) -> None:
    batch = create(api, auth, {"job": {"prompt": "p"}, "seeds": [1, 2, 3]})
    first, second, third = (j["id"] for j in batch["jobs"])
    finish(first)
    with session_scope() as session:
        claim_job(session, second, worker_id="test", lease_seconds=30)
    now = api.get(f"/v1/batches/{batch['id']}", headers=auth).json()
    assert now["status"] == "running" and now["completed_at"] is None
    assert (now["counts"]["succeeded"], now["counts"]["running"], now["counts"]["queued"]) == (1, 1, 1)

    with session_scope() as session:
        fail_job(session, second, attempt=1, code="boom", message="it broke")
    finish(third)
    done = api.get(f"/v1/batches/{batch['id']}", headers=auth).json()
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert (done["counts"]["succeeded"], done["counts"]["failed"]) == (2, 1)
    assert [j["status"] for j in done["jobs"]] == ["succeeded", "failed", "succeeded"]


def test_cancel_stops_what_has_not_ended(api: TestClient, auth: dict[str, str]) -> None:
    batch = create(api, auth, {"job": {"prompt": "p"}, "seeds": [1, 2, 3]})
    first, second, _ = (j["id"] for j in batch["jobs"])
    finish(first)
    with session_scope() as session:
        claim_job(session, second, worker_id="test", lease_seconds=30)
    response = api.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert response.status_code == 200, response.text
    canceled = response.json()
    assert canceled["status"] == "canceled" and canceled["canceled_at"] is not None
    assert [j["status"] for j in canceled["jobs"]] == ["succeeded", "canceled", "canceled"]
    assert canceled["counts"]["canceled"] == 2 and canceled["completed_at"] is not None
    # The running job's worker can no longer finish it.
    with session_scope() as session:
        assert not succeed_job(session, second, attempt=1, outputs=[])
    again = api.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert again.status_code == 409 and again.json()["error"]["code"] == "batch_finished"


def test_the_idempotency_key_replays_the_batch(api: TestClient, auth: dict[str, str]) -> None:
    body = {"job": {"prompt": "p"}, "seeds": [1, 2]}
    first = create(api, auth, body, **{"Idempotency-Key": "campaign-1"})
    replay = api.post("/v1/batches", json=body, headers={**auth, "Idempotency-Key": "campaign-1"})
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == first["id"]
    assert len(api.get("/v1/jobs", headers=auth).json()["data"]) == 2
    other = api.post("/v1/batches", json={**body, "seeds": [3]}, headers={**auth, "Idempotency-Key": "campaign-1"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


@pytest.fixture
def hooks(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "webhook_allow_private", True)
    monkeypatch.setattr(settings, "webhook_backoff_scale", 0.0001)
    monkeypatch.setattr(settings, "webhook_timeout", 2.0)


def test_batch_completed_is_signed_and_delivered_once(api: TestClient, auth: dict[str, str], hooks: None) -> None:
    with Receiver([503]) as receiver:
        body = {"job": {"prompt": "p"}, "seeds": [1, 2, 3], "webhook_url": f"{receiver.url}/batch"}
        batch = create(api, auth, body)
        first, second, third = (j["id"] for j in batch["jobs"])
        finish(first)
        finish(second, "failed")
        assert batch_deliveries(batch["id"]) == []  # not before the last job ends
        finish(third)
        [delivery_id] = batch_deliveries(batch["id"])
        for _ in range(5):
            webhooks.deliver(delivery_id)
    calls = receiver.on("/batch")
    assert len(calls) == 2  # a 503, then the retry that got through; nothing after that
    assert calls[0].headers["webhook-id"] == calls[1].headers["webhook-id"] == delivery_id
    secret = api.get("/v1/webhook-secret", headers=auth).json()["secret"]
    payload = Webhook(secret).verify(calls[1].body, calls[1].headers)
    assert payload["type"] == "batch.completed"
    now = api.get(f"/v1/batches/{batch['id']}", headers=auth).json()
    assert payload["data"] == now and now["status"] == "completed"
    assert (now["counts"]["succeeded"], now["counts"]["failed"]) == (2, 1)
    [listed] = api.get(f"/v1/batches/{batch['id']}/webhooks", headers=auth).json()["data"]
    assert (listed["event"], listed["status"], listed["attempts"], listed["batch_id"]) == (
        "batch.completed",
        "delivered",
        2,
        batch["id"],
    )
    # A batch delivery can be replayed like a job's.
    retried = api.post(f"/v1/webhooks/{delivery_id}/retry", headers=auth)
    assert retried.status_code == 202, retried.text
    assert (retried.json()["batch_id"], retried.json()["job_id"], retried.json()["status"]) == (
        batch["id"],
        None,
        "pending",
    )


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_the_last_two_jobs_ending_at_once_complete_the_batch_once(
    api: TestClient, auth: dict[str, str], hooks: None
) -> None:
    body = {"job": {"prompt": "p"}, "seeds": [1, 2], "webhook_url": "http://127.0.0.1:9/hook"}
    batch = create(api, auth, body)
    jobs = [j["id"] for j in batch["jobs"]]
    for job_id in jobs:
        with session_scope() as session:
            claim_job(session, job_id, worker_id="test", lease_seconds=30)
    first_updated = threading.Event()
    errors: list[BaseException] = []

    def end(job_id: str, first: bool) -> None:
        try:
            if not first:
                first_updated.wait(timeout=30)
            with session_scope() as session:
                assert succeed_job(session, job_id, attempt=1, outputs=[])
                if first:
                    # Hold this transaction open, uncommitted, while the other job ends in its own.
                    first_updated.set()
                    time.sleep(0.5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=end, args=(job_id, i == 0)) for i, job_id in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with session_scope() as session:
        rows = session.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.batch_id == batch["id"])
        )
        [payload] = session.scalars(select(WebhookDelivery.payload).where(WebhookDelivery.batch_id == batch["id"]))
    assert rows == 1
    assert json.loads(payload)["data"]["counts"]["succeeded"] == 2
    assert api.get(f"/v1/batches/{batch['id']}", headers=auth).json()["status"] == "completed"


def test_another_tenants_batch_is_not_found(
    api: TestClient, auth: dict[str, str], make_key: Callable[[str], dict[str, str]]
) -> None:
    batch = create(api, auth, {"job": {"prompt": "p"}, "seeds": [1]})
    stranger = make_key("globex")
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/webhooks")):
        response = api.request(method, f"/v1/batches/{batch['id']}{path}", headers=stranger)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert api.get("/v1/batches", headers=stranger).json()["data"] == []
    assert api.get(f"/v1/batches/{batch['id']}", headers=auth).json()["status"] == "queued"
