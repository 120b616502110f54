"""Loading diffusers pipelines by model name, once per process.

`load()` is separate from running: the cache holds loaded pipelines keyed by model name, on an explicit
device and dtype (cuda with fp16/bf16 when present, else CPU float32). Several models stay warm within
`DARKROOM_MODEL_MEMORY_MB`; the least recently used is evicted to make room for another.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from shared.registry import ModelSpec
from shared.settings import Settings, get_settings

log = logging.getLogger("darkroom.worker")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32  # half precision on CPU is slow or unsupported for many ops
    if spec.dtype == "auto":
        return torch.float16
    return DTYPES[spec.dtype]


def resolve_source(spec: ModelSpec, settings: Settings) -> str:
    """A local directory or a hub id. Built-in models are built on first use, once per machine."""
    if not spec.source.startswith("builtin:"):
        return spec.source
    return str(build_builtin(spec.source.removeprefix("builtin:"), settings))


def build_builtin(name: str, settings: Settings) -> Path:
    """The directory of a built-in model or LoRA (worker/tiny.py), built on first use, once per machine."""
    from worker.tiny import BUILDERS, DONE_FILE, make_tiny

    if name not in BUILDERS:
        raise ValueError(f"unknown built-in model {name!r}")
    assert settings.model_cache_dir is not None
    directory = settings.model_cache_dir / name
    if not (directory / DONE_FILE.get(name, "model_index.json")).exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory) + ".lock"):
            log.info("building built-in model %s in %s", name, directory)
            make_tiny(directory, kind=name)
    return directory


class ModelTooLarge(Exception):
    """The model alone needs more memory than the worker's whole model budget."""


def load_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline in `dtype`, still on the CPU: the cache sizes it before it takes device memory."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    source = resolve_source(spec, get_settings())
    local = Path(source).is_dir()
    log.info("loading model %s from %s for %s (%s)", spec.name, source, device, dtype)
    # An upscaler loads as the class its model_index names; the Auto class would refuse it.
    loader = DiffusionPipeline if spec.upscale_factor else AutoPipelineForText2Image
    pipe = loader.from_pretrained(source, dtype=dtype, local_files_only=local)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_bytes(pipe: Any) -> int:
    """Memory of a pipeline's weights: every parameter and buffer of its torch modules."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return total


class PipelineCache:
    """Loaded pipelines of this process by model name, least recently used first out past the budget."""

    def __init__(self, device: torch.device, budget_bytes: int = 0):
        self.device = device
        self.budget_bytes = budget_bytes
        self._pipes: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._too_large: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec) -> Any:
        with self._lock:
            if spec.name in self._pipes:
                self._pipes.move_to_end(spec.name)
                return self._pipes[spec.name][0]
            if spec.name in self._too_large:
                raise self._refusal(spec.name, self._too_large[spec.name])
            pipe = load_pipeline(spec, self.device, resolve_dtype(spec, self.device))
            size = pipeline_bytes(pipe)
            if self.budget_bytes and size > self.budget_bytes:
                self._too_large[spec.name] = size
                del pipe
                gc.collect()
                raise self._refusal(spec.name, size)
            self._evict_for(size)
            from worker.acceleration import prepare

            pipe = prepare(pipe.to(self.device), self.device, get_settings())
            self._pipes[spec.name] = (pipe, size)
            return pipe

    def _refusal(self, name: str, size: int) -> ModelTooLarge:
        return ModelTooLarge(
            f"model {name!r} needs {size / 2**20:.0f} MiB, more than this worker's whole model memory budget"
            f" of {self.budget_bytes / 2**20:.0f} MiB (DARKROOM_MODEL_MEMORY_MB)"
        )

    def _evict_for(self, size: int) -> None:
        while self.budget_bytes and self._pipes and self.used_bytes + size > self.budget_bytes:
            name, (pipe, _) = self._pipes.popitem(last=False)
            log.info("evicting model %s to make room (%d MiB)", name, size // 2**20)
            del pipe
        # Drop the evicted weights now, not whenever the collector runs, so the device memory is free
        # before the next model moves in.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._pipes.values())

    @property
    def loaded(self) -> list[str]:
        """Model names, least recently used first."""
        return list(self._pipes)
