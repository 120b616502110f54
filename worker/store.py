"""Storing finished images, and recording them: on a pool of processes beside the generating one.

Watermarking and PNG encoding are CPU work in Python and numpy, about 60 ms for a 512x512 image on a
2-core VM; an upload is Python too (a temporary file and a rename on disk; signing and sending with boto3
on S3), and so is marking a batch succeeded (worker/record.py). In the generating process all of it would
take the GIL from the pipeline, whose Python drives every kernel launch (for a small model it is most of
the call): in bench.e2e the generating thread waited 15 ms per call of 8 beyond its CPU while a store
thread uploaded and recorded the previous batch beside it, and 11 to 12 ms with both on these processes.
And one core cannot keep up with a GPU anyway: 8 images/s of 512x512 need about half a core of encoding.

`DARKROOM_ENCODE_PROCESSES` processes do it, at a lower priority than the generating process. A batch
with a job per process or more is dealt out by whole jobs, one task per process that stores and records
its share; otherwise its images are dealt out (encode, then upload each), then one task records the
batch. They are started with `spawn` because the worker has already started torch's threads, which
`fork` would copy in a broken state. The generating process only sends pixels and gets back each job's
outcome. With no processes (0), or when one dies, the same functions run on the store thread.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

from shared import logs
from shared.settings import get_settings
from shared.storage import S3Storage, StorageUnavailable, get_storage, output_key, put_with_retry
from worker import status
from worker.outputs import encode_output
from worker.record import Stored, record_batch

log = logging.getLogger("darkroom.worker")
T = TypeVar("T")

# Without encoder processes, jobs stored at once on S3, whose uploads wait on the network. Local disk is
# not worth it: threads encoding at once only fight over the GIL (bench.e2e measured 0.53 of direct
# serially, 0.44 with four threads).
STORE_THREADS = 4
# Encoders yield the CPU to the generating process: their work is never on the accelerator's path, its
# Python is (on the 2-core VM a call of 8 lost 3 to 6 ms to being preempted by them at normal priority).
ENCODER_NICENESS = 10

_pool: ProcessPoolExecutor | None = None
_pool_pid: int | None = None


@dataclass
class ToStore:
    """A job's finished images, with what their records and embedded parameters need."""

    job_id: str
    request: dict[str, Any]
    images: list[Image.Image]
    nsfw: list[bool]
    sampler: str
    attempt: int = 1  # the attempt it was claimed as: recording it succeeded matches only that one


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
        parent = (os.getpid(), status.worker_id())
        _pool = ProcessPoolExecutor(count, mp_context=context, initializer=_start_encoder, initargs=parent)
        _pool_pid = os.getpid()
    return _pool


def start() -> None:
    """Start every encoder process now, in the background, rather than on the first batch to store.

    A pool starts its processes one per task submitted while none is idle, and a spawned process takes
    seconds to import what it needs. Started on first use (and, until the watermark stopped pulling torch
    into them, importing torch at their first image), they made the first job of an H200 run wait 6 s,
    and stored its first full batches in 2 to 4.4 s for 16 images, against 0.5 s once all were up: the
    next call waited for them. One trivial task per process makes the pool start them all.
    """
    pool = _executor()
    if pool is not None:
        for _ in range(processes()):
            pool.submit(os.getpid)


def _start_encoder(parent: int, worker: str) -> None:
    start_helper(parent, worker)
    os.nice(ENCODER_NICENESS)


def start_helper(parent: int, worker: str) -> None:
    """In a helper process (an encoder, the sidecar): log as the worker does (an upload's retries are worth
    seeing), and exit once the worker that started it is gone. A killed worker (the hard time limit, a
    crash) never shuts its helpers down, and they would otherwise wait for work forever."""
    logs.configure(os.environ.get("DARKROOM_LOG_FORMAT", "json"))
    logs.worker.set(worker)

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


