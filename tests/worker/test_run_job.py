"""The `jobs.run` task in-process, on the real tiny pipeline, real Redis and both databases."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared import broker
from shared.db import session_scope
from shared.jobs import cancel_job, claim_job, create_job, get_job
from shared.storage import get_storage
from shared.tenants import get_or_create_tenant
from worker import tasks


def submit(**overrides: Any) -> tuple[str, str]:
    request = {
        "task": "txt2img",
        "model": "tiny-sd",
        "prompt": "a lighthouse",
        "negative_prompt": None,
        "width": 64,
        "height": 48,
        "steps": 3,
        "guidance_scale": 7.0,
        "seed": 7,
        "num_images": 2,
        **overrides,
    }
    with session_scope() as session:
        tenant = get_or_create_tenant(session, "acme")
        job = create_job(
            session, tenant_id=tenant.id, model=request["model"], queue="model.tiny-sd", request=request, metadata=None
        )
    return job.id, tenant.id


def pixels(job_id: str) -> list[np.ndarray]:
    storage = get_storage()
    with session_scope() as session:
        outputs = get_job(session, job_id).outputs or []
    images = []
    for output in outputs:
        path = storage.path(output["key"])  # type: ignore[union-attr]
        images.append(np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")))
    return images


def test_a_job_runs_to_success_with_one_png_per_image(darkroom_env: dict[str, Any]) -> None:
    job_id, _ = submit()
    assert tasks.run_job(job_id) == "succeeded"
    with session_scope() as session:
        job = get_job(session, job_id)
    assert job.status == "succeeded" and job.attempts == 1
    assert job.progress_step == job.progress_total == 3
    assert [(o["width"], o["height"], o["seed"]) for o in job.outputs or []] == [(64, 48, 7), (64, 48, 8)]
    images = pixels(job_id)
    assert [img.shape for img in images] == [(48, 64, 3)] * 2
    assert not np.array_equal(images[0], images[1])  # each image has its own seed


def test_the_same_seed_gives_the_same_pixels(darkroom_env: dict[str, Any]) -> None:
    first, _ = submit(seed=99, num_images=1)
    # Image 1 of a job seeded 98 uses seed 99: the same pixels as image 0 of a job seeded 99.
    second, _ = submit(seed=98, num_images=2)
    tasks.run_job(first)
    tasks.run_job(second)
    np.testing.assert_array_equal(pixels(first)[0], pixels(second)[1])


def test_a_duplicate_message_runs_nothing(darkroom_env: dict[str, Any]) -> None:
    job_id, _ = submit(num_images=1)
    assert tasks.run_job(job_id) == "succeeded"
    assert tasks.run_job(job_id) == "skipped"
    with session_scope() as session:
        assert get_job(session, job_id).attempts == 1


def test_a_cancel_flag_stops_the_job_before_any_output(darkroom_env: dict[str, Any]) -> None:
    job_id, tenant_id = submit(steps=20)
    broker.request_cancel(job_id)
    assert tasks.run_job(job_id) == "stopped"
    with session_scope() as session:
        cancel_job(session, job_id, tenant_id)
        job = get_job(session, job_id)
    assert job.status == "canceled" and not job.outputs
    assert not get_storage().path(f"jobs/{job_id}").exists()  # type: ignore[union-attr]


def test_a_job_canceled_in_the_database_stops_once_a_progress_write_finds_it(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, tenant_id = submit(steps=20)
    hook_calls = []

    original = tasks.StepHook.__call__

    def cancel_at_step_2(self: tasks.StepHook, step: int, total: int) -> None:
        hook_calls.append(step)
        if step == 2:
            with session_scope() as session:
                cancel_job(session, job_id, tenant_id)  # as the API does, but with no Redis flag
        original(self, step, total)
        time.sleep(0.02)  # steps of a real model: the write beside them returns within a few

    monkeypatch.setattr(tasks.StepHook, "__call__", cancel_at_step_2)
    assert tasks.run_job(job_id) == "stopped"
    # Step 2's write (beside the call) finds the job canceled; a following step drops it, long before 20.
    assert hook_calls[:3] == [1, 2, 3] and len(hook_calls) < 10
    with session_scope() as session:
        assert get_job(session, job_id).status == "canceled"


def test_a_job_claimed_elsewhere_is_skipped(darkroom_env: dict[str, Any]) -> None:
    job_id, _ = submit()
    with session_scope() as session:
        assert claim_job(session, job_id, worker_id="other", lease_seconds=30)
    assert tasks.run_job(job_id) == "skipped"


def test_an_unknown_model_fails_the_job_with_a_code(darkroom_env: dict[str, Any]) -> None:
    job_id, _ = submit(model="gone")
    assert tasks.run_job(job_id) == "failed"
    with session_scope() as session:
        job = get_job(session, job_id)
    assert job.status == "failed" and job.error_code == "unknown_model"
