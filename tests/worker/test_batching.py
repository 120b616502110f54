"""Dynamic batching on the real tiny pipeline: each job gets its own images, as if it had run alone."""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy.exc import OperationalError

from shared import broker, events
from shared.db import session_scope
from shared.jobs import cancel_job, create_job, get_job
from shared.registry import get_registry
from shared.scheduling import batch_key
from shared.storage import get_storage
from shared.tenants import get_or_create_tenant
from tests.support import reset_caches
from worker import batching, generate, outputs, status, tasks
from worker import claims as worker_claims
from worker.batching import gather
from worker.generate import generators


def submit(tenant: str = "acme", priority: int = 1, **overrides: Any) -> str:
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
        "num_images": 1,
        **overrides,
    }
    with session_scope() as session:
        owner = get_or_create_tenant(session, tenant)
        job = create_job(
            session,
            tenant_id=owner.id,
            model=request["model"],
            queue="model.tiny-sd",
            request=request,
            metadata=None,
            priority=priority,
            batch_key=batch_key(request),
        )
    return job.id


def load(job_id: str) -> Any:
    with session_scope() as session:
        return get_job(session, job_id)


def cancel_at_step(monkeypatch: pytest.MonkeyPatch, job_id: str, at: int) -> None:
    """Cancel `job_id` as its owner would (database, then the Redis flag) when a call reaches step `at`."""
    original = tasks.StepHook.__call__

    def cancelling(self: tasks.StepHook, step: int, total: int) -> None:
        if step == at:
            with session_scope() as session:
                cancel_job(session, job_id, load(job_id).tenant_id)
            broker.request_cancel(job_id)
        original(self, step, total)

    monkeypatch.setattr(tasks.StepHook, "__call__", cancelling)


def pixels(job_id: str) -> list[np.ndarray]:
    storage = get_storage()
    return [
        np.asarray(Image.open(io.BytesIO(storage.path(o["key"]).read_bytes())).convert("RGB"))  # type: ignore[union-attr]
        for o in load(job_id).outputs or []
    ]


def alone(request: dict[str, Any]) -> list[np.ndarray]:
    """The job's images from a plain diffusers call of its own: prompt strings, one generator per image."""
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    count = request["num_images"]
    with torch.inference_mode():
        result = pipe(
            prompt=[request["prompt"]] * count,
            negative_prompt=[request["negative_prompt"]] * count if request["negative_prompt"] else None,
            width=request["width"],
            height=request["height"],
            num_inference_steps=request["steps"],
            guidance_scale=request["guidance_scale"],
            generator=generators(request["seed"], count),
        )
    return [np.asarray(image.convert("RGB")) for image in result.images]


