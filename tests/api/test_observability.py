"""GET /metrics and the admin routes, in-process (the fault suite checks them against real workers)."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from shared import metrics, workers


def test_metrics_expose_jobs_queues_workers_and_cluster_counters(
    api: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    auth = make_key("acme")
    for _ in range(3):
        assert api.post("/v1/jobs", json={"prompt": "m", "steps": 1}, headers=auth).status_code == 202
    workers.report("host:1", {"id": "host:1", "heartbeat": time.time(), "loaded_models": ["tiny-sd"]}, ttl=30)
    metrics.count("images_total", {"model": "tiny-sd"}, 4)
    metrics.observe("job_queued_seconds", {"model": "tiny-sd"}, 0.3)

    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        'darkroom_jobs_submitted_total{model="tiny-sd"} 3.0',
        'darkroom_queue_depth{queue="model.tiny-sd"} 3.0',
        'darkroom_queue_messages{queue="model.tiny-sd"} 3.0',
        'darkroom_images_total{model="tiny-sd"} 4.0',
        'darkroom_job_queued_seconds_bucket{le="0.5",model="tiny-sd"} 1.0',
        'darkroom_job_queued_seconds_count{model="tiny-sd"} 1.0',
        'darkroom_worker_model_loaded{model="tiny-sd",worker="host:1"} 1.0',
        "darkroom_workers 1.0",
        'darkroom_scrape_errors{source="database"} 0.0',
    ):
        assert line in text, line
    for family in ("darkroom_queue_oldest_age_seconds", "darkroom_rate_limit_refusals", "darkroom_webhook_deliveries"):
        assert f"# TYPE {family}" in text, family


def test_admin_routes_show_workers_and_queues(api: TestClient, make_key: Callable[..., dict[str, str]]) -> None:
    from shared.db import session_scope
    from shared.tenants import create_key

    with session_scope() as session:
        admin = {"Authorization": f"Bearer {create_key(session, 'ops', admin=True)}"}
    api.post("/v1/jobs", json={"prompt": "q", "steps": 1}, headers=make_key("acme"))
    workers.report("host:2", {"id": "host:2", "heartbeat": time.time(), "current_job": "j1"}, ttl=30)

    found = api.get("/v1/admin/workers", headers=admin).json()["data"]
    assert [w["id"] for w in found] == ["host:2"] and found[0]["current_job"] == "j1"
    queues = {q["queue"]: q for q in api.get("/v1/admin/queues", headers=admin).json()["data"]}
    assert queues["model.tiny-sd"]["queued_jobs"] == 1
    assert queues["model.tiny-sd"]["messages"] == 1
    assert queues["model.tiny-sd"]["oldest_queued_age_seconds"] >= 0
