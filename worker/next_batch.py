"""Claiming a worker's next batch while its current call finishes, so that the next call starts at once.

A claim is a handful of statements (candidates, fair share, caps, the UPDATE that takes the rows): 9 to
15 ms of wall time on the 2-core VM, during which the accelerator would sit idle between two calls. It is
started when the current call reaches its last denoising step, and runs on the sidecar process
(worker/sidecar.py; a thread without one) while the pipeline decodes, so it hides behind the decode
rather than adding to the gap.

Not earlier: jobs claimed are this worker's (`running`, under its lease) until it runs them, and another
worker that falls idle meanwhile cannot take them. Claimed at the last step, they wait for one decode;
claimed when the call starts, they would wait for all of it (seconds on a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

from worker.sidecar import Later, Sidecar

T = TypeVar("T")


class NextBatch(Generic[T]):
    """The claim of the batch after the current one: `start()` begins it on `claimer` (once, and only while
    claiming is still allowed), `take()` returns what it claimed, or claims now if it never started.
    All three are called on the generating thread (the step hook runs there); only the claim runs beside it."""

    def __init__(
        self,
        claimer: Executor | Sidecar,
        claim: Callable[[], list[T]],
        *,
        until: float,
        stopping: Callable[[], bool],
    ):
        self._claimer = claimer
        self._claim = claim
        self._until = until  # a time.monotonic() past which nothing more is claimed
        self._stopping = stopping
        self._future: Later | None = None

    def allowed(self) -> bool:
        return time.monotonic() <= self._until and not self._stopping()

    def start(self) -> None:
        """Begin the claim in the background. Called from the step hook; cheap after the first time."""
        if self._future is None and self.allowed():
            self._future = self._claimer.submit(self._claim)

    def take(self) -> list[T]:
        """The next batch: what the background claim got, or a claim made now if none was started and
        claiming is still allowed, else nothing."""
        if self._future is not None:
            got: list[T] = self._future.result()
            return got
        return self._claim() if self.allowed() else []

    def claimed(self) -> list[T]:
        """What a started claim got (waiting for it to finish), without claiming anything new: for handing
        jobs back when the worker stops after all."""
        got: list[Any] = self._future.result() if self._future is not None else []
        return got
