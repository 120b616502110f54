"""Per-model queues with real processes: a worker started for one model's queue never runs another's jobs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.conftest import Service, running_service
from tests.support import Process, wait_for

pytestmark = pytest.mark.e2e

MODELS = """
[models.tiny-a]
source = "builtin:tiny-sd"
default_width = 64
default_height = 64
default_steps = 2

[models.tiny-b]
source = "builtin:tiny-sd"
default_width = 64
default_height = 64
default_steps = 2
"""


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("routing")
    (data / "models.toml").write_text(MODELS)
    settings = {"DARKROOM_MODELS_FILE": str(data / "models.toml"), "DARKROOM_DEFAULT_MODEL": "tiny-a"}
    with running_service(data, models_dir, env=settings, worker=False) as svc:
        yield svc


def start_worker(svc: Service, queues: str, name: str) -> Process:
    proc = Process(
        ["worker", "--queues", queues, "--hostname", f"{name}@%h", "--log-level", "info"],
        svc.env,
        svc.logs / f"{name}.log",
    )
    wait_for(lambda: "ready." in proc.output() or not proc.alive(), timeout=90, what=f"{name} ready")
    assert proc.alive(), proc.output()[-3000:]
    return proc


def test_a_worker_for_one_model_never_takes_another_models_job(two_models: Service) -> None:
    auth = two_models.key("acme")
    only_a = start_worker(two_models, "model.tiny-a", "worker-a")
    try:
        b_jobs = [two_models.submit(auth, model="tiny-b", seed=i) for i in range(3)]
        a_jobs = [two_models.submit(auth, model="tiny-a", seed=i) for i in range(3)]
        for job in a_jobs:
            assert two_models.wait(auth, job["id"])["status"] == "succeeded"
        time.sleep(1.5)  # a few reconciler passes: republishing must not move tiny-b's jobs either
        assert [two_models.get(auth, j["id"])["status"] for j in b_jobs] == ["queued"] * 3
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        assert client.llen(f"{two_models.env['DARKROOM_REDIS_PREFIX']}model.tiny-b") >= 3  # tokens still there
    finally:
        only_a.stop()
    only_b = start_worker(two_models, "model.tiny-b", "worker-b")
    try:
        for job in b_jobs:
            assert two_models.wait(auth, job["id"])["status"] == "succeeded"
    finally:
        only_b.stop()
