"""Encoding on the encoder processes (worker/store.py): the same bytes as in the worker, and no lost image
when an encoder dies."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support import reset_caches
from worker import store
from worker.outputs import encode_output
from worker.watermark import has_watermark

REQUEST = {"task": "txt2img", "model": "tiny-sd", "prompt": "a lighthouse", "steps": 3, "guidance_scale": 7.0}


@pytest.fixture
def encoders(darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DARKROOM_ENCODE_PROCESSES", "2")
    reset_caches()
    yield
    store.shutdown()


def noise(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encode_here(images: list[Image.Image], request: dict[str, Any]) -> list[tuple[bytes, bool]]:
    encoded = [encode_output(im, request, job_id="j", seed=s, sampler="Euler") for s, im in enumerate(images)]
    return [(e.data, e.watermarked) for e in encoded]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_encoder_processes_write_the_bytes_the_worker_would(encoders: None, fmt: str) -> None:
    images = [noise(seed) for seed in range(3)]
    request = {**REQUEST, "output_format": fmt, "quality": 90}
    encoded = store.encode_images(images, request, job_id="j", seeds=[0, 1, 2], sampler="Euler")
    assert [(e.data, e.watermarked) for e in encoded] == encode_here(images, request)
    assert encoded[0].watermarked == (fmt == "png")  # a JPEG this small loses the mark, and says so
    assert store._pool is not None and all(pid != os.getpid() for pid in store._pool._processes)


def test_a_killed_encoder_loses_no_image(encoders: None) -> None:
    images = [noise(seed) for seed in range(2)]
    store.encode_images(images, REQUEST, job_id="j", seeds=[0, 1], sampler="Euler")  # starts the pool
    pool = store._pool
    assert pool is not None
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGKILL)
    encoded = store.encode_images(images, REQUEST, job_id="j", seeds=[0, 1], sampler="Euler")
    assert [(e.data, e.watermarked) for e in encoded] == encode_here(images, REQUEST)
    assert all(has_watermark(Image.open(BytesIO(e.data))) for e in encoded)
    # The next batch gets a fresh pool, not the broken one.
    store.encode_images(images, REQUEST, job_id="j", seeds=[0, 1], sampler="Euler")
    assert store._pool is not None and store._pool is not pool