@pytest.fixture(autouse=True)
def unmarked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs as generated: these tests compare pixels with plain diffusers calls, and the watermark (tested
    in test_generation.py) would move a near-identical pair's pixels by a whole quantisation step."""
    monkeypatch.setattr(outputs, "embed_watermark", lambda image: (image, 0))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, Any]]]:
    """The requests of every pipeline call the worker makes."""
    seen: list[list[dict[str, Any]]] = []
    original = generate.generate_batch

    def spy(pipe: Any, requests: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(list(requests))
        return original(pipe, requests, *args, **kwargs)

    monkeypatch.setattr(batching, "generate_batch", spy)
    return seen


def test_a_batch_gives_each_job_the_pixels_it_would_get_alone(
    darkroom_env: dict[str, Any], calls: list[list[dict[str, Any]]]
) -> None:
    jobs = [
        submit(prompt="a lighthouse", seed=7, num_images=2),
        submit(prompt="a red fox", negative_prompt="blurry", seed=100),
        submit(tenant="other", prompt="a lighthouse", seed=3, num_images=3),
    ]
    assert tasks.run_job(jobs[0]) == "succeeded"
    assert len(calls) == 1 and len(calls[0]) == 3  # one pipeline call for all three
    for job_id in jobs:
        job = load(job_id)
        assert job.status == "succeeded" and job.progress_step == job.progress_total == 3
        got, want = pixels(job_id), alone(job.request)
        assert [o["seed"] for o in job.outputs] == [job.request["seed"] + i for i in range(job.request["num_images"])]
        assert len(got) == len(want) == job.request["num_images"]
        for g, w in zip(got, want, strict=True):
            # Batched float maths differs from unbatched at ~1e-6: at most one step of uint8 rounding.
            assert np.abs(g.astype(int) - w.astype(int)).max() <= 1
    assert tasks.run_job(jobs[1]) == "skipped" and tasks.run_job(jobs[2]) == "skipped"  # spare tokens


def oom_above(monkeypatch: pytest.MonkeyPatch, most_images: int) -> list[int]:
    """A GPU that fits `most_images` per call: a bigger call raises torch's OutOfMemoryError, as CUDA does.
    Returns the image count of every call tried, and counts memory frees in `freed`."""
    tried: list[int] = []
    original = generate.generate_batch

    def fake_gpu(pipe: Any, requests: Any, *args: Any, **kwargs: Any) -> Any:
        images = sum(int(r["num_images"]) for r in requests)
        tried.append(images)
        if images > most_images:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {images} images > {most_images})")
        return original(pipe, requests, *args, **kwargs)

    monkeypatch.setattr(batching, "generate_batch", fake_gpu)
    return tried


