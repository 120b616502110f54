"""Storing finished images: watermarked and encoded on a pool of processes beside the generating one,
then uploaded.

Watermarking and PNG encoding are CPU work in Python and numpy, about 60 ms for a 512x512 image on a
2-core VM. In the generating process they would take the GIL from the pipeline, whose Python drives every
kernel launch (for a small model it is most of the call), and one core cannot keep up with a GPU anyway:
8 images/s of 512x512 need about half a core of encoding. `DARKROOM_ENCODE_PROCESSES` processes do it
instead, started with `spawn` because the worker has already started torch's threads, which `fork` would
copy in a broken state.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from PIL import Image

from shared.settings import get_settings
from shared.storage import output_key
from worker.outputs import Encoded, encode_output

log = logging.getLogger("darkroom.worker")

_pool: ProcessPoolExecutor | None = None
_pool_pid: int | None = None


def processes() -> int:
    wanted = get_settings().encode_processes
    return wanted if wanted >= 0 else max(1, min(4, (os.cpu_count() or 1) - 1))


def _executor() -> ProcessPoolExecutor | None:
    global _pool, _pool_pid
    count = processes()
    if count == 0:
        return None
    # A pool belongs to the process that started it: a forked child (Celery's pool) starts its own.
    if _pool is None or _pool_pid != os.getpid():
        context = multiprocessing.get_context("spawn")
        _pool = ProcessPoolExecutor(count, mp_context=context, initializer=_watch_parent, initargs=(os.getpid(),))
        _pool_pid = os.getpid()
    return _pool


def _watch_parent(parent: int) -> None:
    """In an encoder process: exit once the worker that started it is gone. A killed worker (the hard time
    limit, a crash) never shuts its pool down, and its encoders would otherwise wait for work forever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def shutdown() -> None:
    """Stop this process's encoder pool (a new one starts on next use)."""
    global _pool
    if _pool is not None and _pool_pid == os.getpid():
        _pool.shutdown(wait=True, cancel_futures=True)
    _pool = None


def encode_images(
    images: list[Image.Image], request: dict[str, Any], *, job_id: str, seeds: list[int], sampler: str
) -> list[Encoded]:
    """`encode_output` of each image (with its seed), on the encoder processes when there are any."""
    global _pool
    pool = _executor()
    level = get_settings().png_compress_level
    if pool is not None:
        try:
            futures = [
                pool.submit(encode_output, image, request, job_id=job_id, seed=seed, sampler=sampler, png_level=level)
                for image, seed in zip(images, seeds, strict=True)
            ]
            return [future.result() for future in futures]
        except (BrokenProcessPool, OSError) as exc:
            # An encoder died (killed for memory, say) or could not start: a new pool next time, these here.
            log.warning("encoder processes failed (%s); encoding job %s in the worker", type(exc).__name__, job_id)
            _pool = None
    return [
        encode_output(image, request, job_id=job_id, seed=seed, sampler=sampler, png_level=level)
        for image, seed in zip(images, seeds, strict=True)
    ]


def store_outputs(
    storage: Any, job_id: str, request: dict[str, Any], images: list[Image.Image], nsfw: list[bool], *, sampler: str
) -> list[dict[str, Any]]:
    """Encode and upload each image; the job's `outputs` records."""
    seeds = [int(request["seed"]) + index for index in range(len(images))]
    outputs: list[dict[str, Any]] = []
    for index, encoded in enumerate(encode_images(images, request, job_id=job_id, seeds=seeds, sampler=sampler)):
        key = output_key(job_id, index, encoded.extension)
        storage.put(key, encoded.data, encoded.content_type)
        outputs.append(
            {
                "key": key,
                "width": images[index].width,
                "height": images[index].height,
                "seed": seeds[index],
                "content_type": encoded.content_type,
                "nsfw": nsfw[index],
                "watermark": encoded.watermarked,
            }
        )
    return outputs
