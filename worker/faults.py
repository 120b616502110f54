"""Test-only faults, so the fault suite can make a real worker crash, run out of memory or hang on cue.

Two locks keep this out of production: faults exist only when DARKROOM_ENV=test (Settings refuses
DARKROOM_TEST_FAULTS in any other environment), and only the faults named in DARKROOM_TEST_FAULTS are
armed. A job triggers an armed fault with the word `fault:<name>` in its prompt, so one poison job can
crash its worker while the jobs around it run normally. The fault fires from inside the pipeline call,
after the first denoising step: the job is genuinely mid-run, as with a real crash or a real OOM.

  crash      os._exit(137) in the pool process, like a segfault or the kernel's OOM killer
  oom        raise torch.OutOfMemoryError, as a CUDA allocation failure does
  hang       sleep for an hour in Python code (the soft time limit interrupts it)
  hang_hard  sleep and swallow the soft time limit, like a stuck native call (only the hard limit ends it)
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded

from shared.settings import get_settings

FAULTS = ("crash", "oom", "hang", "hang_hard")
_TRIGGER = re.compile(r"\bfault:([a-z_]+)")


def requested(request: dict[str, Any]) -> str | None:
    """The armed fault this job's prompt asks for, if any."""
    armed = get_settings().faults
    if not armed:
        return None
    match = _TRIGGER.search(str(request.get("prompt", "")))
    return match.group(1) if match and match.group(1) in armed else None


def fire(fault: str) -> None:
    if fault == "crash":
        os._exit(137)  # no cleanup, no exception handler, no final write: the process is simply gone
    if fault == "oom":
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (simulated by DARKROOM_TEST_FAULTS)"
        )
    if fault == "hang":
        time.sleep(3600)
    if fault == "hang_hard":
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            try:
                time.sleep(deadline - time.monotonic())
            except SoftTimeLimitExceeded:
                continue


class FaultyPipeline:
    """Wraps a pipeline so that the armed fault fires after the job's first denoising step."""

    def __init__(self, pipe: Any, fault: str):
        self.pipe = pipe
        self.fault = fault

    def __call__(self, *args: Any, callback_on_step_end: Any = None, **kwargs: Any) -> Any:
        def step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if callback_on_step_end is not None:
                callback_kwargs = callback_on_step_end(pipe, step, timestep, callback_kwargs)
            fire(self.fault)
            return callback_kwargs

        return self.pipe(*args, callback_on_step_end=step_end, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Everything but the call is the pipeline's own (its components, its execution device), so a
        # poison job runs the same code as any other up to the fault.
        return getattr(self.pipe, name)


def wrap(pipe: Any, request: dict[str, Any]) -> Any:
    """The pipeline itself, or (tests only) a wrapper that fires the fault the job asks for."""
    fault = requested(request)
    return FaultyPipeline(pipe, fault) if fault else pipe
