"""DELETE /v1/jobs/{id}: a finished job's images are deleted at once and the job reads `expired`; a job
that may still write images is refused until it is canceled."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi.testclient import TestClient

from shared.storage import get_storage
from tests.shared.test_retention import run_to_success


def fetch(api: TestClient, url: str) -> int:
    parts = urlsplit(url)
    return api.get(f"{parts.path}?{parts.query}").status_code


def test_delete_removes_the_images_and_keeps_the_record(api: TestClient, auth: dict[str, str]) -> None:
    job = api.post("/v1/jobs", json={"prompt": "a lighthouse", "seed": 3}, headers=auth).json()
    run_to_success(get_storage(), job["id"])
    [output] = api.get(f"/v1/jobs/{job['id']}", headers=auth).json()["outputs"]
    assert fetch(api, output["url"]) == 200

    response = api.delete(f"/v1/jobs/{job['id']}", headers=auth)
    assert response.status_code == 200, response.text
    deleted = response.json()
    assert (deleted["status"], deleted["outputs"], deleted["request"]["seed"]) == ("expired", [], 3)
    assert api.get(f"/v1/jobs/{job['id']}", headers=auth).json() == deleted
    assert fetch(api, output["url"]) == 404  # the URL handed out before no longer serves the image
    assert list((get_storage().root).rglob("*.png")) == []  # type: ignore[union-attr]
    assert [j["id"] for j in api.get("/v1/jobs?status=expired", headers=auth).json()["data"]] == [job["id"]]
    # Repeating it changes nothing.
    again = api.delete(f"/v1/jobs/{job['id']}", headers=auth)
    assert again.status_code == 200 and again.json()["status"] == "expired"
    # An expired job is over: it cannot be canceled, and a long poll answers at once.
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 409
    assert api.get(f"/v1/jobs/{job['id']}?wait=30", headers=auth).json()["status"] == "expired"


def test_a_queued_job_must_be_canceled_before_it_is_deleted(api: TestClient, auth: dict[str, str]) -> None:
    job = api.post("/v1/jobs", json={"prompt": "p"}, headers=auth).json()
    refused = api.delete(f"/v1/jobs/{job['id']}", headers=auth)
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "job_not_finished" and "cancel it first" in error["message"]
    assert api.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "queued"

    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 200
    assert api.delete(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "expired"
