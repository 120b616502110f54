"""Several models warm within a memory budget: least recently used out first, too-large models refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shared.db import session_scope
from shared.jobs import get_job
from shared.registry import ModelSpec
from tests.worker.test_batching import submit
from worker import tasks
from worker.pipelines import ModelTooLarge, PipelineCache, pipeline_bytes


def spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, source="builtin:tiny-sd")


@pytest.fixture
def tiny_bytes(darkroom_env: dict[str, Any]) -> int:
    return pipeline_bytes(PipelineCache(torch.device("cpu")).get(spec("probe")))


def test_the_least_recently_used_model_is_evicted(tiny_bytes: int) -> None:
    cache = PipelineCache(torch.device("cpu"), budget_bytes=int(tiny_bytes * 2.5))  # room for two
    a = cache.get(spec("a"))
    cache.get(spec("b"))
    assert cache.get(spec("a")) is a  # a hit, and now b is the least recently used
    cache.get(spec("c"))
    assert cache.loaded == ["a", "c"]
    assert cache.used_bytes == 2 * tiny_bytes <= cache.budget_bytes


def test_without_a_budget_every_model_stays(tiny_bytes: int) -> None:
    cache = PipelineCache(torch.device("cpu"))
    for name in "abc":
        cache.get(spec(name))
    assert cache.loaded == ["a", "b", "c"]


def test_a_model_larger_than_the_budget_is_refused(tiny_bytes: int) -> None:
    cache = PipelineCache(torch.device("cpu"), budget_bytes=tiny_bytes // 2)
    with pytest.raises(ModelTooLarge, match="DARKROOM_MODEL_MEMORY_MB"):
        cache.get(spec("a"))
    with pytest.raises(ModelTooLarge):  # remembered: not loaded again to find out
        cache.get(spec("a"))
    assert cache.loaded == []


def test_a_job_for_a_too_large_model_fails_with_a_code(tiny_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "_cache", PipelineCache(torch.device("cpu"), budget_bytes=tiny_bytes // 2))
    job_id = submit()
    assert tasks.run_job(job_id) == "failed"
    with session_scope() as session:
        job = get_job(session, job_id)
    assert job.status == "failed" and job.error_code == "model_too_large"
    assert "budget" in (job.error_message or "")
    monkeypatch.setattr(tasks, "_cache", None)  # the worker goes on with the next job
    assert tasks.run_job(submit()) == "succeeded"


def test_a_jobs_pipeline_is_built_once_per_task_and_scheduler_and_goes_with_its_model(tiny_bytes: int) -> None:
    import gc
    import weakref

    from worker.variants import prepare_pipeline

    cache = PipelineCache(torch.device("cpu"), budget_bytes=int(tiny_bytes * 1.5))  # room for one
    base = cache.get(spec("a"))
    plain = prepare_pipeline(base, {"task": "txt2img"})
    assert prepare_pipeline(base, {"task": "txt2img", "loras": []}) is plain
    ddim = prepare_pipeline(base, {"task": "txt2img", "scheduler": "ddim"})
    assert ddim is not plain and type(ddim.scheduler).__name__ == "DDIMScheduler"
    assert type(prepare_pipeline(base, {"task": "txt2img"}).scheduler) is type(base.scheduler)
    assert prepare_pipeline(base, {"task": "img2img"}) is not plain
    # Evicting the model frees what was built over it: nothing else holds its modules.
    gone = weakref.ref(plain.unet)
    del base, plain, ddim
    cache.get(spec("b"))
    gc.collect()
    assert cache.loaded == ["b"] and gone() is None
