"""Request and response bodies of API v1."""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.generation import (
    MAX_LORAS,
    MAX_NOISE_LEVEL,
    LoraRef,
    OutputFormat,
    Pad,
    check_pad_shape,
    check_task_fields,
    default_size,
    generation_fields,
)
from shared.errors import InvalidRequest
from shared.outpaint import check_pad, padded_size
from shared.registry import ModelSpec, Registry, Scheduler, Task

MAX_METADATA_BYTES = 4096
MAX_SEED = 2**32 - 1

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]
WebhookEvent = Literal["started", "progress", "succeeded", "failed", "canceled", "expired"]
Priority = Literal["low", "normal", "high"]


class JobCreate(BaseModel):
    """A generation job (txt2img, img2img, inpaint, upscale). Omitted fields take the model's defaults."""

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
                    "webhook_url": "https://example.com/hooks/darkroom",
                    "webhook_events": ["succeeded", "failed", "canceled"],
                    "priority": "high",
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
    webhook_url: str | None = Field(
        None,
        max_length=2000,
        description="http(s) URL that receives signed Standard Webhooks POSTs about this job "
        "(see GET /v1/webhook-secret). Private and loopback addresses are refused.",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        description="Events to send to `webhook_url`; default the terminal ones: succeeded, failed, canceled.",
    )
    priority: Priority = Field(
        "normal",
        description="low, normal or high: workers take higher priorities first (then share fairly between "
        "tenants). Above your tenant's maximum priority (GET /v1/usage) is a 422.",
    )
    task: Task = Field("txt2img", description="txt2img, img2img, inpaint or upscale.")
    image: str | None = Field(
        None, max_length=2_000_000, description="Input image: an https:// URL, a data: URI, or a POST /v1/uploads key."
    )
    mask: str | None = Field(None, max_length=2_000_000, description="inpaint: white repaints, black keeps. Same size.")
    strength: float | None = Field(None, gt=0, le=1, description="img2img/inpaint/upscale: how much to change, 0-1.")
    scale: Literal[2, 4] | None = Field(None, description="upscale: 2 or 4.")
    noise_level: int | None = Field(
        None,
        ge=0,
        le=MAX_NOISE_LEVEL,
        description="upscale on a model's x4 upscaler: noise added to the input first, 0-350 (default 20); "
        "more lets the upscaler invent more detail.",
    )
    pad: int | Pad | None = Field(
        None,
        description="inpaint (outpainting): pixels added around the image, one int for every side or "
        "{left, right, top, bottom}; multiples of 8. The new area is repainted; `mask` becomes optional.",
    )
    scheduler: Scheduler | None = Field(None, description="Sampler by name; the model's default when omitted.")
    loras: list[LoraRef] | None = Field(None, max_length=MAX_LORAS, description="LoRAs from GET /v1/models.")
    output_format: OutputFormat = Field("png", description="png, jpeg or webp.")
    quality: int | None = Field(None, ge=1, le=100, description="jpeg/webp quality, default 90.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("pad", mode="before")
    @classmethod
    def _pad_shape(cls, value: Any) -> Any:
        return check_pad_shape(value)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"must serialise to at most {MAX_METADATA_BYTES} bytes of JSON")
        return value

    def normalise(
        self, registry: Registry, default_model: str, input_size: tuple[int, int] | None = None
    ) -> tuple[ModelSpec, dict[str, Any]]:
        """Resolve defaults against the model and check its limits; the result is what the worker runs."""
        name = self.model or default_model
        spec = registry.get(name)
        if spec is None:
            raise InvalidRequest(
                f"model: unknown model {name!r}; available: {', '.join(registry.names)}", code="unknown_model"
            )
        # An upscale job on a model with an upscaler runs on the upscaler, with its defaults and limits; the job
        # stays the requested model's (its queue, its metrics).
        runs = registry.runs_on(spec, self.task)
        given = self.model_dump(include={"image", "mask", "strength", "scale", "loras", "pad", "noise_level"})
        check_task_fields(self.task, spec, given, runs)
        implied = default_size(self.task, input_size, self.scale)
        if self.task == "upscale" and (self.width is not None or self.height is not None):
            raise InvalidRequest("width: upscale jobs take their size from image and scale")
        width = self.width if self.width is not None else implied[0] if implied else runs.default_width
        height = self.height if self.height is not None else implied[1] if implied else runs.default_height
        pad = check_pad(given["pad"])
        if pad is not None:
            for field, value in (("width", width), ("height", height)):
                if value < 8:  # the image inside the canvas; the canvas itself is checked below
                    raise InvalidRequest(f"{field}: must be at least 8, got {value}")
            width, height = padded_size(width, height, pad)
            if width > runs.max_width or height > runs.max_height:
                raise InvalidRequest(
                    f"pad: makes the canvas {width}x{height}, over {runs.name}'s max of"
                    f" {runs.max_width}x{runs.max_height}"
                )
        for field, value, limit in (("width", width, runs.max_width), ("height", height, runs.max_height)):
            if value % 8:
                raise InvalidRequest(f"{field}: must be a multiple of 8, got {value}")
            if not runs.min_size <= value <= limit:
                raise InvalidRequest(
                    f"{field}: must be between {runs.min_size} and {limit} for {runs.name}, got {value}"
                )
        steps = self.steps if self.steps is not None else runs.default_steps
        if steps > runs.max_steps:
            raise InvalidRequest(f"steps: must be at most {runs.max_steps} for {runs.name}, got {steps}")
        guidance = self.guidance_scale if self.guidance_scale is not None else runs.default_guidance
        if guidance > runs.max_guidance:
            raise InvalidRequest(f"guidance_scale: must be at most {runs.max_guidance} for {runs.name}, got {guidance}")
        seed = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED - 8)
        if seed + self.num_images - 1 > MAX_SEED:
            raise InvalidRequest(f"seed: seed + num_images - 1 must not exceed {MAX_SEED}")
        request: dict[str, Any] = {
            "task": self.task,
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
        if pad is not None:
            request["pad"] = pad
        request |= generation_fields(
            spec=runs,
            registry=registry,
            task=self.task,
            strength=self.strength,
            noise_level=self.noise_level,
            scale=self.scale,
            scheduler=self.scheduler,
            loras=self.loras,
            output_format=self.output_format,
            quality=self.quality,
        )
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
    nsfw: bool = Field(False, description="The model's safety checker flagged it (tenants set to `flag` only).")
    watermarked: bool = Field(
        False,
        description="It carries darkroom's invisible watermark, checked on the stored file. False only for "
        "images under 48 8x8 blocks (e.g. smaller than 64x48) or small lossy (jpeg/webp) outputs.",
    )


class JobError(BaseModel):
    code: str
    message: str


class JobWebhook(BaseModel):
    url: str
    events: list[WebhookEvent]


class JobRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f1c2a9be0d94c51a7f0d6b1c2e3f4a5",
                    "status": "queued",
                    "priority": "normal",
                    "model": "tiny-sd",
                    "request": {"task": "txt2img", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4},
                    "created_at": "2026-01-01T12:00:00Z",
                    "started_at": None,
                    "finished_at": None,
                    "progress": None,
                    "queue_position": 3,
                    "eta_seconds": 12,
                    "outputs": [],
                    "error": None,
                    "metadata": {"campaign": "spring"},
                    "webhook": {"url": "https://example.com/hooks/darkroom", "events": ["succeeded", "failed"]},
                }
            ]
        }
    )

    id: str
    status: JobStatus
    priority: Priority = "normal"
    model: str
    request: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress | None
    queue_position: int | None = Field(
        None, description="Queued jobs a worker takes before this one (0: next); null unless queued."
    )
    eta_seconds: int | None = Field(
        None, description="Estimated seconds until done, from measured run times; null unless queued or unknown."
    )
    outputs: list[Output]
    error: JobError | None
    metadata: dict[str, Any] | None
    webhook: JobWebhook | None = None


