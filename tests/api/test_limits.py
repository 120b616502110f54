"""Priorities and per-tenant limits over HTTP: what a tenant sends, what it is refused, what /v1/usage says."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.db import session_scope
from shared.scheduling import claim_jobs
from shared.tenant_config import reset_tenant_config
from shared.tenants import create_key
from tests.support import free_port, reset_caches

TENANTS = """
[tenants.chatty]
rate_per_minute = 4

[tenants.capped]
max_running = 1

[tenants.acme]
max_queued = 2
images_per_period = 5
quota_period = "hour"
max_priority = "normal"
"""


@pytest.fixture
def limited(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[TestClient]:
    """The API with acme limited by the tenant file and everyone else by the defaults (unlimited)."""
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(path))
    reset_caches()
    reset_tenant_config()
    from api.app import create_app

    with TestClient(create_app()) as client:
        yield client


def submit(api: TestClient, auth: dict[str, str], **body: Any) -> Any:
    return api.post("/v1/jobs", json={"prompt": "a lighthouse", "steps": 1, **body}, headers=auth)


def usage(api: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    response = api.get("/v1/usage", headers=auth)
    assert response.status_code == 200, response.text
    return dict(response.json()["limits"])


def test_priority_is_accepted_shown_and_claimed_first(api: TestClient, auth: dict[str, str]) -> None:
    normal = submit(api, auth).json()
    high = submit(api, auth, priority="high").json()
    low = submit(api, auth, priority="low").json()
    assert (normal["priority"], high["priority"], low["priority"]) == ("normal", "high", "low")
    assert api.get(f"/v1/jobs/{high['id']}", headers=auth).json()["priority"] == "high"
    order = []
    for _ in range(3):
        with session_scope() as session:
            order += [j.id for j in claim_jobs(session, "model.tiny-sd", worker_id="w", lease_seconds=30)]
    assert order == [high["id"], normal["id"], low["id"]]
    refused = submit(api, auth, priority="urgent")
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("priority:")


def test_a_priority_above_the_tenants_maximum_is_a_422_naming_priority(
    limited: TestClient, make_key: Callable[[str], dict[str, str]]
) -> None:
    acme = make_key("acme")
    refused = submit(limited, acme, priority="high")
    assert refused.status_code == 422
    assert refused.json()["error"] == {
        "code": "priority_not_allowed",
        "message": "priority: 'high' is above this tenant's maximum priority 'normal'",
    }
    assert limited.get("/v1/usage", headers=acme).json()["max_priority"] == "normal"
    assert submit(limited, make_key("globex"), priority="high").status_code == 202  # the default: high allowed


def test_the_request_rate_refuses_with_retry_after_and_usage_shows_it(
    limited: TestClient, make_key: Callable[[str], dict[str, str]]
) -> None:
    chatty = make_key("chatty")
    answers = [limited.get("/v1/jobs", headers=chatty) for _ in range(6)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 429, 429]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    requests = usage(limited, chatty)["requests"]  # /v1/usage itself is not counted, and not refused
    assert (requests["limit"], requests["used"], requests["remaining"]) == (4, 4, 0)
    assert requests["resets_at"] is not None
    assert limited.get("/v1/jobs", headers=make_key("globex")).status_code == 200  # another tenant is unaffected
    metrics = limited.get("/metrics").text
    assert 'darkroom_rate_limit_refusals_total{limit="requests"} 2.0' in metrics


def test_polls_of_a_job_count_against_the_rate_and_are_refused_before_any_lookup(
    limited: TestClient, make_key: Callable[[str], dict[str, str]]
) -> None:
    chatty = make_key("chatty")
    job_id = submit(limited, chatty).json()["id"]
    polls = [limited.get(f"/v1/jobs/{job_id}", headers=chatty) for _ in range(3)]
    assert [p.status_code for p in polls] == [200, 200, 200]
    assert polls[-1].json()["queue_position"] == 0
    refused = limited.get("/v1/jobs/no-such-job", headers=chatty)  # the fifth request: 429 comes before 404
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"


def test_the_queued_jobs_limit_frees_up_as_jobs_leave_the_queue(
    limited: TestClient, make_key: Callable[[str], dict[str, str]]
) -> None:
    acme = make_key("acme")
    first, second = submit(limited, acme).json(), submit(limited, acme).json()
    refused = submit(limited, acme)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_queued_jobs"
    assert int(refused.headers["Retry-After"]) >= 1
    assert len(limited.get("/v1/jobs", headers=acme).json()["data"]) == 2  # the refused job left nothing behind
    queued = usage(limited, acme)["queued_jobs"]
    assert (queued["limit"], queued["used"], queued["remaining"]) == (2, 2, 0)
    assert limited.post(f"/v1/jobs/{first['id']}/cancel", headers=acme).status_code == 200
    assert submit(limited, acme).status_code == 202
    assert second["status"] == "queued"


def test_the_images_quota_counts_images_and_refuses_until_the_period_resets(
    limited: TestClient, make_key: Callable[[str], dict[str, str]]
) -> None:
    acme = make_key("acme")
    assert submit(limited, acme, num_images=3).status_code == 202
    assert submit(limited, acme, num_images=99).status_code == 422  # invalid: charges nothing
    refused = submit(limited, acme, num_images=3)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "images_quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    assert submit(limited, acme, num_images=2).status_code == 202  # exactly the quota's 5 images
    images = usage(limited, acme)["images"]
    assert (images["limit"], images["used"], images["remaining"]) == (5, 5, 0)
    assert images["resets_at"].endswith(":00:00Z")  # hourly periods start on the hour


def test_a_refused_submit_gives_its_images_back(limited: TestClient, make_key: Callable[[str], dict[str, str]]) -> None:
    acme = make_key("acme")
    submit(limited, acme, num_images=1), submit(limited, acme, num_images=1)
    assert submit(limited, acme, num_images=1).status_code == 429  # queued jobs limit, after the quota charge
    assert usage(limited, acme)["images"]["used"] == 2


def test_a_batch_counts_against_the_limits_as_its_jobs_would(
    limited: TestClient, make_key: Callable[[str], dict[str, str]]
) -> None:
    acme = make_key("acme")  # at most 2 queued, 5 images an hour, priority up to normal

    def batch(prompts: list[str], **job: Any) -> Any:
        return limited.post("/v1/batches", json={"job": {"steps": 1, **job}, "prompts": prompts}, headers=acme)

    too_many = batch(["a", "b", "c"])
    assert too_many.status_code == 429 and too_many.json()["error"]["code"] == "too_many_queued_jobs"
    assert limited.get("/v1/jobs", headers=acme).json()["data"] == []  # all or nothing
    assert usage(limited, acme)["images"]["used"] == 0  # and its images given back
    over_quota = batch(["a", "b"], num_images=3)
    assert over_quota.status_code == 429 and over_quota.json()["error"]["code"] == "images_quota_exceeded"
    refused = batch(["a", "b"], priority="high")
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("job.priority:")
    made = batch(["a", "b"], num_images=2, priority="low")
    assert made.status_code == 202, made.text
    assert [job["priority"] for job in made.json()["jobs"]] == ["low", "low"]
    assert usage(limited, acme)["images"]["used"] == 4


def test_usage_of_an_unlimited_tenant(api: TestClient, auth: dict[str, str]) -> None:
    submit(api, auth, num_images=2)
    limits = usage(api, auth)
    assert set(limits) == {"requests", "queued_jobs", "running_jobs", "images"}
    assert all(entry["limit"] is None and entry["remaining"] is None for entry in limits.values())
    assert limits["queued_jobs"]["used"] == 1
    assert api.get("/v1/usage").status_code == 401


def test_usage_shows_running_jobs_against_the_cap(
    limited: TestClient, make_key: Callable[[str], dict[str, str]]
) -> None:
    capped = make_key("capped")
    submit(limited, capped), submit(limited, capped)
    for _ in range(2):  # two free workers; the cap lets one job run
        with session_scope() as session:
            claim_jobs(session, "model.tiny-sd", worker_id="w", lease_seconds=30)
    limits = usage(limited, capped)
    assert {k: limits["running_jobs"][k] for k in ("limit", "used", "remaining")} == {
        "limit": 1,
        "used": 1,
        "remaining": 0,
    }
    assert limits["queued_jobs"]["used"] == 1


def test_a_bad_tenant_file_stops_the_api_at_start(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.acme]\nmax_running = "four"\n')
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(path))
    reset_caches()
    reset_tenant_config()
    from api.app import create_app

    with pytest.raises(ValueError, match="tenant 'acme': max_running must be a whole number"):
        create_app()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_with_redis_unreachable_rate_and_quota_let_requests_through(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The database still takes jobs while Redis is down (the reconciler publishes them later); the
    # counters that live in Redis must not turn that into an outage.
    path = tmp_path / "tenants.toml"
    path.write_text("[tenants.acme]\nrate_per_minute = 1\nimages_per_period = 1\n")
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(path))
    monkeypatch.setenv("DARKROOM_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    reset_caches()
    reset_tenant_config()
    from api.app import create_app

    with session_scope() as session:
        acme = {"Authorization": f"Bearer {create_key(session, 'acme')}"}
    with TestClient(create_app()) as api:
        assert [submit(api, acme, num_images=2).status_code for _ in range(2)] == [202, 202]
        assert api.get("/v1/usage", headers=acme).status_code == 503
