"""Request and response bodies of /v1/batches (the job bodies they hold are api.schemas')."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.schemas import MAX_METADATA_BYTES, MAX_SEED, JobCreate, JobRead

BatchStatus = Literal["queued", "running", "completed", "canceled"]
Prompt = Annotated[str, Field(min_length=1, max_length=2000)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class JobTemplate(JobCreate):
    """A job request shared by every job of a batch; each job takes its prompt or its seed from the lists."""

    prompt: str | None = Field(  # type: ignore[assignment]
        None, min_length=1, max_length=2000, description="Required unless `prompts` is given."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:  # type: ignore[override]
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value


class BatchCreate(BaseModel):
    """Either `jobs` (a list of job requests), or `job` with `prompts` or `seeds` (one job per item)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "job": {"model": "tiny-sd", "width": 64, "height": 64, "steps": 4, "seed": 7},
                    "prompts": ["a red sneaker on white", "a blue sneaker on white", "a green sneaker on white"],
                    "webhook_url": "https://example.com/hooks/darkroom",
                    "metadata": {"campaign": "spring"},
                },
                {"jobs": [{"prompt": "a lighthouse", "seed": 1}, {"prompt": "a harbour", "steps": 8}]},
                {"job": {"prompt": "a lighthouse at dusk"}, "seeds": [1, 2, 3, 4]},
            ]
        },
    )

    jobs: list[JobCreate] | None = Field(None, min_length=1, description="The jobs, each as POST /v1/jobs takes it.")
    job: JobTemplate | None = Field(None, description="One job request, repeated for each of `prompts` or `seeds`.")
    prompts: list[Prompt] | None = Field(None, min_length=1, description="With `job`: one job per prompt.")
    seeds: list[Seed] | None = Field(None, min_length=1, description="With `job`: one job per seed.")
    webhook_url: str | None = Field(
        None,
        max_length=2000,
        description="http(s) URL that receives a signed `batch.completed` webhook when the last job ends.",
    )
    metadata: dict[str, Any] | None = Field(None, description="Your own small JSON object, echoed back.")

    @field_validator("prompts")
    @classmethod
    def _no_blank_prompts(cls, value: list[str] | None) -> list[str] | None:
        for i, prompt in enumerate(value or []):
            if not prompt.strip():
                raise ValueError(f"prompts[{i}] must not be blank")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"must serialise to at most {MAX_METADATA_BYTES} bytes of JSON")
        return value

    @model_validator(mode="after")
    def _one_shape(self) -> BatchCreate:
        if (self.jobs is None) == (self.job is None):
            raise ValueError("give either `jobs`, or `job` with `prompts` or `seeds`")
        if self.jobs is not None and (self.prompts is not None or self.seeds is not None):
            raise ValueError("`prompts` and `seeds` go with `job`, not with `jobs`")
        if self.job is not None and (self.prompts is None) == (self.seeds is None):
            raise ValueError("with `job`, give exactly one of `prompts` or `seeds`")
        return self


class BatchCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    expired: int


class BatchSummary(BaseModel):
    id: str
    status: BatchStatus = Field(
        description="queued (no job started), running, completed (every job ended), or canceled (you canceled "
        "it and every job has ended)."
    )
    total: int
    counts: BatchCounts
    created_at: datetime
    completed_at: datetime | None = Field(description="When the last job ended.")
    canceled_at: datetime | None
    metadata: dict[str, Any] | None
    webhook_url: str | None


class BatchRead(BatchSummary):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "5b0e4d3c2a1f4e6d8c9b0a1f2e3d4c5b",
                    "status": "running",
                    "total": 3,
                    "counts": {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "canceled": 0, "expired": 0},
                    "created_at": "2026-01-01T12:00:00Z",
                    "completed_at": None,
                    "canceled_at": None,
                    "metadata": {"campaign": "spring"},
                    "webhook_url": "https://example.com/hooks/darkroom",
                    "jobs": [],
                }
            ]
        }
    )

    jobs: list[JobRead] = Field(description="The batch's jobs, in the order of the request (without queue_position).")


class BatchList(BaseModel):
    data: list[BatchSummary]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next, older page.")