class JobList(BaseModel):
    data: list[JobRead]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next, older page.")


class ModelRead(BaseModel):
    name: str
    family: str
    description: str
    defaults: dict[str, Any]
    limits: dict[str, Any]


class LoraRead(BaseModel):
    name: str
    families: list[str]
    description: str
    default_scale: float
    max_scale: float


class ModelList(BaseModel):
    data: list[ModelRead]
    loras: list[LoraRead] = Field(default_factory=list, description="LoRAs jobs may name in `loras`.")


class UploadRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "key": "uploads/3f1c2a9d0b7e4c55a1e2f3d4c5b6a798/9b1e4d2c7a6f4e3d8c5b2a1f0e9d8c7b.png",
                    "width": 768,
                    "height": 512,
                    "expires_at": "2026-01-02T12:00:00Z",
                }
            ]
        }
    )

    key: str = Field(description="Pass as `image` or `mask` of a job (yours only).")
    width: int
    height: int
    expires_at: datetime


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class WebhookSecretRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    "created_at": "2026-01-01T12:00:00Z",
                    "previous_secret_expires_at": "2026-01-02T12:00:00Z",
                }
            ]
        }
    )

    secret: str = Field(description="The current signing secret (`whsec_` + base64 key), per Standard Webhooks.")
    created_at: datetime
    previous_secret_expires_at: datetime | None = Field(
        None, description="Until then, deliveries also carry a signature made with the previous secret."
    )