def store_image(
    image: Image.Image,
    request: dict[str, Any],
    *,
    job_id: str,
    index: int,
    nsfw: bool,
    sampler: str,
    upload_by: float,
) -> dict[str, Any]:
    """Encode image `index` of a job and upload it, retried through a storage outage (StorageUnavailable after
    `upload_by`, a time.time()); its `outputs` record. Image i of a job is seeded `seed + i`."""
    seed = int(request["seed"]) + index
    encoded = encode_output(image, request, job_id=job_id, seed=seed, sampler=sampler)
    key = output_key(job_id, index, encoded.extension)
    seconds = max(0.0, upload_by - time.time())
    put_with_retry(get_storage(), key, encoded.data, encoded.content_type, seconds=seconds)
    return {
        "key": key,
        "width": image.width,
        "height": image.height,
        "seed": seed,
        "content_type": encoded.content_type,
        "nsfw": nsfw,
        "watermark": encoded.watermarked,
    }


Outputs = list[dict[str, Any]] | StorageUnavailable


def store_batch(jobs: list[ToStore]) -> dict[str, Outputs]:
    """Store every image of `jobs`: each job's `outputs` records, or the StorageUnavailable that failed it.
    On the encoder processes when there are any, every image at once; else here."""
    options = _options()

    def on(pool: ProcessPoolExecutor) -> dict[str, Outputs]:
        work = [(im, job.request, _args(job, i, options)) for job in jobs for i, im in enumerate(job.images)]
        # One task per encoder, not per image: each task is a round trip through the pool's threads in this
        # process, whose GIL the next batch's call needs (nine per batch of eight on a 2-core VM, where one
        # encoder serves them all).
        size = -(-len(work) // min(processes(), len(work)))
        futures = [pool.submit(_store_chunk, work[i : i + size]) for i in range(0, len(work), size)]
        results = iter([result for future in futures for result in future.result()])
        stored: dict[str, Outputs] = {}
        for job in jobs:
            mine = [next(results) for _ in job.images]
            gave_up = [r for r in mine if isinstance(r, StorageUnavailable)]
            stored[job.job_id] = gave_up[0] if gave_up else mine  # type: ignore[assignment]
        return stored

    def here() -> dict[str, Outputs]:
        threads = STORE_THREADS if isinstance(get_storage(), S3Storage) else 1
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as local:
            stored = {job.job_id: local.submit(_store_here, job, options) for job in jobs}
            return {job_id: future.result() for job_id, future in stored.items()}

    # Uploading an image again is harmless: same key, same bytes.
    return _on_encoders(on, here, f"storing {len(jobs)} jobs")


def store_and_record(jobs: list[ToStore], *, ended_before: list[str], spare_here: bool = False) -> dict[str, str]:
    """Store every image of `jobs`, then record the batch (worker/record.py): each stored job's outcome.
    `ended_before`: the batch's jobs that failed before storing, for the metrics.

    With at least one job per encoder, the jobs are dealt out whole, and each encoder stores and records
    its own share in one task: each task is a round trip through the pool's threads in the generating
    process, taking the GIL from the call running there, and images dealt one by one need a second task,
    after all of them, to record the batch. With fewer jobs than encoders (one job of many images), the
    images are dealt out, then recorded. `spare_here`: the generating thread has nothing to run next (the
    last batch of a burst), so this thread stores a share too, on the core the call has left.
    """
    pool = _executor()
    if pool is None or len(jobs) < processes():
        uploads = store_batch(jobs)
        return record({job.job_id: (job.attempt, uploads[job.job_id]) for job in jobs}, ended_before=ended_before)
    shares = _deal(jobs, processes() + (1 if spare_here else 0))
    options = _options()
    # The first share carries the jobs that ended before; with a spare thread, it is this thread's.
    ended = [ended_before] + [[] for _ in shares[1:]]
    on_pool = range(1 if spare_here else 0, len(shares))
    pending = [(i, _submit(pool, _store_and_record_share, shares[i], options, ended[i])) for i in on_pool]
    outcomes = _store_and_record_share(shares[0], options, ended[0]) if spare_here else {}
    for i, future in pending:
        try:
            if future is None:
                raise BrokenProcessPool("the encoder pool was already broken")
            outcomes.update(future.result())
        except (BrokenProcessPool, OSError) as exc:
            # Storing and recording again are harmless: same keys, same bytes; a job is succeeded once.
            log.warning(
                "encoder processes failed (%s); storing %d jobs in the worker", type(exc).__name__, len(shares[i])
            )
            _forget_pool()
            outcomes.update(_store_and_record_share(shares[i], options, ended[i]))
    return outcomes


def _submit(pool: ProcessPoolExecutor, fn: Callable[..., T], *args: Any) -> Future[T] | None:
    """`pool.submit`, or None when the pool is already broken (or shut down)."""
    try:
        return pool.submit(fn, *args)
    except (BrokenProcessPool, RuntimeError):
        return None


def _deal(jobs: list[ToStore], parts: int) -> list[list[ToStore]]:
    """`jobs` dealt into `parts` shares of about as many images each (largest job first, to the lightest
    share)."""
    shares: list[list[ToStore]] = [[] for _ in range(min(parts, len(jobs)))]
    loads = [0] * len(shares)
    for job in sorted(jobs, key=lambda j: -len(j.images)):
        lightest = loads.index(min(loads))
        shares[lightest].append(job)
        loads[lightest] += len(job.images)
    return shares


def _store_and_record_share(jobs: list[ToStore], options: dict[str, Any], ended_before: list[str]) -> dict[str, str]:
    """Store these jobs' images and record them; on an encoder process, or here for a spare thread's share."""
    stored: Stored = {job.job_id: (job.attempt, _store_here(job, options)) for job in jobs}
    return record_batch(stored, ended_before=ended_before)


def _options() -> dict[str, Any]:
    settings = get_settings()
    # One retry budget for the whole batch, not one per image: once storage has been away that long, the
    # images still waiting for an encoder try once and give up, rather than each waiting out a budget of
    # its own behind the others.
    return {"upload_by": time.time() + settings.storage_retry_seconds}


def _store_chunk(
    work: list[tuple[Image.Image, dict[str, Any], dict[str, Any]]],
) -> list[dict[str, Any] | StorageUnavailable]:
    """`store_image` for each (image, request, arguments), on an encoder process: a failed upload is
    returned in its place, so the chunk's other images are still stored."""
    results: list[dict[str, Any] | StorageUnavailable] = []
    for image, request, kwargs in work:
        try:
            results.append(store_image(image, request, **kwargs))
        except StorageUnavailable as exc:
            results.append(exc)
    return results


def record(stored: Stored, *, ended_before: list[str]) -> dict[str, str]:
    """`record.record_batch` on an encoder process when there are any, else here."""
    # Recording again is safe: a job already marked succeeded is not marked twice (it reads as discarded in
    # this worker's counters, and stays succeeded).
    return _on_encoders(
        lambda pool: pool.submit(record_batch, stored, ended_before=ended_before).result(),
        lambda: record_batch(stored, ended_before=ended_before),
        "recording",
    )


def _on_encoders(on: Callable[[ProcessPoolExecutor], T], here: Callable[[], T], what: str) -> T:
    """`on(pool)` on the encoder processes; `here()` when there are none, or when one died (killed for
    memory, say) or could not start: then a new pool next time, and this work again here."""
    pool = _executor()
    if pool is not None:
        try:
            return on(pool)
        except (BrokenProcessPool, OSError) as exc:
            log.warning("encoder processes failed (%s); %s in the worker", type(exc).__name__, what)
            _forget_pool()
    return here()


def _forget_pool() -> None:
    """A pool with a dead process is broken for good: the next use starts a new one."""
    global _pool
    _pool = None


def _args(job: ToStore, index: int, options: dict[str, Any]) -> dict[str, Any]:
    return {"job_id": job.job_id, "index": index, "nsfw": job.nsfw[index], "sampler": job.sampler, **options}


def _store_here(job: ToStore, options: dict[str, Any]) -> Outputs:
    try:
        return [store_image(im, job.request, **_args(job, i, options)) for i, im in enumerate(job.images)]
    except StorageUnavailable as exc:
        return exc
