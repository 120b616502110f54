"""The model registry: which models a deployment serves, where their weights are, and their limits.

The API validates requests against it and lists it at /v1/models; workers load pipelines through it.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib.resources import files
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.settings import get_settings

Task = Literal["txt2img", "img2img", "inpaint", "upscale"]
TASKS: tuple[Task, ...] = get_args(Task)
# Stable public names; the worker maps each to a diffusers scheduler class and options.
Scheduler = Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "lcm"]
SCHEDULERS: tuple[Scheduler, ...] = get_args(Scheduler)


class LoraSpec(BaseModel):
    """A LoRA jobs may name in `loras`: safetensors from a local path, a hub id, or `builtin:<name>`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str = Field(description="Local .safetensors file or directory, hub id, or `builtin:<name>`.")
    weight_name: str | None = Field(None, description="File inside a directory or hub repo.")
    families: list[Literal["sd1", "sd2", "sdxl"]] = Field(description="Model families it was trained for.")
    description: str = ""
    default_scale: float = 1.0
    max_scale: float = 2.0


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    family: Literal["sd1", "sd2", "sdxl"] = "sd1"
    source: str = Field(description="Hub id, local directory, or `builtin:<name>`.")
    description: str = ""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    default_width: int = 512
    default_height: int = 512
    min_size: int = 64
    max_width: int = 1024
    max_height: int = 1024
    default_steps: int = 30
    max_steps: int = 100
    default_guidance: float = 7.5
    max_guidance: float = 30.0
    tasks: list[Task] = Field(default_factory=lambda: list(TASKS), description="Job types this model serves.")
    default_scheduler: Scheduler | None = Field(None, description="Scheduler when a job names none (else the model's).")
    schedulers: list[Scheduler] = Field(default_factory=lambda: list(SCHEDULERS), description="Schedulers allowed.")
    default_strength: float = Field(0.75, gt=0, le=1, description="img2img/inpaint strength when a job names none.")
    upscale_strength: float = Field(0.3, gt=0, le=1, description="Strength of the img2img refine pass of `upscale`.")
    upscaler: str | None = Field(None, description="A registry upscaler model (see upscale_factor) `upscale` jobs run.")
    upscale_factor: Literal[4] | None = Field(
        None, description="Set on a dedicated upscaler model (diffusers' x4 upscaler: 4); it serves only `upscale`."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        for dim in ("default_width", "default_height", "max_width", "max_height", "min_size"):
            if getattr(self, dim) % 8:
                raise ValueError(f"model {self.name!r}: {dim} must be a multiple of 8")
        if not (1 <= self.default_steps <= self.max_steps):
            raise ValueError(f"model {self.name!r}: default_steps must lie in 1..max_steps")
        if self.upscale_factor and (self.tasks != ["upscale"] or self.upscaler):
            raise ValueError(f'model {self.name!r}: an upscaler must have tasks = ["upscale"] and no upscaler')
        return self


class Registry(BaseModel):
    models: dict[str, ModelSpec]
    loras: dict[str, LoraSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _upscalers_exist(self) -> Registry:
        for spec in self.models.values():
            target = self.models.get(spec.upscaler) if spec.upscaler else None
            if spec.upscaler and (target is None or not target.upscale_factor):
                raise ValueError(f"model {spec.name!r}: upscaler {spec.upscaler!r} is not an upscaler of this registry")
        return self

    def runs_on(self, spec: ModelSpec, task: str) -> ModelSpec:
        """The model whose weights run `task` for a job on `spec`: its upscaler for `upscale`, where it has one."""
        if task == "upscale" and spec.upscaler:
            return self.models[spec.upscaler]
        return spec

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self.models)


def parse_registry(text: str) -> Registry:
    data = tomllib.loads(text)
    return Registry(
        models={name: ModelSpec(name=name, **entry) for name, entry in data.get("models", {}).items()},
        loras={name: LoraSpec(name=name, **entry) for name, entry in data.get("loras", {}).items()},
    )


@lru_cache
def get_registry() -> Registry:
    path = get_settings().models_file
    text = path.read_text() if path else files("shared").joinpath("models.toml").read_text()
    return parse_registry(text)