class WebhookSecretRotate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"grace_period_seconds": 86400}]})

    grace_period_seconds: int | None = Field(
        None,
        ge=0,
        le=7 * 86400,
        description="How long the previous secret keeps signing (default DARKROOM_WEBHOOK_SECRET_GRACE_HOURS).",
    )


class WebhookAttemptRead(BaseModel):
    attempted_at: datetime
    status_code: int | None = Field(description="HTTP status the receiver answered; null on timeout or no connection.")
    latency_ms: int | None
    error: str | None


class WebhookDeliveryRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "msg_8d3f0c6a1b2e4f5a9c7d6e5f4a3b2c1d",
                    "job_id": "3f1c2a9be0d94c51a7f0d6b1c2e3f4a5",
                    "event": "succeeded",
                    "url": "https://example.com/hooks/darkroom",
                    "status": "delivered",
                    "attempts": 2,
                    "created_at": "2026-01-01T12:00:03Z",
                    "next_attempt_at": None,
                    "delivered_at": "2026-01-01T12:00:09Z",
                    "last_status_code": 204,
                    "last_latency_ms": 41,
                    "last_error": None,
                    "attempt_log": [
                        {
                            "attempted_at": "2026-01-01T12:00:03Z",
                            "status_code": 503,
                            "latency_ms": 12,
                            "error": "HTTP 503: busy",
                        },
                        {"attempted_at": "2026-01-01T12:00:09Z", "status_code": 204, "latency_ms": 41, "error": None},
                    ],
                }
            ]
        }
    )

    id: str = Field(description="Also the `webhook-id` header, the same on every attempt.")
    job_id: str | None = Field(description="The job it reports on; null for a `batch.completed` delivery.")
    batch_id: str | None = Field(None, description="The batch of a `batch.completed` delivery.")
    event: WebhookEvent | Literal["batch.completed"]
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status_code: int | None
    last_latency_ms: int | None
    last_error: str | None
    attempt_log: list[WebhookAttemptRead]


class WebhookDeliveryList(BaseModel):
    data: list[WebhookDeliveryRead]


class LimitRead(BaseModel):
    limit: int | None = Field(description="The most allowed; null: unlimited.")
    used: int
    remaining: int | None = Field(description="limit - used, never below 0; null: unlimited.")
    resets_at: datetime | None = Field(description="When `used` next goes down by itself; null when it does not.")
    description: str


class UsageRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "max_priority": "normal",
                    "limits": {
                        "requests": {
                            "limit": 600,
                            "used": 12,
                            "remaining": 588,
                            "resets_at": "2026-01-01T12:00:41Z",
                            "description": "Requests in the last 60 s (rolling).",
                        },
                        "queued_jobs": {
                            "limit": 1000,
                            "used": 40,
                            "remaining": 960,
                            "resets_at": None,
                            "description": "Your jobs queued now.",
                        },
                        "running_jobs": {
                            "limit": 4,
                            "used": 4,
                            "remaining": 0,
                            "resets_at": None,
                            "description": "Your jobs running now.",
                        },
                        "images": {
                            "limit": 50000,
                            "used": 1234,
                            "remaining": 48766,
                            "resets_at": "2026-02-01T00:00:00Z",
                            "description": "Images submitted in this quota period (month).",
                        },
                    },
                }
            ]
        }
    )

    tenant: str
    max_priority: Priority = Field(description="The highest `priority` your jobs may ask for.")
    limits: dict[str, LimitRead] = Field(description="requests, queued_jobs, running_jobs and images.")
