"""Storing on the encoder processes (worker/store.py): the same objects as the worker would upload itself,
and no lost image when an encoder dies."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.storage import get_storage, output_key
from tests.support import reset_caches
from worker import record, store
from worker.outputs import encode_output
from worker.watermark import has_watermark

REQUEST = {"task": "txt2img", "model": "tiny-sd", "prompt": "a lighthouse", "steps": 3, "guidance_scale": 7, "seed": 5}


@pytest.fixture
def encoders(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DARKROOM_ENCODE_PROCESSES", "2")
    reset_caches()
    yield
    store.shutdown()


def noise(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def job(job_id: str, images: list[Image.Image], request: dict[str, Any] = REQUEST) -> store.ToStore:
    return store.ToStore(job_id, request, images, [False] * len(images), "Euler")


def encode_here(images: list[Image.Image], request: dict[str, Any], job_id: str) -> list[tuple[bytes, bool]]:
    seed = request["seed"]
    encoded = [encode_output(im, request, job_id=job_id, seed=seed + i, sampler="Euler") for i, im in enumerate(images)]
    return [(e.data, e.watermarked) for e in encoded]


def uploaded(outputs: Any) -> list[tuple[bytes, bool]]:
    assert isinstance(outputs, list), outputs
    return [(get_storage().get(o["key"]), o["watermark"]) for o in outputs]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_encoder_processes_upload_what_the_worker_would(encoders: None, fmt: str) -> None:
    request = {**REQUEST, "output_format": fmt, "quality": 90}
    jobs = [job("a", [noise(0), noise(1)], request), job("b", [noise(2)], request)]
    stored = store.store_batch(jobs)
    for one in jobs:
        assert uploaded(stored[one.job_id]) == encode_here(one.images, request, one.job_id)
    extension = "png" if fmt == "png" else "jpg"
    assert [o["key"] for o in stored["a"]] == [output_key("a", 0, extension), output_key("a", 1, extension)]  # type: ignore[union-attr]
    assert [o["seed"] for o in stored["a"]] == [5, 6]  # type: ignore[union-attr]
    assert stored["b"][0]["watermark"] == (fmt == "png")  # type: ignore[index]  # a JPEG this small loses it
    assert store._pool is not None and all(pid != os.getpid() for pid in store._pool._processes)


def torch_loaded() -> bool:
    return "torch" in sys.modules


def test_encoders_are_up_before_the_first_batch_and_never_load_torch(encoders: None) -> None:
    # A worker starts its encoders with its pipeline code (worker/app.py): the first job's images must not
    # wait on a process starting, nor on its importing torch, which the watermark package would pull in
    # (seconds each on a GPU host, where the first full batches were stored 4 to 8 times slower).
    store.start()
    pool = store._pool
    assert pool is not None and len(pool._processes) == store.processes() == 2
    stored = store.store_batch([job("a", [noise(seed) for seed in range(4)])])
    assert all(o["watermark"] for o in stored["a"])  # type: ignore[union-attr]
    assert store._pool is pool
    assert not any(pool.submit(torch_loaded).result() for _ in range(6))


def test_a_killed_encoder_loses_no_image(encoders: None) -> None:
    images = [noise(seed) for seed in range(2)]
    store.store_batch([job("warm", images)])  # starts the pool
    pool = store._pool
    assert pool is not None
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGKILL)
    stored = store.store_batch([job("j", images)])
    assert uploaded(stored["j"]) == encode_here(images, REQUEST, "j")
    assert all(has_watermark(Image.open(BytesIO(data))) for data, _ in uploaded(stored["j"]))
    # The next batch gets a fresh pool, not the broken one.
    store.store_batch([job("k", images)])
    assert store._pool is not None and store._pool is not pool


def test_encoder_processes_record_a_batch_in_the_database(encoders: None) -> None:
    from shared.db import session_scope
    from shared.jobs import get_job
    from shared.scheduling import claim_jobs
    from shared.storage import StorageUnavailable
    from tests.worker.test_batching import submit

    stored_id, lost_id = submit(prompt="kept"), submit(prompt="lost")
    with session_scope() as session:
        claimed = claim_jobs(session, "model.tiny-sd", worker_id="w", lease_seconds=60, max_jobs=2)
    assert {job.id for job in claimed} == {stored_id, lost_id}
    uploaded = store.store_batch([job(stored_id, [noise(0)])])[stored_id]
    outcomes = store.record(
        {stored_id: (1, uploaded), lost_id: (1, StorageUnavailable("storage did not answer"))}, ended_before=[]
    )
    assert outcomes == {stored_id: "succeeded", lost_id: "failed"}
    with session_scope() as session:
        kept, lost = get_job(session, stored_id), get_job(session, lost_id)
        assert (kept.status, kept.outputs) == ("succeeded", uploaded)
        assert (lost.status, lost.error_code, lost.outputs) == ("failed", "storage_unavailable", None)


def claimed_jobs(count: int) -> list[str]:
    """`count` jobs claimed (running, attempt 1) by a worker, in the database."""
    from shared.db import session_scope
    from shared.scheduling import claim_jobs
    from tests.worker.test_batching import submit

    ids = [submit(prompt=f"job {i}", seed=i) for i in range(count)]
    with session_scope() as session:
        claimed = claim_jobs(session, "model.tiny-sd", worker_id="w", lease_seconds=60, max_jobs=count)
    assert {job.id for job in claimed} == set(ids)
    return ids


@pytest.mark.parametrize("spare_here", [False, True])
def test_encoders_store_and_record_whole_jobs_each(encoders: None, spare_here: bool) -> None:
    # Three jobs on two encoders (and this thread, when nothing generates): each job's images all uploaded,
    # the same as the worker would make them, and each job succeeded with exactly its own outputs.
    from shared.db import session_scope
    from shared.jobs import get_job

    ids = claimed_jobs(3)
    images = {job_id: [noise(10 * i + k) for k in range(i + 1)] for i, job_id in enumerate(ids)}
    jobs = [store.ToStore(j, REQUEST, images[j], [False] * len(images[j]), "Euler", attempt=1) for j in ids]
    outcomes = store.store_and_record(jobs, ended_before=[], spare_here=spare_here)
    assert outcomes == dict.fromkeys(ids, "succeeded")
    with session_scope() as session:
        for job_id in ids:
            record = get_job(session, job_id)
            assert record.status == "succeeded"
            assert uploaded(record.outputs) == encode_here(images[job_id], REQUEST, job_id)


def test_a_killed_encoder_loses_no_job_stored_whole(encoders: None) -> None:
    from shared.db import session_scope
    from shared.jobs import get_job

    store.start()
    pool = store._pool
    assert pool is not None
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGKILL)
    ids = claimed_jobs(2)
    jobs = [store.ToStore(j, REQUEST, [noise(i)], [False], "Euler", attempt=1) for i, j in enumerate(ids)]
    assert store.store_and_record(jobs, ended_before=[]) == dict.fromkeys(ids, "succeeded")
    with session_scope() as session:
        assert all(get_job(session, job_id).status == "succeeded" for job_id in ids)
    assert store._pool is not pool


def test_encoders_yield_the_cpu_to_the_generating_process(encoders: None) -> None:
    store.start()
    pool = store._pool
    assert pool is not None
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result() == mine + store.ENCODER_NICENESS


def test_recording_a_batch_records_its_metrics(darkroom_env: dict[str, Any]) -> None:
    # Succeeded jobs are counted from what their UPDATE returned; one whose uploads gave up, read back.
    from shared import metrics
    from shared.storage import StorageUnavailable

    kept, also, lost = claimed_jobs(3)
    one = [{"key": "k", "width": 64, "height": 48, "seed": 1, "content_type": "image/png", "nsfw": False}]
    stored = {kept: (1, one), also: (1, one + one), lost: (1, StorageUnavailable("storage did not answer"))}
    assert record.record_batch(stored, ended_before=[]) == {kept: "succeeded", also: "succeeded", lost: "failed"}
    samples = {(name, tuple(sorted(labels.items()))): value for name, labels, value in metrics.read_all()}
    model = (("model", "tiny-sd"),)
    assert samples[("images_total", model)] == 3
    assert samples[("job_queued_seconds_count", model)] == 3
    assert samples[("job_running_seconds_count", (("model", "tiny-sd"), ("status", "succeeded")))] == 2
    assert samples[("job_running_seconds_count", (("model", "tiny-sd"), ("status", "failed")))] == 1
