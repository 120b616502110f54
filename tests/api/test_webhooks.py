"""Webhooks in-process: outbox rows from real state changes, sent by the `webhooks.deliver` task body to
real HTTP receivers on loopback, verified with the `standardwebhooks` reference library."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from standardwebhooks import Webhook

from shared import reconciler, webhooks
from shared.db import session_scope
from shared.jobs import claim_job, record_progress, succeed_job
from shared.settings import get_settings
from shared.tables import WebhookDelivery, utcnow
from tests.receiver import Receiver


@pytest.fixture
def hooks(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loopback receivers allowed; the retry clock compressed; short attempts and a small budget."""
    settings = get_settings()
    monkeypatch.setattr(settings, "webhook_allow_private", True)
    monkeypatch.setattr(settings, "webhook_backoff_scale", 0.0001)
    monkeypatch.setattr(settings, "webhook_timeout", 1.0)
    monkeypatch.setattr(settings, "webhook_max_attempts", 4)
    yield


def deliver_all(job_id: str, rounds: int = 10) -> None:
    """Stand in for the webhooks worker: run every pending delivery of the job until none is left."""
    for _ in range(rounds):
        with session_scope() as session:
            pending = session.scalars(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.job_id == job_id, WebhookDelivery.status == "pending")
                .order_by(WebhookDelivery.created_at)
            ).all()
        if not pending:
            return
        for delivery_id in pending:
            webhooks.deliver(delivery_id)
    raise AssertionError("deliveries still pending")


def submit(api: TestClient, auth: dict[str, str], url: str, **extra: Any) -> dict[str, Any]:
    response = api.post("/v1/jobs", json={"prompt": "p", "webhook_url": url, **extra}, headers=auth)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_delivery_survives_failure_stall_and_redirect_and_is_signed(
    api: TestClient, auth: dict[str, str], hooks: None
) -> None:
    with Receiver([503, ("stall", 2), ("redirect", "/elsewhere")]) as receiver:
        job = submit(api, auth, f"{receiver.url}/hook")
        assert job["webhook"] == {"url": f"{receiver.url}/hook", "events": []}
        canceled = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()
        deliver_all(job["id"])

    calls = receiver.on("/hook")
    assert len(calls) == 4 and receiver.on("/elsewhere") == []  # the redirect was not followed
    assert len({c.headers["webhook-id"] for c in calls}) == 1  # one message, retried
    secret = api.get("/v1/webhook-secret", headers=auth).json()["secret"]
    assert secret.startswith("whsec_")
    for call in calls:
        payload = Webhook(secret).verify(call.body, call.headers)
        assert payload["type"] == "job.canceled"
        assert payload["data"] == canceled == api.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        assert call.headers["content-type"] == "application/json"

    [delivery] = api.get(f"/v1/jobs/{job['id']}/webhooks", headers=auth).json()["data"]
    assert delivery["id"] == calls[0].headers["webhook-id"]
    assert (delivery["event"], delivery["status"], delivery["attempts"]) == ("canceled", "delivered", 4)
    log = delivery["attempt_log"]
    assert [a["status_code"] for a in log] == [503, None, 302, 200]
    assert "timed out" in log[1]["error"] and "redirect" in log[2]["error"] and log[3]["error"] is None
    assert all(a["latency_ms"] is not None for a in log)
    metrics = api.get("/metrics").text
    assert 'darkroom_webhook_deliveries_total{outcome="retrying"} 3.0' in metrics
    assert 'darkroom_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics


def test_a_delivery_that_never_succeeds_is_marked_failed(api: TestClient, auth: dict[str, str], hooks: None) -> None:
    with Receiver(default=500) as receiver:
        job = submit(api, auth, f"{receiver.url}/down")
        api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
        deliver_all(job["id"])
    assert len(receiver.received) == 4
    [delivery] = api.get(f"/v1/jobs/{job['id']}/webhooks", headers=auth).json()["data"]
    assert delivery["status"] == "failed" and delivery["attempts"] == 4 and delivery["last_status_code"] == 500
    assert 'darkroom_webhook_deliveries_total{outcome="failed"} 1.0' in api.get("/metrics").text


