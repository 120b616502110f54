"""darkroom as real processes: `darkroom api` and `darkroom worker` on PostgreSQL, Redis and S3 over HTTP."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUCKET
from tests.support import (
    Process,
    create_pg_database,
    delete_redis_prefix,
    drop_pg_database,
    free_port,
    run_cli,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e


class Service:
    def __init__(self, env: dict[str, str], logs: Path):
        self.env = env
        self.logs = logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["DARKROOM_PUBLIC_URL"] = self.url
        self.api: Process | None = None
        self.worker: Process | None = None
        self._workers = 0

    def start_api(self) -> None:
        self.api = Process(["api", "--port", str(self.port), "--log-level", "warning"], self.env, self.logs / "api.log")
        wait_http(f"{self.url}/healthz", proc=self.api)

    def start_worker(self) -> Process:
        self._workers += 1
        self.worker = Process(
            ["worker", "--hostname", f"w{self._workers}@%h", "--log-level", "info"],
            self.env,
            self.logs / f"worker{self._workers}.log",
        )
        # Ready once Celery says so: the reconciler thread starts there too.
        wait_for(lambda: "ready." in self.worker.output() or not self.worker.alive(), timeout=90, what="worker ready")
        assert self.worker.alive(), self.worker.output()[-3000:]
        return self.worker

    def key(self, tenant: str) -> dict[str, str]:
        result = run_cli(["keys", "create", "--tenant", tenant], self.env)
        assert result.returncode == 0, result.stderr
        return {"Authorization": f"Bearer {result.stdout.strip()}"}

    def submit(self, headers: dict[str, str], **body: object) -> dict:
        response = httpx.post(f"{self.url}/v1/jobs", json={"prompt": "e2e", **body}, headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()

    def get(self, headers: dict[str, str], job_id: str) -> dict:
        response = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, headers: dict[str, str], job_id: str, timeout: float = 120, until: tuple[str, ...] = ()) -> dict:
        until = until or ("succeeded", "failed", "canceled")
        return wait_for(
            lambda: (job := self.get(headers, job_id))["status"] in until and job,
            timeout=timeout,
            interval=0.2,
            what=f"job {job_id} in {until}",
        )

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc is not None:
                proc.stop()


@contextlib.contextmanager
def running_service(
    data: Path,
    models_dir: Path,
    *,
    s3_endpoint: str | None = None,
    env: dict[str, str] | None = None,
    kind: type[Service] = Service,
    worker: bool = True,
) -> Iterator[Service]:
    """A migrated private database and Redis prefix, storage (S3 when given an endpoint, else local), the API
    and one worker as processes; all removed afterwards. `env` adds or overrides settings."""
    run_id = uuid.uuid4().hex[:8]
    database, prefix = f"darkroom_e2e_{run_id}", f"darkroom-e2e:{run_id}:"
    base = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(data),
        "HF_HUB_OFFLINE": "1",
        "DARKROOM_DATA_DIR": str(data),
        "DARKROOM_DATABASE_URL": create_pg_database(database),
        "DARKROOM_REDIS_URL": "redis://127.0.0.1:6379/0",
        "DARKROOM_REDIS_PREFIX": prefix,
        "DARKROOM_STORAGE_URL": (data / "storage").as_uri(),
        "DARKROOM_MODEL_CACHE_DIR": str(models_dir),
        "DARKROOM_SECRET_KEY": "e2e-secret",
        "DARKROOM_RECONCILE_INTERVAL": "0.5",
        "DARKROOM_ENV_FILE": "",
    }
    if s3_endpoint is not None:
        base |= {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_EC2_METADATA_DISABLED": "true",
            "DARKROOM_STORAGE_URL": f"s3://{BUCKET}/{run_id}",
            "DARKROOM_S3_ENDPOINT_URL": s3_endpoint,
        }
    svc = kind(base | (env or {}), data)
    try:
        result = run_cli(["migrate"], svc.env)
        assert result.returncode == 0, result.stderr
        svc.start_api()
        if worker:
            svc.start_worker()
        yield svc
    finally:
        svc.stop()
        delete_redis_prefix(prefix)
        drop_pg_database(database)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, s3_endpoint: str) -> Iterator[Service]:
    settings = {"DARKROOM_LEASE_SECONDS": "4", "DARKROOM_PROGRESS_INTERVAL": "0.1"}
    with running_service(tmp_path_factory.mktemp("e2e"), models_dir, s3_endpoint=s3_endpoint, env=settings) as svc:
        yield svc
