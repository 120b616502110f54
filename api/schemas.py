"""Request and response bodies of API v1."""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import InvalidRequest
from shared.registry import ModelSpec, Registry

MAX_METADATA_BYTES = 4096
MAX_SEED = 2**32 - 1

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class JobCreate(BaseModel):
    """A text-to-image job. Omitted fields take the model's defaults (see GET /v1/models)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse on a cliff at dusk, oil painting",
                    "negative_prompt": "blurry",
                    "model": "tiny-sd",
                    "width": 64,
                    "height": 64,
                    "steps": 4,
                    "seed": 42,
                    "num_images": 2,
                    "metadata": {"campaign": "spring"},
                }
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=2000, description="What to steer away from.")
    model: str | None = Field(None, max_length=200, description="A model name from GET /v1/models.")
    width: int | None = Field(None, description="Pixels; a multiple of 8 within the model's limits.")
    height: int | None = Field(None, description="Pixels; a multiple of 8 within the model's limits.")
    steps: int | None = Field(None, ge=1, description="Denoising steps, up to the model's max_steps.")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance scale.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; image i uses seed + i.")
    num_images: int = Field(1, ge=1, le=8, description="Images to make, 1 to 8.")
    metadata: dict[str, Any] | None = Field(None, description="Your own small JSON object, echoed back.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"must serialise to at most {MAX_METADATA_BYTES} bytes of JSON")
        return value

    def normalise(self, registry: Registry, default_model: str) -> tuple[ModelSpec, dict[str, Any]]:
        """Resolve defaults against the model and check its limits; the result is what the worker runs."""
        name = self.model or default_model
        spec = registry.get(name)
        if spec is None:
            raise InvalidRequest(
                f"model: unknown model {name!r}; available: {', '.join(registry.names)}", code="unknown_model"
            )
        width = self.width if self.width is not None else spec.default_width
        height = self.height if self.height is not None else spec.default_height
        for field, value, limit in (("width", width, spec.max_width), ("height", height, spec.max_height)):
            if value % 8:
                raise InvalidRequest(f"{field}: must be a multiple of 8, got {value}")
            if not spec.min_size <= value <= limit:
                raise InvalidRequest(f"{field}: must be between {spec.min_size} and {limit} for {name}, got {value}")
        steps = self.steps if self.steps is not None else spec.default_steps
        if steps > spec.max_steps:
            raise InvalidRequest(f"steps: must be at most {spec.max_steps} for {name}, got {steps}")
        guidance = self.guidance_scale if self.guidance_scale is not None else spec.default_guidance
        if guidance > spec.max_guidance:
            raise InvalidRequest(f"guidance_scale: must be at most {spec.max_guidance} for {name}, got {guidance}")
        seed = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED - 8)
        if seed + self.num_images - 1 > MAX_SEED:
            raise InvalidRequest(f"seed: seed + num_images - 1 must not exceed {MAX_SEED}")
        request = {
            "task": "txt2img",
            "model": name,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance_scale": float(guidance),
            "seed": seed,
            "num_images": self.num_images,
        }
        return spec, request


class Progress(BaseModel):
    step: int
    total: int


class Output(BaseModel):
    url: str
    width: int
    height: int
    seed: int
    content_type: str


class JobError(BaseModel):
    code: str
    message: str


class JobRead(BaseModel):
    id: str
    status: JobStatus
    model: str
    request: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress | None
    outputs: list[Output]
    error: JobError | None
    metadata: dict[str, Any] | None


class JobList(BaseModel):
    data: list[JobRead]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next, older page.")


class ModelRead(BaseModel):
    name: str
    family: str
    description: str
    defaults: dict[str, Any]
    limits: dict[str, Any]


class ModelList(BaseModel):
    data: list[ModelRead]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
