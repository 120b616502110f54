"""The model registry: which models a deployment serves, where their weights are, and their limits.

The API validates requests against it and lists it at /v1/models; workers load pipelines through it.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib.resources import files
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.settings import get_settings


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

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        for dim in ("default_width", "default_height", "max_width", "max_height", "min_size"):
            if getattr(self, dim) % 8:
                raise ValueError(f"model {self.name!r}: {dim} must be a multiple of 8")
        if not (1 <= self.default_steps <= self.max_steps):
            raise ValueError(f"model {self.name!r}: default_steps must lie in 1..max_steps")
        return self


class Registry(BaseModel):
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self.models)


def parse_registry(text: str) -> Registry:
    raw = tomllib.loads(text).get("models", {})
    return Registry(models={name: ModelSpec(name=name, **entry) for name, entry in raw.items()})


@lru_cache
def get_registry() -> Registry:
    path = get_settings().models_file
    text = path.read_text() if path else files("shared").joinpath("models.toml").read_text()
    return parse_registry(text)
