"""Loading diffusers pipelines by model name, once per process.

`load()` is separate from running: the cache holds loaded pipelines keyed by model name, on an explicit
device and dtype (cuda with fp16/bf16 when present, else CPU float32).
"""

from __future__ import annotations

import logging
import threading
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


def load_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoPipelineForText2Image

    source = resolve_source(spec, get_settings())
    local = Path(source).is_dir()
    log.info("loading model %s from %s on %s (%s)", spec.name, source, device, dtype)
    pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype, local_files_only=local)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PipelineCache:
    """Loaded pipelines of this process, by model name."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pipes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec) -> Any:
        with self._lock:
            pipe = self._pipes.get(spec.name)
            if pipe is None:
                pipe = load_pipeline(spec, self.device, resolve_dtype(spec, self.device))
                self._pipes[spec.name] = pipe
            return pipe

    @property
    def loaded(self) -> list[str]:
        return list(self._pipes)
