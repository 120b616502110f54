"""The shapes the API returns, as TypedDicts: plain dicts at run time, checked by type checkers."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]
Priority = Literal["low", "normal", "high"]
WebhookEventName = Literal["started", "progress", "succeeded", "failed", "canceled", "expired"]
BatchStatus = Literal["queued", "running", "completed", "canceled"]


class Progress(TypedDict):
    step: int
    total: int


class Output(TypedDict):
    url: str
    width: int
    height: int
    seed: int
    content_type: str


class JobErrorInfo(TypedDict):
    code: str
    message: str


class JobWebhook(TypedDict):
    url: str
    events: list[WebhookEventName]


class Job(TypedDict):
    id: str
    status: JobStatus
    priority: Priority
    model: str
    request: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: Progress | None
    queue_position: int | None
    eta_seconds: int | None
    outputs: list[Output]
    error: JobErrorInfo | None
    metadata: dict[str, Any] | None
    webhook: JobWebhook | None


class Upload(TypedDict):
    """An uploaded input image: pass `key` as a job's `image` or `mask` until `expires_at`."""

    key: str
    width: int
    height: int
    expires_at: str


class JobList(TypedDict):
    data: list[Job]
    next_cursor: str | None


class BatchCounts(TypedDict):
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    expired: int


class BatchSummary(TypedDict):
    id: str
    status: BatchStatus
    total: int
    counts: BatchCounts
    created_at: str
    completed_at: str | None
    canceled_at: str | None
    metadata: dict[str, Any] | None
    webhook_url: str | None


class Batch(BatchSummary):
    jobs: list[Job]


class BatchList(TypedDict):
    data: list[BatchSummary]
    next_cursor: str | None


class WebhookPayload(TypedDict):
    """The body of a job's webhook delivery: `type` is `job.<event>`, `data` the job as GET returns it.

    A batch's delivery has `type` `batch.completed` and the batch (`Batch`) as `data`."""

    type: str
    timestamp: str
    data: Job


class LimitUsage(TypedDict):
    limit: int | None  # None: unlimited
    used: int
    remaining: int | None
    resets_at: str | None
    description: str


class Usage(TypedDict):
    """GET /v1/usage: `limits` has `requests`, `queued_jobs`, `running_jobs` and `images`."""

    tenant: str
    max_priority: Priority
    limits: dict[str, LimitUsage]