def test_a_batch_out_of_memory_is_retried_at_half_the_size_with_the_same_pixels(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [submit(seed=10 * i, prompt=f"a lighthouse {i}") for i in range(4)]
    freed: list[bool] = []
    monkeypatch.setattr(batching.failures, "free_accelerator_memory", lambda: freed.append(True))
    tried = oom_above(monkeypatch, most_images=2)
    assert tasks.run_job(jobs[0]) == "succeeded"
    assert tried == [4, 2, 2] and freed == [True]  # one failed call of 4, then two halves
    for job_id in jobs:
        job = load(job_id)
        assert job.status == "succeeded" and job.attempts == 1
        [got], [want] = pixels(job_id), alone(job.request)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # as if it had run alone


def test_jobs_that_do_not_fit_even_alone_fail_with_out_of_memory_and_the_worker_keeps_serving(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [submit(seed=i, num_images=2) for i in range(3)]
    tried = oom_above(monkeypatch, most_images=1)
    assert tasks.run_job(jobs[0]) == "failed"
    assert tried == [6, 4, 2, 2, 2]  # 3 jobs, then halves of 2 and 1 job, then each job alone
    for job_id in jobs:
        job = load(job_id)
        assert (job.status, job.error_code) == ("failed", "out_of_memory") and not job.outputs
    small = submit(seed=99)
    assert tasks.run_job(small) == "succeeded" and len(pixels(small)) == 1


def test_incompatible_jobs_never_share_a_call(darkroom_env: dict[str, Any], calls: list[list[dict[str, Any]]]) -> None:
    jobs = [submit(), submit(width=96), submit(steps=2), submit(guidance_scale=3.0), submit(prompt="other")]
    for job_id in jobs:
        tasks.run_job(job_id)
    assert all(load(j).status == "succeeded" for j in jobs)
    assert sorted(len(call) for call in calls) == [1, 1, 1, 2]  # only the prompt may differ within a call
    for call in calls:
        assert len({batch_key(request) for request in call}) == 1


def test_a_batch_never_exceeds_the_image_limit(
    darkroom_env: dict[str, Any], calls: list[list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [submit(num_images=n, seed=10 * i) for i, n in enumerate((3, 4, 2, 1))]
    for job_id in jobs:
        tasks.run_job(job_id)
    assert all(load(j).status == "succeeded" for j in jobs)
    # 3 + 4 fill 7 of 8; the 2 does not fit, the 1 does.
    assert [[r["num_images"] for r in call] for call in calls] == [[3, 4, 1], [2]]


def test_a_job_canceled_inside_a_batch_loses_its_images_while_the_others_finish(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    keep, drop, also = submit(seed=1, steps=6), submit(seed=2, steps=6), submit(seed=3, steps=6)
    cancel_at_step(monkeypatch, drop, 2)
    assert tasks.run_job(keep) == "stopped,succeeded"  # one outcome word per distinct outcome in the batch
    assert load(keep).status == load(also).status == "succeeded"
    canceled = load(drop)
    assert canceled.status == "canceled" and not canceled.outputs
    assert not get_storage().path(f"jobs/{drop}").exists()  # type: ignore[union-attr]


def test_a_batch_whose_jobs_are_all_canceled_stops(darkroom_env: dict[str, Any]) -> None:
    first, second = submit(steps=20), submit(steps=20)
    broker.request_cancel(first)
    broker.request_cancel(second)
    assert tasks.run_job(first) == "stopped"
    assert not get_storage().path(f"jobs/{first}").exists()  # type: ignore[union-attr]


def test_fast_steps_look_for_cancels_at_most_every_50_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    # 30 steps of 8 ms (SD 1.5 alone on an H200): a Redis round trip each was 30 per job on its path.
    clock, looks, canceled = FakeClock(), [], set()

    def cancels_requested(job_ids: list[str]) -> list[bool]:
        looks.append(clock.now)
        return [job_id in canceled for job_id in job_ids]

    monkeypatch.setattr(batching.time, "monotonic", clock)
    monkeypatch.setattr(batching.broker, "cancels_requested", cancels_requested)
    keep, drop = batching.Member("keep", 1, {"num_images": 1}), batching.Member("drop", 1, {"num_images": 1})
    hook = batching.StepHook([keep, drop], interval=3600)
    for step in range(1, 30):
        if step == 10:
            canceled.add("drop")
        hook(step, 30)
        clock.now += 0.008
    assert looks[0] == 100.0 and len(looks) == 5  # the first step, then every 50 ms: 7 steps apart
    assert hook.live() == [keep]  # the cancel was still seen, at the next look


def test_progress_is_written_beside_the_steps_and_a_job_it_finds_lost_is_dropped_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pipeline must not wait on the database at a step: the write runs on `writer`, and what it finds
    # (here: `drop` canceled in the database) counts from the first step after it returns.
    held, wrote = threading.Event(), []

    def write_progress(attempts: dict[str, int], step: int, total: int, previews: Any) -> set[str]:
        held.wait(5)
        wrote.append(step)
        return {"keep"}

    monkeypatch.setattr(batching, "write_progress", write_progress)
    monkeypatch.setattr(batching.broker, "cancels_requested", lambda ids: [False] * len(ids))
    keep, drop = batching.Member("keep", 1, {"num_images": 1}), batching.Member("drop", 1, {"num_images": 1})
    with ThreadPoolExecutor(max_workers=1) as beside:
        hook = batching.StepHook([keep, drop], interval=0, writer=beside.submit)
        hook(1, 4)  # returns with its write still held
        hook(2, 4)
        assert wrote == [] and hook.live() == [keep, drop]
        held.set()
        hook.settle()
        assert wrote == [1, 2] and hook.live() == [keep]


def test_a_token_runs_the_best_job_first_then_what_its_queue_still_holds(darkroom_env: dict[str, Any]) -> None:
    low = submit(priority=0, width=96)
    high = submit(priority=2, width=128)
    assert tasks.run_job(low) == "succeeded"  # low's token runs high first, then low, in two calls
    assert load(high).status == load(low).status == "succeeded"
    assert load(high).started_at < load(low).started_at
    assert tasks.run_job(high) == "skipped"  # high's token is spare now


def test_the_next_batch_generates_while_the_last_one_is_stored(
    darkroom_env: dict[str, Any], calls: list[list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = submit(width=96), submit(width=128)
    order: list[str] = []
    store = tasks.store_and_record
    generate_spy = batching.generate_batch

    def slow_store(computed: Any, settings: Any, **kwargs: Any) -> Any:
        order.append("store starts")
        time.sleep(0.5)  # long enough for the second call to start and end meanwhile
        order.append("store ends")
        return store(computed, settings, **kwargs)

    def generate(pipe: Any, requests: Any, *args: Any, **kwargs: Any) -> Any:
        order.append(f"call {requests[0]['width']}")
        return generate_spy(pipe, requests, *args, **kwargs)

    monkeypatch.setattr(tasks, "store_and_record", slow_store)
    monkeypatch.setattr(batching, "generate_batch", generate)
    assert tasks.run_job(first) == "succeeded"
    assert order[:3] == ["call 96", "store starts", "call 128"]  # the second call did not wait for the store
    assert load(first).status == load(second).status == "succeeded"


def status_when_decoding(monkeypatch: pytest.MonkeyPatch, job_id: str, then: Any = None) -> list[str]:
    """The status `job_id` reaches while the worker's VAE decodes (waiting up to 2 s for it to leave
    `queued`), one entry per decode; `then()` runs after each look."""
    vae = tasks.pipeline_cache().get(get_registry().get("tiny-sd")).vae  # type: ignore[arg-type]
    decode, seen = vae.decode, []

    def watching(*args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + 2
        while load(job_id).status == "queued" and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(load(job_id).status)
        if then is not None:
            then()
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", watching)
    return seen


def test_the_next_batch_is_claimed_while_the_last_one_decodes(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = submit(width=96), submit(width=128)  # two batch keys: two calls
    seen = status_when_decoding(monkeypatch, second)
    assert tasks.run_job(first) == "succeeded"
    # The second call's jobs were claimed during the first call's decode, not after it.
    assert seen[0] == "running"
    assert load(first).status == load(second).status == "succeeded"


def test_a_worker_stopping_hands_back_the_batch_it_claimed_during_the_last_decode(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = submit(width=96), submit(width=128)
    monkeypatch.setattr(status.state, "stop_requested", threading.Event())
    status_when_decoding(monkeypatch, second, then=status.state.stop_requested.set)  # SIGTERM mid-decode
    assert tasks.run_job(first) == "handed_back,succeeded"
    assert load(first).status == "succeeded"
    handed = load(second)
    assert handed.status == "queued" and handed.attempts == 0  # never ran: not an attempt
    assert broker.queue_length("model.tiny-sd") == 1  # a token for the next worker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds


def test_a_lone_job_waits_no_longer_than_the_window() -> None:
    clock, looks = FakeClock(), []

    def nobody(room: int) -> int:
        looks.append(clock.now)
        return 0

    assert gather(nobody, images=1, max_images=8, window_s=0.010, clock=clock, sleep=clock.sleep) == 1
    assert clock.slept <= 0.010 + 1e-9 and len(looks) >= 2
    assert looks[0] == 100.0  # looked at once, before any waiting


def test_no_wait_with_a_zero_window_or_a_full_batch() -> None:
    clock = FakeClock()
    assert gather(lambda room: 0, images=1, max_images=8, window_s=0, clock=clock, sleep=clock.sleep) == 1
    assert gather(lambda room: room, images=1, max_images=8, window_s=1.0, clock=clock, sleep=clock.sleep) == 8
    assert gather(lambda room: 1 / 0, images=8, max_images=8, window_s=1.0, clock=clock, sleep=clock.sleep) == 8
    assert clock.slept == 0


def arriving_at(arrivals: dict[float, int], clock: FakeClock) -> Any:
    """A claim function for company that arrives `arrivals[t]` jobs `t` seconds from now."""
    pending = {clock.now + t: count for t, count in arrivals.items()}

    def claim(room: int) -> int:
        arrived = [t for t in list(pending) if t <= clock.now]
        return min(room, sum(pending.pop(t) for t in arrived))

    return claim


def test_company_arriving_within_the_window_joins() -> None:
    clock = FakeClock()
    claim = arriving_at({0.004: 2, 0.006: 3}, clock)
    assert gather(claim, images=1, max_images=8, window_s=0.010, clock=clock, sleep=clock.sleep) == 6
    assert clock.slept <= 0.010 + 1e-9


def arriving_every(seconds: float, clock: FakeClock) -> Any:
    """A claim function for company that arrives one job every `seconds` from now on."""
    start, taken = clock.now, 0

    def claim(room: int) -> int:
        nonlocal taken
        got = min(room, int((clock.now - start) / seconds + 1e-9) - taken)
        taken += got
        return got

    return claim


def test_a_burst_still_arriving_is_waited_for_within_the_stretch() -> None:
    # One job every 8 ms: a 10 ms window sees one of them; stretched, the call fills.
    clock = FakeClock()
    assert (
        gather(arriving_every(0.008, clock), images=1, max_images=8, window_s=0.010, clock=clock, sleep=clock.sleep)
        == 2
    )
    clock = FakeClock()
    claim = arriving_every(0.008, clock)
    assert gather(claim, images=1, max_images=8, window_s=0.010, stretch_s=0.25, clock=clock, sleep=clock.sleep) == 8
    assert clock.slept <= 0.056 + 0.002  # the seventh arrival, then no more waiting


def test_a_burst_arriving_in_clumps_fills_the_call() -> None:
    # As a burst came over HTTP on an H200: a first job joins at once, the rest in clumps 30 ms apart, longer
    # than the 10 ms window. Once company has come, a pause of a quarter of the stretch ends gathering.
    clumps = {0.005: 1, **{0.035 + 0.030 * i: 3 for i in range(5)}}
    clock = FakeClock()
    claim = arriving_at(clumps, clock)
    assert gather(claim, images=1, max_images=16, window_s=0.010, stretch_s=0.6, clock=clock, sleep=clock.sleep) == 16
    assert clock.slept <= 0.155 + 0.002  # the last clump's arrival, then no more waiting
    # Without a stretch, the window alone: the first job only.
    clock = FakeClock()
    claim = arriving_at(clumps, clock)
    assert gather(claim, images=1, max_images=16, window_s=0.010, clock=clock, sleep=clock.sleep) == 2


def test_once_a_burst_stops_arriving_gathering_ends_within_a_quarter_of_the_stretch() -> None:
    clock = FakeClock()
    claim = arriving_at({0.004: 2}, clock)
    assert gather(claim, images=1, max_images=16, window_s=0.010, stretch_s=0.6, clock=clock, sleep=clock.sleep) == 3
    assert 0.15 <= clock.slept <= 0.004 + 0.15 + 0.002 + 1e-9


def test_the_stretch_bounds_an_endless_trickle() -> None:
    clock = FakeClock()
    claim = arriving_every(0.008, clock)
    assert gather(claim, images=1, max_images=100, window_s=0.010, stretch_s=0.05, clock=clock, sleep=clock.sleep) == 7
    assert clock.slept <= 0.05 + 1e-9


def test_a_lone_job_waits_only_the_window_whatever_the_stretch() -> None:
    clock = FakeClock()
    assert (
        gather(lambda room: 0, images=1, max_images=8, window_s=0.010, stretch_s=5.0, clock=clock, sleep=clock.sleep)
        == 1
    )
    assert clock.slept <= 0.010 + 1e-9


def test_a_call_teaches_gathering_how_long_a_full_call_of_its_kind_takes(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "_row_seconds", {})
    job_id = submit()
    key = load(job_id).batch_key
    assert batching.full_call_seconds(key, 8) == 0  # nothing known yet: gathering waits the window only
    tasks.run_job(job_id)
    assert load(job_id).status == "succeeded"
    assert batching.full_call_seconds(key, 8) > 0
    assert batching.full_call_seconds(batch_key({"model": "tiny-sd", "width": 96}), 8) == 0


def stream_progress(job_id: str) -> list[dict[str, Any]]:
    """The progress events of the job's live stream, as SSE readers get them."""
    entries = broker.get_redis().xrange(events.stream_key(job_id))
    told = [(fields[b"type"].decode(), json.loads(fields[b"data"])) for _id, fields in entries]
    return [data for kind, data in told if kind == "progress"]


def test_progress_events_carry_a_preview_of_each_jobs_own_image(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DARKROOM_PREVIEW_EVERY_STEPS", "2")
    reset_caches()
    jobs = [submit(prompt="a lighthouse", seed=7, steps=5), submit(prompt="a red fox", seed=100, steps=5)]
    assert tasks.run_job(jobs[0]) == "succeeded"
    previews: list[list[Image.Image]] = []
    for job_id in jobs:
        progress = stream_progress(job_id)
        assert [p["step"] for p in progress] == [1, 2, 3, 4, 5]
        # At most one every two steps, and none with the last step: the finished image follows it.
        assert [p["step"] for p in progress if "preview" in p] == [2, 4]
        header, _encoded = progress[1]["preview"].split(",", 1)
        assert header == "data:image/jpeg;base64"
        previews.append(
            [Image.open(io.BytesIO(base64.b64decode(p["preview"].split(",", 1)[1]))) for p in progress[1::2]]
        )
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    scale = pipe.vae_scale_factor
    for shots in previews:
        assert all((shot.format, shot.size) == ("JPEG", (64 // scale, 48 // scale)) for shot in shots)
    # Each job previews its own image: two prompts and seeds in one call give two different pictures.
    first, second = (np.asarray(shots[-1].convert("RGB")).astype(int) for shots in previews)
    assert np.abs(first - second).mean() > 2


def test_on_a_cuda_device_each_steps_progress_waits_for_the_device_to_finish_the_step_two_back(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # There, the host queues a step in well under a millisecond and nothing waits for the device: unheld,
    # every step's progress (and cancel check, and the next batch's claim) would come at the call's start.
    # No GPU here: the device's events are stand-ins that log when the host records one and waits on one.
    told: list[str] = []

    class Mark:
        def record(self) -> None:
            self.step = sum(entry.startswith("record") for entry in told) + 1
            told.append(f"record {self.step}")

        def synchronize(self) -> None:
            told.append(f"wait {self.step}")

    monkeypatch.setattr(generate, "on_cuda", lambda pipe: True)
    monkeypatch.setattr(torch.cuda, "Event", Mark)
    pipe = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    request = {"prompt": "a lighthouse", "width": 64, "height": 48, "steps": 5, "guidance_scale": 7.0}
    generate.generate_batch(
        pipe, [{**request, "seed": 1, "num_images": 1}], lambda step, _: told.append(f"step {step}")
    )
    assert told == [
        *("record 1", "step 1", "record 2", "step 2"),
        *("record 3", "wait 1", "step 3", "record 4", "wait 2", "step 4", "record 5", "wait 3", "step 5"),
    ]


def test_previews_can_be_turned_off(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_PREVIEW_EVERY_STEPS", "0")
    reset_caches()
    job_id = submit(steps=4)
    assert tasks.run_job(job_id) == "succeeded"
    progress = stream_progress(job_id)
    assert [p["step"] for p in progress] == [1, 2, 3, 4] and not any("preview" in p for p in progress)


def test_a_database_outage_while_gathering_runs_the_batch_already_claimed(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DARKROOM_BATCH_WINDOW_MS", "50")
    reset_caches()
    job_id = submit()
    claims: list[str | None] = []
    original = worker_claims.claim_jobs

    def down_after_the_claim(session: Any, queue: str, **kwargs: Any) -> Any:
        claims.append(kwargs.get("key"))
        if len(claims) == 3:  # the leader and its company are claimed; then the database blinks
            raise OperationalError("SELECT", {}, ConnectionRefusedError("database down"))
        return original(session, queue, **kwargs)

    monkeypatch.setattr(worker_claims, "claim_jobs", down_after_the_claim)
    assert tasks.run_job(job_id) == "succeeded"
    job = load(job_id)
    assert job.status == "succeeded" and job.attempts == 1  # run now, not left for its lease to lapse
    assert len(claims) == 4  # leader, company, one failed look for more, the loop's next claim: no retry storm


class FlagBright(torch.nn.Module):
    """A stand-in safety checker with StableDiffusionSafetyChecker's call signature: flags each image brighter
    than `threshold` (its mean, in [0, 1]) and fails a call that holds an image as bright as `fails_on`."""

    def __init__(self, threshold: float, fails_on: float | None = None):
        super().__init__()
        self.threshold, self.fails_on = threshold, fails_on
        self.calls: list[int] = []  # images per call

    def forward(self, images: Any, clip_input: Any) -> tuple[Any, list[bool]]:
        self.calls.append(len(images))
        means = [float(image.mean()) for image in images]
        if self.fails_on is not None and any(abs(m - self.fails_on) < NEAR for m in means):
            raise RuntimeError("the checker broke on this image")
        return images, [m > self.threshold for m in means]


# How far an image's brightness may move between a batched call and a call of its own: a few of its values
# by one step of 255 (this tiny model's images are noise, their brightness all close to 0.5).
NEAR = 2e-4


def brightness_split(jobs: list[str]) -> tuple[float, dict[str, list[float]]]:
    """Each job's images' brightness when made alone, and a threshold in the widest gap between two of them."""
    means = {job_id: [float(image.mean()) / 255 for image in alone(load(job_id).request)] for job_id in jobs}
    ordered = sorted(m for values in means.values() for m in values)
    gap, low = max((b - a, a) for a, b in itertools.pairwise(ordered))
    assert gap > 5 * NEAR, ordered
    return low + gap / 2, means


def flags_of_stored(job_id: str, threshold: float) -> list[bool]:
    """The verdicts the job's stored images (unmarked: exactly the images checked) earn alone."""
    return [float(image.mean()) / 255 > threshold for image in pixels(job_id)]


@pytest.fixture
def checker_on_tiny_sd(darkroom_env: dict[str, Any]) -> Any:
    base = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]

    def register(checker: FlagBright) -> FlagBright:
        base.register_modules(safety_checker=checker)
        return checker

    yield register
    base.register_modules(safety_checker=None)


def test_a_batch_is_checked_for_safety_in_one_call_and_each_job_gets_its_own_verdicts(
    checker_on_tiny_sd: Any,
) -> None:
    jobs = [
        submit(seed=7, num_images=2, nsfw="flag"),
        submit(prompt="a red fox", seed=100, nsfw="flag"),
        submit(seed=3, num_images=3, nsfw="flag"),
    ]
    threshold, _ = brightness_split(jobs)
    checker = checker_on_tiny_sd(FlagBright(threshold))
    assert tasks.run_job(jobs[0]) == "succeeded"
    assert checker.calls == [6]
    verdicts = []
    for job_id in jobs:
        job = load(job_id)
        assert job.status == "succeeded"
        verdicts.append([o["nsfw"] for o in job.outputs])
        assert verdicts[-1] == flags_of_stored(job_id, threshold)
    assert {flag for flags in verdicts for flag in flags} == {True, False}


def test_a_safety_check_that_fails_fails_only_the_job_whose_images_broke_it(checker_on_tiny_sd: Any) -> None:
    jobs = [submit(seed=7, num_images=2, nsfw="flag"), submit(seed=100), submit(seed=3, num_images=3, nsfw="flag")]
    threshold, means = brightness_split(jobs)
    breaking = means[jobs[1]][0]
    assert all(abs(m - breaking) > 5 * NEAR for job_id in (jobs[0], jobs[2]) for m in means[job_id])
    checker = checker_on_tiny_sd(FlagBright(threshold, fails_on=breaking))
    tasks.run_job(jobs[0])
    assert checker.calls == [6, 2, 1, 3]  # together, then one job at a time
    broken = load(jobs[1])
    assert broken.status == "failed" and broken.error_code == "generation_failed"
    assert "the checker broke on this image" in broken.error_message
    for job_id in (jobs[0], jobs[2]):
        assert load(job_id).status == "succeeded"
        assert [o["nsfw"] for o in load(job_id).outputs] == flags_of_stored(job_id, threshold)