def test_410_gone_disables_the_url_until_a_manual_retry(api: TestClient, auth: dict[str, str], hooks: None) -> None:
    with Receiver([410]) as receiver:
        url = f"{receiver.url}/gone"
        first = submit(api, auth, url)
        api.post(f"/v1/jobs/{first['id']}/cancel", headers=auth)
        deliver_all(first["id"])
        second = submit(api, auth, url)
        api.post(f"/v1/jobs/{second['id']}/cancel", headers=auth)
        deliver_all(second["id"])
        assert len(receiver.received) == 1  # nothing more went to the disabled URL

        [gone] = api.get(f"/v1/jobs/{first['id']}/webhooks", headers=auth).json()["data"]
        [skipped] = api.get(f"/v1/jobs/{second['id']}/webhooks", headers=auth).json()["data"]
        assert (gone["status"], gone["last_status_code"], gone["attempts"]) == ("failed", 410, 1)
        assert skipped["status"] == "failed" and "410" in skipped["last_error"] and skipped["attempt_log"] == []
        assert 'darkroom_webhook_deliveries_total{outcome="gone"} 1.0' in api.get("/metrics").text

        # The receiver is back: a manual retry re-enables the URL and sends the same message again.
        retried = api.post(f"/v1/webhooks/{skipped['id']}/retry", headers=auth)
        assert retried.status_code == 202 and retried.json()["status"] == "pending"
        deliver_all(second["id"])
    assert len(receiver.received) == 2 and receiver.received[1].headers["webhook-id"] == skipped["id"]
    [done] = api.get(f"/v1/jobs/{second['id']}/webhooks", headers=auth).json()["data"]
    assert done["status"] == "delivered"


def test_subscribed_events_follow_the_job_and_default_to_terminal_ones(
    api: TestClient, auth: dict[str, str], hooks: None
) -> None:
    with Receiver() as receiver:
        chosen = submit(api, auth, f"{receiver.url}/all", webhook_events=["started", "progress", "succeeded"])
        default = submit(api, auth, f"{receiver.url}/default")
        for job in (chosen, default):
            # What a worker does, through the same state machine.
            with session_scope() as session:
                claimed = claim_job(session, job["id"], worker_id="test", lease_seconds=30)
                assert claimed is not None
            with session_scope() as session:
                record_progress(session, job["id"], attempt=1, step=1, total=2)
            with session_scope() as session:
                succeed_job(session, job["id"], attempt=1, outputs=[])
            deliver_all(job["id"])
    assert [json.loads(r.body)["type"] for r in receiver.on("/all")] == ["job.started", "job.progress", "job.succeeded"]
    progress = json.loads(receiver.on("/all")[1].body)["data"]
    assert progress["status"] == "running" and progress["progress"] == {"step": 1, "total": 2}
    assert [json.loads(r.body)["type"] for r in receiver.on("/default")] == ["job.succeeded"]


def test_after_rotation_both_secrets_sign_during_the_grace_period(
    api: TestClient, auth: dict[str, str], hooks: None
) -> None:
    old = api.get("/v1/webhook-secret", headers=auth).json()["secret"]
    rotated = api.post("/v1/webhook-secret", json={"grace_period_seconds": 3600}, headers=auth).json()
    new = rotated["secret"]
    assert new != old and rotated["previous_secret_expires_at"] is not None
    assert api.get("/v1/webhook-secret", headers=auth).json()["secret"] == new
    with Receiver() as receiver:
        job = submit(api, auth, f"{receiver.url}/hook")
        api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
        deliver_all(job["id"])
        # Rotating again with no grace: only the newest secret signs.
        newest = api.post("/v1/webhook-secret", json={"grace_period_seconds": 0}, headers=auth).json()["secret"]
        job = submit(api, auth, f"{receiver.url}/hook")
        api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
        deliver_all(job["id"])
    during, after = receiver.received
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(during.body, during.headers)
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    Webhook(newest).verify(after.body, after.headers)


def test_webhook_urls_must_be_public_http_by_default(api: TestClient, auth: dict[str, str]) -> None:
    for url in ("http://127.0.0.1:9/hook", "http://10.0.0.8/hook", "ftp://example.com/hook", "http://[::1]/x"):
        response = api.post("/v1/jobs", json={"prompt": "p", "webhook_url": url}, headers=auth)
        assert response.status_code == 422, url
        assert response.json()["error"]["message"].startswith("webhook_url"), response.text


def test_the_reconciler_resends_a_delivery_whose_message_redis_lost(
    api: TestClient, auth: dict[str, str], hooks: None, darkroom_env: dict[str, Any]
) -> None:
    queue = f"{darkroom_env['DARKROOM_REDIS_PREFIX']}webhooks"
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    with Receiver() as receiver:
        job = submit(api, auth, f"{receiver.url}/hook")
        api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
        assert client.llen(queue) == 1
        client.delete(queue)  # Redis lost the message
        with session_scope() as session:
            session.execute(update(WebhookDelivery).values(enqueued_at=utcnow() - timedelta(minutes=5)))
        assert reconciler.reconcile_once()["webhooks_resent"] == 1
        [message] = [json.loads(m) for m in client.lrange(queue, 0, -1)]
        assert message["headers"]["task"] == "webhooks.deliver"
        # A second pass right after does not pile up duplicates.
        assert reconciler.reconcile_once()["webhooks_resent"] == 0
        deliver_all(job["id"])
    assert len(receiver.received) == 1
