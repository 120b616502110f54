"""The fault suite's private infrastructure: its own Redis, PostgreSQL and S3 server, which the tests kill,
stop and restart at will without touching the services other tests share.

A `Cluster` is darkroom as real processes (`darkroom api`, `darkroom worker`) on those private services.
`check_invariants` asserts what every fault test promises: every accepted job ends in a terminal state,
each succeeded job has exactly one set of outputs and exactly those objects in storage, and no job is run
to success twice (its success appears once in all worker logs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.support import Process, free_port, run_cli, wait_for, wait_http

pytestmark = pytest.mark.faults

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BUCKET = "darkroom-faults"
TERMINAL = ("succeeded", "failed", "canceled")


class PrivateRedis:
    """redis-server on a free port, without persistence: a restart comes back empty."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _redis_ping(self.port), timeout=10, what="private redis up")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _redis_ping(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl as the postgres user), stopped and started at will."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="darkroom-faults-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.port = free_port()
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres"])

    def _as_postgres(self, args: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.directory / "data"),
                "-o",
                options,
                "-l",
                str(self.directory / "log"),
                "-w",
                "start",
            ]
        )

    def stop(self) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class PrivateS3:
    """moto's S3 server on a fixed port, stoppable and restartable there (moto keeps its state in-process)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._make = lambda: ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server = self._make()

    def start(self) -> None:
        self.server = self._make()
        self.server.start()
        wait_for(self._up, timeout=10, what="moto up")

    def stop(self) -> None:
        self.server.stop()

    def _up(self) -> bool:
        try:
            httpx.get(self.endpoint, timeout=1)
            return True
        except httpx.HTTPError:
            return False

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    yield pg
    pg.destroy()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_s3() -> Iterator[PrivateS3]:
    s3 = PrivateS3()
    s3.start()
    s3.client().create_bucket(Bucket=BUCKET)
    yield s3
    with contextlib.suppress(Exception):
        s3.stop()


class Cluster:
    """darkroom's API and workers as real processes on the private services."""

    def __init__(self, env: dict[str, str], logs: Path, s3: PrivateS3, prefix: str):
        self.env = env
        self.logs = logs
        self.s3 = s3
        self.prefix = prefix  # storage prefix inside the bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["DARKROOM_PUBLIC_URL"] = self.url
        self.api: Process | None = None
        self.workers: list[Process] = []
        self.accepted: list[str] = []
        self.auth: dict[str, str] = {}

    def start_api(self) -> None:
        self.api = Process(["api", "--port", str(self.port), "--log-level", "warning"], self.env, self.logs / "api.log")
        wait_http(f"{self.url}/healthz", proc=self.api)

    def start_worker(self, wait: bool = True) -> Process:
        n = len(self.workers) + 1
        worker = Process(
            ["worker", "--hostname", f"w{n}@%h", "--log-level", "info"], self.env, self.logs / f"worker{n}.log"
        )
        self.workers.append(worker)
        if wait:
            wait_for(lambda: "ready." in worker.output() or not worker.alive(), timeout=120, what="worker ready")
            assert worker.alive(), worker.output()[-3000:]
        return worker

    def make_key(self, tenant: str = "faults", admin: bool = False) -> dict[str, str]:
        result = run_cli(["keys", "create", "--tenant", tenant, *(["--admin"] if admin else [])], self.env)
        assert result.returncode == 0, result.stderr
        return {"Authorization": f"Bearer {result.stdout.strip()}"}

    def submit(self, prompt: str = "faults", **body: Any) -> str:
        response = httpx.post(f"{self.url}/v1/jobs", json={"prompt": prompt, **body}, headers=self.auth, timeout=30)
        assert response.status_code == 202, response.text
        job_id = str(response.json()["id"])
        self.accepted.append(job_id)
        return job_id

    def get(self, job_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=self.auth, timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, job_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 120) -> dict[str, Any]:
        return dict(
            wait_for(
                lambda: (job := self.get(job_id))["status"] in until and job,
                timeout=timeout,
                interval=0.2,
                what=f"job {job_id} in {until}",
            )
        )

    def wait_all(self, timeout: float = 180) -> dict[str, dict[str, Any]]:
        return {job_id: self.wait(job_id, timeout=timeout) for job_id in self.accepted}

    def rows(self) -> dict[str, dict[str, Any]]:
        engine = create_engine(self.env["DARKROOM_DATABASE_URL"])
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, status, attempts, outputs, error_code, request FROM jobs")).mappings()
            result = {r["id"]: dict(r) for r in rows}
        engine.dispose()
        return result

    def worker_logs(self) -> str:
        return "".join(w.output() for w in self.workers)

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None:
                proc.stop(timeout=30)


