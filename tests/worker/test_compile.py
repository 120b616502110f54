"""A compiled model serves before it is warm (worker/acceleration.py): a call runs compiled only at a shape
already warmed, and eagerly otherwise; the listed shapes are warmed one at a time between batches.

torch.compile runs for real here (TorchDynamo traces the tiny UNet and VAE decode), with recording backends
in place of inductor: they count what is compiled and what runs compiled, which is what these tests are
about, and spare the 2-core CI machine inductor's code generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from shared.registry import get_registry
from tests.support import reset_caches
from tests.worker.test_batching import load, submit
from worker import acceleration, batching, tasks
from worker.generate import generate_batch
from worker.pipelines import PipelineCache
from worker.variants import prepare_pipeline


class Recorder:
    """A torch.compile backend: each graph compiled, and each run of a compiled graph, goes in `events`
    (those of the VAE's decode named so, beside the UNet's)."""

    def __init__(self, events: list[str] | None = None, prefix: str = "") -> None:
        self.events: list[str] = [] if events is None else events
        self.prefix = prefix
        self.broken = False  # compiling fails, as inductor would without a working compiler

    def __call__(self, graph: torch.fx.GraphModule, _inputs: list[Any]) -> Callable[..., Any]:
        self.events.append(self.prefix + "compile")
        if self.broken:
            raise RuntimeError("no compiler here")

        def run(*args: Any) -> Any:
            self.events.append(self.prefix + "compiled run")
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
    decoder = Recorder(recorder.events, prefix="decode ")
    monkeypatch.setattr(acceleration, "DECODE_COMPILE_OPTIONS", {"backend": decoder, "dynamic": False})
    monkeypatch.setattr(tasks, "_cache", PipelineCache(torch.device("cpu")))  # a fresh load, compiled
    yield recorder
    torch._dynamo.reset()


def call(pipe: Any, images: int, width: int = 64, height: int = 48, guidance: float = 7.5) -> None:
    with acceleration.stance(pipe, width, height, images, guidance), torch.inference_mode():
        pipe(
            "a lighthouse",
            width=width,
            height=height,
            num_inference_steps=2,
            num_images_per_prompt=images,
            guidance_scale=guidance,
        )


def test_a_fresh_model_runs_eagerly_until_each_shape_is_warmed_one_at_a_time(recorder: Recorder) -> None:
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    assert acceleration.cold() and not acceleration.compiled_at(pipe, 64, 48, 1, 7.5)
    call(pipe, 1)
    assert recorder.events == []  # eager: nothing compiled, nothing ran compiled

    acceleration.warm_next()  # the first listed shape: one image
    compiled = recorder.count("compile")
    assert compiled > 0 and acceleration.cold()
    assert acceleration.compiled_at(pipe, 64, 48, 1, 7.5) and not acceleration.compiled_at(pipe, 64, 48, 2, 7.5)
    runs = recorder.count("compiled run")
    call(pipe, 1)
    assert recorder.count("compile") == compiled and recorder.count("compiled run") > runs
    runs = recorder.count("compiled run")
    call(pipe, 2)  # listed, not warmed yet: eager, not compiled in the call
    call(pipe, 1, width=48)  # not listed at all: eager
    call(pipe, 1, guidance=1.0)  # listed, but without guidance the UNet takes half the rows: eager
    assert recorder.count("compile") == compiled and recorder.count("compiled run") == runs

    acceleration.warm_next()  # two images
    assert not acceleration.cold() and acceleration.compiled_at(pipe, 64, 48, 2, 7.5)
    compiled = recorder.count("compile")
    call(pipe, 2)
    assert recorder.count("compile") == compiled and recorder.count("compiled run") > runs


def test_a_model_whose_shapes_fail_to_compile_goes_on_eagerly(recorder: Recorder) -> None:
    recorder.broken = True
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    acceleration.warm_next()  # logs the failure
    assert not acceleration.cold() and not acceleration.compiled_at(pipe, 64, 48, 1, 7.5)
    tried = recorder.count("compile")
    call(pipe, 1)
    call(pipe, 2)
    assert recorder.count("compile") == tried  # served eagerly, not compiled again


def test_a_fresh_worker_serves_each_batch_before_warming_its_next_shape(
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
    # The job's call came first, eager and unpadded; then the first listed shape compiled, in the same task.
    assert recorder.events[:3] == ["call", "call ended", "compile"] and calls == [0]

    # Two jobs of one image: their shape is listed but not warm yet, so they run eagerly, and it warms after.
    compiled = recorder.count("compile")
    jobs = [submit(steps=2, seed=2), submit(steps=2, seed=3)]
    assert tasks.run_job(jobs[0]) == "succeeded"
    assert calls == [0, 0] and recorder.count("compile") > compiled
    # Now both shapes are warm: calls are padded to them and run compiled, compiling nothing new, through
    # the pipeline built for the first job while the model was cold.
    compiled, runs = recorder.count("compile"), recorder.count("compiled run")
    decoded = recorder.count("decode compiled run")
    jobs += [submit(steps=2, seed=4), submit(steps=2, seed=5)]
    assert tasks.run_job(jobs[2]) == "succeeded"
    assert tasks.run_job(submit(steps=2, seed=6)) == "succeeded"
    assert calls == [0, 0, 2, 1]
    assert recorder.count("compile") == compiled and recorder.count("compiled run") > runs
    assert recorder.count("decode compiled run") == decoded + 2  # and decoded compiled
    assert all(load(job_id).status == "succeeded" for job_id in jobs)


def pixels(pipe: Any, images: int = 1) -> np.ndarray:
    with acceleration.stance(pipe, 64, 48, images, 7.5), torch.inference_mode():
        return pipe(
            "a lighthouse",
            width=64,
            height=48,
            num_inference_steps=2,
            num_images_per_prompt=images,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
        ).images


def test_a_warmed_shape_decodes_compiled_to_the_pixels_of_the_vaes_own_decode(recorder: Recorder) -> None:
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    eager = pixels(pipe)
    assert recorder.events == []

    acceleration.warm_next()  # one image: the UNet's graphs, then the decode's
    compiled = recorder.count("decode compile")
    assert compiled > 0 and recorder.count("decode compiled run") == 1
    np.testing.assert_allclose(pixels(pipe), eager, atol=1e-6)
    assert recorder.count("decode compile") == compiled and recorder.count("decode compiled run") == 2
    assert "decode" not in vars(pipe.vae)  # after the call, the VAE's own decode again

    pixels(pipe, images=2)  # a shape not warmed yet decodes eagerly, compiling nothing
    assert recorder.count("decode compile") == compiled and recorder.count("decode compiled run") == 2


def test_a_shape_that_decodes_in_tiles_compiles_the_unet_alone(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiling is switched per call, by size: a tiled decode at a warmed shape would be a new graph mid-job.
    tiling_pixels = 64 * 48 - 1
    monkeypatch.setenv("DARKROOM_VAE_TILING_PIXELS", str(tiling_pixels))
    reset_caches()
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    acceleration.warm_next()
    assert recorder.count("compile") > 0 and acceleration.compiled_at(pipe, 64, 48, 1, 7.5)

    runs = recorder.count("compiled run")
    acceleration.configure_vae(pipe, 64, 48, tiling_pixels)  # as each call does
    call(pipe, 1)
    assert recorder.count("compiled run") > runs
    assert recorder.count("decode compile") == 0 and recorder.count("decode compiled run") == 0


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_a_warmed_shape_runs_every_task_and_scheduler_on_the_graphs_warmed_for_it(
    recorder: Recorder, model: str
) -> None:
    # A graph is guarded on its inputs' memory layout and dtypes, and a guard that fails compiles anew in the
    # middle of a job (minutes on a GPU). The modules go channels_last as `prepare` puts them on a GPU: there,
    # an image task's latents come from the VAE's encoder in that layout, text-to-image's from contiguous
    # noise. DDIM and the DPM solvers step with int64 timesteps, the model's Euler with float32.
    base = tasks.pipeline_cache().get(get_registry().get(model))  # type: ignore[arg-type]
    for module in (base.unet, base.vae):
        module.to(memory_format=torch.channels_last)
    acceleration.warm_next()  # 64x48, one image
    assert acceleration.compiled_at(base, 64, 48, 1, 7.0)
    warmed = recorder.count("compile"), recorder.count("decode compile")
    runs = recorder.count("compiled run")

    source = Image.fromarray(np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8))
    inputs = {"image": source, "mask": Image.new("L", (64, 48), 255)}
    for task, scheduler in [("img2img", None), ("inpaint", None), ("txt2img", "ddim"), ("txt2img", "dpmpp_2m")]:
        request = {
            "task": task,
            "scheduler": scheduler,
            "prompt": "a lighthouse",
            "width": 64,
            "height": 48,
            "steps": 3,
            "strength": 0.7,
            "guidance_scale": 7.0,
            "seed": 7,
            "num_images": 1,
        }
        pipe = prepare_pipeline(base, request)
        eager = generate_batch(pipe, [request], lambda *_: None, inputs=inputs)
        with acceleration.stance(pipe, 64, 48, 1, 7.0):
            compiled = generate_batch(pipe, [request], lambda *_: None, inputs=inputs)
        difference = np.abs(np.asarray(compiled[0][0], int) - np.asarray(eager[0][0], int))
        assert difference.max() <= 1, (task, scheduler)  # the same images, to a rounding of 8-bit pixels

    assert (recorder.count("compile"), recorder.count("decode compile")) == warmed
    assert recorder.count("compiled run") > runs


def test_a_lora_job_runs_eagerly_and_the_next_job_without_one_compiled_again(recorder: Recorder) -> None:
    # diffusers loads a LoRA into the pipeline's own UNet (which it keeps: a compiled wrapper would take no
    # adapters), and the graphs traced before it do not fit the UNet with adapters in it: that job runs
    # eagerly. A job without LoRAs unloads them, and runs on the graphs again, compiling nothing new.
    base = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    before = pixels(base)
    acceleration.warm_next()
    assert acceleration.compiled_at(base, 64, 48, 1, 7.5)
    compiled = recorder.count("compile"), recorder.count("decode compile")

    with_lora = prepare_pipeline(base, {"task": "txt2img", "loras": [{"name": "tiny-lora", "scale": 1.0}]})
    runs = recorder.count("compiled run")
    lora_pixels = pixels(with_lora)
    assert recorder.count("compiled run") == runs and not acceleration.compiled_at(base, 64, 48, 1, 7.5)
    assert np.abs(lora_pixels - before).max() > 0.01  # the LoRA did change the image

    plain = prepare_pipeline(base, {"task": "txt2img"})
    assert acceleration.compiled_at(plain, 64, 48, 1, 7.5)
    np.testing.assert_allclose(pixels(plain), before, atol=1e-5)  # the model's own image, without the LoRA
    assert recorder.count("compiled run") > runs
    assert (recorder.count("compile"), recorder.count("decode compile")) == compiled

    # Asked for again, the LoRA is loaded again, to the same effect.
    again = prepare_pipeline(base, {"task": "txt2img", "loras": [{"name": "tiny-lora", "scale": 1.0}]})
    np.testing.assert_allclose(pixels(again), lora_pixels, atol=1e-5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_more_listed_shapes_than_dynamos_default_limit_all_run_compiled(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TorchDynamo keeps 8 graphs of a function by default and runs it eagerly past them, silently: a 9th
    # warmed shape (or a 5th of each of two models) would have served eagerly while counted as compiled.
    batches = range(1, 10)
    monkeypatch.setenv("DARKROOM_COMPILE_SHAPES", ",".join(f"64x48x{batch}" for batch in batches))
    reset_caches()
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    while acceleration.cold():
        acceleration.warm_next()
    for batch in batches:
        runs = recorder.count("compiled run"), recorder.count("decode compiled run")
        call(pipe, batch)
        assert recorder.count("compiled run") > runs[0] and recorder.count("decode compiled run") > runs[1], batch


def test_compile_without_shapes_is_refused(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.settings import Settings

    monkeypatch.setenv("DARKROOM_COMPILE", "1")
    with pytest.raises(ValueError, match="DARKROOM_COMPILE_SHAPES must list the shapes"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("tuning", [False, True])
def test_compile_tuning_gives_inductor_the_diffusion_fast_settings_for_every_graph_of_a_model(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch, tuning: bool
) -> None:
    import torch._inductor.config as inductor

    defaults = {name: getattr(inductor, name) for name in acceleration.INDUCTOR_TUNING}
    seen: list[dict[str, Any]] = []

    class Reading(Recorder):
        """Reads inductor's settings as each graph is handed to the compiler, where inductor would read them."""

        def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
            seen.append({name: getattr(inductor, name) for name in acceleration.INDUCTOR_TUNING})
            return super().__call__(graph, inputs)

    monkeypatch.setattr(acceleration, "COMPILE_OPTIONS", {"backend": Reading(recorder.events), "dynamic": False})
    decoder = Reading(recorder.events, prefix="decode ")
    monkeypatch.setattr(acceleration, "DECODE_COMPILE_OPTIONS", {"backend": decoder, "dynamic": False})
    monkeypatch.setenv("DARKROOM_COMPILE_TUNING", "1" if tuning else "0")
    reset_caches()
    with inductor.patch(defaults):  # put back afterwards: a worker sets them for good
        tasks.pipeline_cache().get(get_registry().get("tiny-sd"))
        acceleration.warm_next()

    assert recorder.count("compile") > 0 and recorder.count("decode compile") > 0
    assert len(seen) == recorder.count("compile") + recorder.count("decode compile")
    assert all(settings == (acceleration.INDUCTOR_TUNING if tuning else defaults) for settings in seen)
    # Each differs from inductor's own, so either side of the test tells one setting missed.
    assert all(defaults[name] != value for name, value in acceleration.INDUCTOR_TUNING.items())
