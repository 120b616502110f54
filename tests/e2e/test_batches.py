"""Batches and retention through real processes (API and worker on PostgreSQL, Redis and S3 over HTTP): a
small batch submitted with the Python client runs to completion and sends one signed `batch.completed`;
a tenant with a short retention sees its job's images deleted by the worker's sweep and the job expire."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from standardwebhooks import Webhook

from client import Client
from tests.conftest import BUCKET
from tests.e2e.conftest import Service, running_service
from tests.receiver import Receiver
from tests.support import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, s3_endpoint: str) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("e2e-batches")
    tenants = data / "tenants.toml"
    # About eleven seconds: long enough to see the job succeed, short enough for the sweep to come by soon.
    tenants.write_text("[tenants.shortlived]\nretention_hours = 0.003\n")
    settings = {"DARKROOM_WEBHOOK_ALLOW_PRIVATE": "true", "DARKROOM_TENANT_POLICY_FILE": str(tenants)}
    with running_service(data, models_dir, s3_endpoint=s3_endpoint, env=settings) as service:
        yield service


def api_key(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def test_a_small_batch_runs_to_completion_with_one_webhook(svc: Service) -> None:
    auth = svc.key("campaign")
    with Receiver() as receiver, Client(svc.url, api_key(auth)) as client:
        batch = client.batch(
            job={"steps": 2, "width": 64, "height": 64, "seed": 11},
            prompts=["a red sneaker", "a blue sneaker", "a green sneaker"],
            webhook_url=f"{receiver.url}/batch",
            metadata={"campaign": "spring"},
            idempotency_key="spring-1",
        )
        assert batch["total"] == 3 and batch["status"] in ("queued", "running")
        done = wait_for(
            lambda: (b := client.get_batch(batch["id"]))["status"] == "completed" and b,
            timeout=180,
            what="batch completed",
        )
        wait_for(lambda: receiver.on("/batch"), timeout=60, what="batch.completed delivered")
        assert done["counts"]["succeeded"] == 3 and done["completed_at"] is not None
        for job in done["jobs"]:
            [output] = job["outputs"]
            assert httpx.get(output["url"], timeout=30).content.startswith(b"\x89PNG")
        assert (
            client.batch(
                job={"steps": 2, "width": 64, "height": 64, "seed": 11},
                prompts=["a red sneaker", "a blue sneaker", "a green sneaker"],
                webhook_url=f"{receiver.url}/batch",
                metadata={"campaign": "spring"},
                idempotency_key="spring-1",
            )["id"]
            == batch["id"]
        )
        assert client.list_batches()["data"][0]["id"] == batch["id"]
        secret = httpx.get(f"{svc.url}/v1/webhook-secret", headers=auth).json()["secret"]
    [call] = receiver.on("/batch")
    payload = Webhook(secret).verify(call.body, call.headers)
    assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch["id"]
    assert payload["data"]["counts"]["succeeded"] == 3 and payload["data"]["metadata"] == {"campaign": "spring"}
    assert json.loads(call.body)["data"]["status"] == "completed"


def test_a_short_retention_expires_the_job_and_deletes_its_images(svc: Service, s3_endpoint: str) -> None:
    auth = svc.key("shortlived")
    with Client(svc.url, api_key(auth)) as client:
        job = client.submit("fleeting", steps=2, width=64, height=64)
        done = client.wait(job["id"], timeout=120)
        assert done["status"] == "succeeded" and len(done["outputs"]) == 1
        assert httpx.get(done["outputs"][0]["url"], timeout=30).status_code == 200
        expired = wait_for(
            lambda: (j := client.get(job["id"]))["status"] == "expired" and j, timeout=60, what="job expired"
        )
    assert expired["outputs"] == [] and expired["request"]["prompt"] == "fleeting"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = svc.env["DARKROOM_STORAGE_URL"].rsplit("/", 1)[1]
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/jobs/{job['id']}/")
    assert listed.get("KeyCount", 0) == 0
    assert httpx.get(done["outputs"][0]["url"], timeout=30).status_code == 404  # the image itself is gone