def check_invariants(cluster: Cluster) -> dict[str, int]:
    """Assert the promises every fault test makes; return counts for the report."""
    rows = cluster.rows()
    logs = cluster.worker_logs()
    counts = {"submitted": len(cluster.accepted), "lost": 0, "duplicated": 0, "succeeded": 0, "failed": 0}
    for job_id in cluster.accepted:
        row = rows.get(job_id)
        assert row is not None, f"accepted job {job_id} is not in the database"
        assert row["status"] in TERMINAL, f"job {job_id} ended {row['status']}"
        objects = cluster.s3.keys(f"{cluster.prefix}/jobs/{job_id}/")
        successes = len(re.findall(rf"job {job_id} succeeded", logs))
        if row["status"] == "succeeded":
            counts["succeeded"] += 1
            outputs = row["outputs"] if isinstance(row["outputs"], list) else json.loads(row["outputs"])
            assert len(outputs) == row["request"]["num_images"], (job_id, outputs)
            expected = sorted(f"{cluster.prefix}/{o['key']}" for o in outputs)
            assert objects == expected, f"job {job_id}: storage holds {objects}, outputs list {expected}"
            assert successes == 1, f"job {job_id} ran to success {successes} times"
        else:
            counts["failed"] += row["status"] == "failed"
            assert not row["outputs"], f"job {job_id} is {row['status']} but lists outputs"
            assert successes == 0
    return counts


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures, and append them to $DARKROOM_FAULT_REPORT (JSON lines) when it is set."""
    line = {"fault": name, **figures}
    print(f"\nFAULT REPORT {json.dumps(line)}")
    path = os.environ.get("DARKROOM_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.fixture
def make_cluster(
    tmp_path: Path, models_dir: Path, private_pg: PrivatePostgres, private_redis: PrivateRedis, private_s3: PrivateS3
) -> Iterator[Any]:
    clusters: list[Cluster] = []

    def make(**overrides: str) -> Cluster:
        run_id = uuid.uuid4().hex[:8]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_EC2_METADATA_DISABLED": "true",
            "DARKROOM_ENV": "test",
            "DARKROOM_ENV_FILE": "",
            "DARKROOM_TEST_FAULTS": "crash,oom,hang,hang_hard",
            "DARKROOM_DATA_DIR": str(tmp_path / "data"),
            "DARKROOM_DATABASE_URL": private_pg.create_database(f"faults_{run_id}"),
            "DARKROOM_REDIS_URL": private_redis.url,
            "DARKROOM_REDIS_PREFIX": f"faults:{run_id}:",
            "DARKROOM_STORAGE_URL": f"s3://{BUCKET}/{run_id}",
            "DARKROOM_S3_ENDPOINT_URL": private_s3.endpoint,
            "DARKROOM_MODEL_CACHE_DIR": str(models_dir),
            "DARKROOM_SECRET_KEY": "faults-secret",
            "DARKROOM_LEASE_SECONDS": "4",
            "DARKROOM_RECONCILE_INTERVAL": "0.5",
            "DARKROOM_PROGRESS_INTERVAL": "0.1",
            "DARKROOM_WORKER_STATUS_INTERVAL": "1",
            "DARKROOM_DB_CONNECT_TIMEOUT": "2",
            "DARKROOM_DB_POOL_TIMEOUT": "2",
            **overrides,
        }
        result = run_cli(["migrate"], env)
        assert result.returncode == 0, result.stderr
        cluster = Cluster(env, tmp_path, private_s3, run_id)
        clusters.append(cluster)
        cluster.start_api()
        cluster.auth = cluster.make_key()
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
