"""Queue position, ETA, long polls and the OpenAPI description, in-process on real Redis and both databases."""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi.testclient import TestClient

from shared import broker, positions
from shared.job_view import record_run_seconds


def test_queued_jobs_show_their_position_and_an_eta_once_measured(api: TestClient, auth: dict[str, str]) -> None:
    ids = [api.post("/v1/jobs", json={"prompt": f"p{i}"}, headers=auth).json()["id"] for i in range(3)]
    jobs = [api.get(f"/v1/jobs/{job_id}", headers=auth).json() for job_id in ids]
    assert [j["queue_position"] for j in jobs] == [0, 1, 2]
    assert [j["eta_seconds"] for j in jobs] == [None, None, None]  # no run measured yet
    record_run_seconds("tiny-sd", 2.0)
    assert api.get(f"/v1/jobs/{ids[2]}", headers=auth).json()["eta_seconds"] == 6  # two ahead, then its own
    listed = api.get("/v1/jobs", headers=auth).json()["data"]
    assert sorted(j["queue_position"] for j in listed) == [0, 1, 2]
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    assert api.get(f"/v1/jobs/{ids[2]}", headers=auth).json()["queue_position"] == 1
    assert api.get(f"/v1/jobs/{ids[0]}", headers=auth).json()["queue_position"] is None
    # Without the queue's position set (Redis lost it) the position is counted in the database.
    broker.get_redis().delete(positions.key("model.tiny-sd"))
    assert api.get(f"/v1/jobs/{ids[2]}", headers=auth).json()["queue_position"] == 1


def test_a_long_poll_answers_when_the_job_ends(api: TestClient, auth: dict[str, str]) -> None:
    job = api.post("/v1/jobs", json={"prompt": "p"}, headers=auth).json()
    # Nothing happens: the poll gives up after its wait with the job as it is.
    assert api.get(f"/v1/jobs/{job['id']}?wait=1", headers=auth).json()["status"] == "queued"

    def cancel_soon() -> None:
        time.sleep(0.5)
        api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    started = time.monotonic()
    assert api.get(f"/v1/jobs/{job['id']}?wait=30", headers=auth).json()["status"] == "canceled"
    assert time.monotonic() - started < 25  # it did not sit out its whole wait
    # The cancel's own answer may still be on its way: the client must not close under it.
    canceller.join(timeout=10)


def test_prefer_wait_on_submit_gives_202_when_the_job_is_not_done_in_time(
    api: TestClient, auth: dict[str, str]
) -> None:
    response = api.post("/v1/jobs", json={"prompt": "p"}, headers={**auth, "Prefer": "wait=1"})
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert response.headers["preference-applied"] == "wait=1"
    assert api.get("/v1/jobs/x?wait=61", headers=auth).status_code == 422


def test_openapi_documents_the_integration_features(api: TestClient, darkroom_env: dict[str, Any]) -> None:
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    create = paths["/v1/jobs"]["post"]
    headers = {p["name"]: p for p in create["parameters"] if p["in"] == "header"}
    assert "Idempotency-Key" in headers and "Prefer" in headers
    # Read from the request on this route, yet documented exactly as the routes that declare the header do.
    batches = paths["/v1/batches"]["post"]["parameters"]
    assert headers["Idempotency-Key"] == next(p for p in batches if p["name"] == "Idempotency-Key")
    assert {"200", "202", "409", "422"} <= set(create["responses"])
    wait = {p["name"]: p for p in paths["/v1/jobs/{job_id}"]["get"]["parameters"]}["wait"]
    assert wait["schema"]["maximum"] == 60
    events = paths["/v1/jobs/{job_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "Last-Event-ID" in {p["name"] for p in events["parameters"]}
    for path in ("/v1/webhook-secret", "/v1/jobs/{job_id}/webhooks", "/v1/webhooks/{delivery_id}/retry"):
        assert path in paths
    schemas = spec["components"]["schemas"]
    assert schemas["JobCreate"]["examples"][0]["webhook_url"].startswith("https://")
    for name in ("JobRead", "WebhookDeliveryRead", "WebhookSecretRead", "WebhookSecretRotate"):
        assert schemas[name]["examples"], name
    assert {"queue_position", "eta_seconds", "webhook"} <= set(schemas["JobRead"]["properties"])
