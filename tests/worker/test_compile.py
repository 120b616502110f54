"""A compiled model serves before it is warm (worker/acceleration.py): the first call of a freshly loaded
model runs eagerly, its configured shapes compile right after, and later calls run the compiled graphs.

torch.compile runs for real here (TorchDynamo traces the tiny UNet), with a recording backend in place of
inductor: it counts what is compiled and what runs compiled, which is what these tests are about, and
spares the 2-core CI machine inductor's code generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from shared.registry import get_registry
from tests.support import reset_caches
from tests.worker.test_batching import load, submit
from worker import acceleration, batching, tasks
from worker.pipelines import PipelineCache


class Recorder:
    """A torch.compile backend: each graph compiled, and each run of a compiled graph, goes in `events`."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.broken = False  # compiling fails, as inductor would without a working compiler

    def __call__(self, graph: torch.fx.GraphModule, _inputs: list[Any]) -> Callable[..., Any]:
        self.events.append("compile")
        if self.broken:
            raise RuntimeError("no compiler here")

        def run(*args: Any) -> Any:
            self.events.append("compiled run")
            return graph.forward(*args)

        return run

    def count(self, event: str) -> int:
        return self.events.count(event)


@pytest.fixture
def recorder(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder()
    monkeypatch.setenv("DARKROOM_COMPILE", "1")
    monkeypatch.setenv("DARKROOM_COMPILE_SHAPES", "64x48x1,64x48x2")
    reset_caches()
    monkeypatch.setattr(acceleration, "COMPILE_OPTIONS", {"backend": recorder, "dynamic": False})
    monkeypatch.setattr(tasks, "_cache", PipelineCache(torch.device("cpu")))  # a fresh load, compiled
    yield recorder
    torch._dynamo.reset()


def test_a_fresh_models_first_call_runs_eagerly_and_its_shapes_compile_after(recorder: Recorder) -> None:
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    assert acceleration.runs_eager(pipe) and acceleration.cold()
    prompt: dict[str, Any] = {"prompt": "a lighthouse", "width": 64, "height": 48, "num_inference_steps": 2}
    with acceleration.cold_stance(pipe), torch.inference_mode():
        pipe(**prompt, output_type="latent")
    assert recorder.events == []  # eager: nothing compiled, nothing ran compiled

    acceleration.warm_cold()
    assert not acceleration.runs_eager(pipe) and not acceleration.cold()
    compiled = recorder.count("compile")
    assert compiled >= 2  # at least a graph per shape: 1 and 2 images (2 and 4 UNet rows with guidance)

    for images in (1, 2):  # the warmed shapes run compiled, with no new compilation
        runs = recorder.count("compiled run")
        with acceleration.cold_stance(pipe), torch.inference_mode():
            pipe(**prompt, num_images_per_prompt=images, output_type="latent")
        assert recorder.count("compile") == compiled
        assert recorder.count("compiled run") > runs


def test_a_model_whose_shapes_fail_to_compile_goes_on_eagerly(recorder: Recorder) -> None:
    recorder.broken = True
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    acceleration.warm_cold()  # logs the failure
    assert not acceleration.cold() and acceleration.runs_eager(pipe)
    tried = recorder.count("compile")
    with acceleration.cold_stance(pipe), torch.inference_mode():
        images = pipe(prompt="a lighthouse", width=64, height=48, num_inference_steps=2).images
    assert len(images) == 1 and recorder.count("compile") == tried  # served, not compiled again


def test_a_fresh_worker_serves_its_first_job_before_compiling_then_runs_compiled(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    generate = batching.generate_batch

    def noted(pipe: Any, requests: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        recorder.events.append("call")
        calls.append(kwargs.get("pad_to", 0))
        try:
            return generate(pipe, requests, *args, **kwargs)
        finally:
            recorder.events.append("call ended")

    monkeypatch.setattr(batching, "generate_batch", noted)
    first = submit(steps=2)
    assert tasks.run_job(first) == "succeeded"
    assert load(first).status == "succeeded"
    # The job's call came first, eager and unpadded; then its shapes compiled, in the same task.
    assert recorder.events[:3] == ["call", "call ended", "compile"]
    assert recorder.count("compile") >= 2 and calls == [0]

    # Two jobs of one image make a call of two, a warmed shape: it runs compiled, compiling nothing new,
    # through the pipeline built for the first job while the model was cold.
    compiled, runs = recorder.count("compile"), recorder.count("compiled run")
    second, third = submit(steps=2, seed=2), submit(steps=2, seed=3)
    assert tasks.run_job(second) == "succeeded"
    assert load(second).status == load(third).status == "succeeded"
    assert calls == [0, 2]
    assert recorder.count("compile") == compiled and recorder.count("compiled run") > runs
