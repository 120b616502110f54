"""All configuration, read once from `DARKROOM_*` environment variables (and an optional `.env`)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "dev-insecure-change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARKROOM_", env_file=".env", extra="ignore", env_ignore_empty=True)

    env: str = Field(
        "development",
        description="`development`, `test` or `production`; production refuses placeholder secrets, only `test` "
        "honours DARKROOM_TEST_FAULTS.",
    )
    data_dir: Path = Field(
        Path("data"),
        description="Where the embedded defaults keep their files (SQLite, images, models, dev key).",
    )
    database_url: str = Field("", description="SQLAlchemy URL. Default: a SQLite file `<data_dir>/darkroom.db`.")
    redis_url: str = Field(
        "redis://localhost:6379/0", description="Redis for the Celery broker, cancel flags and locks."
    )
    redis_prefix: str = Field("darkroom:", description="Prefix of every Redis key darkroom and its Celery queues use.")
    storage_url: str = Field(
        "", description="`file:///abs/dir` or `s3://bucket/prefix`. Default: `file://<data_dir>/storage`."
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible server (MinIO, R2, ...); unset for AWS."
    )
    s3_region: str = Field("us-east-1", description="Region used to sign S3 requests.")
    url_ttl_seconds: int = Field(3600, ge=1, description="Lifetime of output URLs (S3 presigned or local signed).")
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL of the API as clients reach it; local-storage URLs start with it.",
    )
    secret_key: str = Field(PLACEHOLDER_SECRET, description="Signs local-storage URLs. Must be set in production.")
    models_file: Path | None = Field(None, description="TOML model registry. Default: the built-in one with `tiny-sd`.")
    default_model: str = Field("tiny-sd", description="Model used when a job names none.")
    model_cache_dir: Path | None = Field(
        None, description="Where built-in models are built. Default: `<data_dir>/models`."
    )
    device: str = Field("auto", description="Torch device for workers: `auto`, `cuda`, `cuda:N` or `cpu`.")
    max_body_bytes: int = Field(1_048_576, description="Largest request body accepted; larger is refused with 413.")
    job_soft_time_limit: int = Field(
        600, description="Seconds a job may run before it is stopped and failed with `timeout`."
    )
    job_hard_time_limit: int = Field(660, description="Seconds after which the worker process running a job is killed.")
    max_attempts: int = Field(
        3,
        ge=1,
        description="Runs a job gets (worker crashes included) before it fails with `worker_crashed`.",
    )
    lease_seconds: int = Field(
        30,
        ge=2,
        description="A running job whose worker sent no heartbeat for this long is given back to the queue.",
    )
    reconcile_interval: float = Field(
        5.0, gt=0, description="Seconds between reconciler passes (republish lost messages, expire leases)."
    )
    progress_interval: float = Field(0.5, ge=0, description="Least seconds between two progress writes of one job.")
    preview_every_steps: int = Field(
        5, ge=0, description="Least steps between two preview images in a job's SSE progress events; 0 sends none."
    )
    idempotency_ttl_hours: float = Field(
        24, ge=24, description="Hours an `Idempotency-Key` is remembered (at least 24, per the IETF draft)."
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs on private, loopback or link-local addresses (tests, internal receivers).",
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds one webhook HTTP attempt may take.")
    webhook_max_attempts: int = Field(
        11, ge=1, description="Attempts per webhook delivery (first try plus retries) before it is marked failed."
    )
    webhook_backoff_scale: float = Field(
        1.0, gt=0, description="Multiplies the webhook retry schedule (tests compress the clock with e.g. 0.001)."
    )
    webhook_secret_grace_hours: float = Field(
        24, ge=0, description="After a secret rotation, hours the previous secret keeps signing (both are sent)."
    )
    event_stream_ttl: int = Field(
        24 * 3600, ge=60, description="Seconds a job's live event stream (SSE replay) is kept in Redis."
    )
    max_batch_images: int = Field(
        8, ge=1, description="Most images one pipeline call makes: compatible queued jobs share a call up to this."
    )
    batch_window_ms: float = Field(
        10.0,
        ge=0,
        description="How long a worker waits for compatible jobs to join a batch that is not yet full.",
    )
    batch_wait_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="While compatible jobs keep arriving, a batch that is not full waits on for them, up to this "
        "fraction of the time its last full call took. A job that nothing joins waits only the window.",
    )
    model_memory_mb: int = Field(
        0, ge=0, description="Memory budget of a worker's loaded pipelines; least recently used evicted. 0: no limit."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads torch may use in a worker process; 0: torch's default (one per core). On a"
        " CPU worker sharing its cores with the API and the database, fewer threads wait less on each other.",
    )
    encode_processes: int = Field(
        -1,
        ge=-1,
        description="Processes beside a worker's pipeline that watermark, encode, upload and record its images;"
        " -1: one per core but one, at most 4; 0: all of it in the worker process itself.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet (mode reduce-overhead: CUDA graphs on a GPU) and the VAE's decode"
        " (inductor's fused kernels).",
    )
    compile_shapes: str = Field(
        "",
        description="With compile: WIDTHxHEIGHTxBATCH buckets, e.g. `512x512x1,512x512x8`, warmed one at a time"
        " between batches, in this order; batches are padded up to the nearest warmed bucket, and other shapes"
        " run eagerly.",
    )
    compile_tuning: bool = Field(
        False,
        description="With compile: inductor's tuning from PyTorch's Diffusion-Fast recipe (1x1 convolutions as"
        " matrix multiplies, each kernel's launch configuration tuned by coordinate descent, no epilogue fusion)."
        " Cold compiles take longer; the compile cache keeps the result.",
    )
    inductor_cache_dir: Path | None = Field(
        None, description="torch.compile's cache, kept across restarts. Default: `<data_dir>/inductor-cache`."
    )
    vae_tiling_pixels: int = Field(
        1024 * 1024, ge=0, description="Above this many pixels per image the VAE decodes in tiles, one image at a time."
    )
    db_connect_timeout: int = Field(
        3, ge=1, description="Seconds to wait for a new PostgreSQL connection before answering 503 (API) or retrying."
    )
    api_threads: int = Field(
        8,
        ge=1,
        description="Threads of each API process for blocking work (database, Redis, fetching input images). "
        "More threads than cores contend for Python's GIL; raise it if many jobs fetch slow image URLs.",
    )
    db_pool_size: int = Field(
        20,
        ge=1,
        description="Database connections each process keeps open; up to 10 more are opened, and closed again, "
        "at peaks. Reopening a connection per request is slow, so this should cover a process's usual concurrency. "
        "An API process on PostgreSQL also opens up to half as many for the reads it makes without a thread.",
    )
    db_pool_timeout: float = Field(
        3.0, gt=0, description="Seconds a request waits for a free pooled database connection before a 503."
    )
    db_retry_seconds: float = Field(
        300.0,
        ge=0,
        description="How long a worker keeps retrying a job's database writes (claim, result) through an outage.",
    )
    storage_retry_seconds: float = Field(
        120.0,
        ge=0,
        description="How long a worker retries uploads, with backoff, before failing a job with `storage_unavailable`.",
    )
    worker_status_interval: float = Field(
        5.0, gt=0, description="Seconds between two status reports of a worker to Redis (read by /metrics and admin)."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="`json`: one JSON object per log line (API and worker); `text` for reading by eye."
    )
    test_faults: str = Field(
        "",
        description="Comma-separated faults a job can trigger (`crash`, `oom`, `hang`); honoured only when "
        "DARKROOM_ENV=test. See worker/faults.py.",
    )
    max_input_pixels: int = Field(
        16_777_216,
        ge=64 * 64,
        description="Largest input image (width x height) accepted; checked on the header before decoding.",
    )
    max_input_bytes: int = Field(10_485_760, ge=1, description="Largest input image file (upload or URL fetch).")
    upload_ttl_seconds: int = Field(86_400, ge=60, description="How long a `POST /v1/uploads` key stays usable.")
    retention_hours: float = Field(
        720,
        ge=0,
        description="Hours after a job ends before its images (outputs and inputs) are deleted and it becomes "
        "`expired`; 0 keeps them forever. Per tenant: `retention_hours` in DARKROOM_TENANT_POLICY_FILE.",
    )
    max_jobs_per_batch: int = Field(100, ge=1, description="Most jobs one `POST /v1/batches` may create.")
    fetch_timeout: float = Field(10.0, gt=0, description="Seconds an input image URL fetch may take in all.")
    fetch_allow_hosts: list[str] = Field(
        [],
        description="`host:port` pairs image URLs may fetch from although private (and over http); "
        "for tests and internal mirrors. Redirect targets are still checked.",
    )
    policy_deny_terms: list[str] = Field(
        [], description="Prompt words or phrases refused for every tenant (case-insensitive, whole words)."
    )
    policy_deny_patterns: list[str] = Field(
        [], description="Regular expressions refused in prompts for every tenant (case-insensitive)."
    )
    tenant_policy_file: Path | None = Field(
        None,
        description="TOML with per-tenant `[tenants.<name>]` settings: deny_terms, deny_patterns, `nsfw` "
        "(and the limits and retention documented in the README).",
    )
    tenant_rate_per_minute: int = Field(
        0, ge=0, description="Requests a tenant may make per rolling minute (GET /v1/usage excepted). 0: unlimited."
    )
    tenant_max_queued: int = Field(0, ge=0, description="Jobs a tenant may have queued at once. 0: unlimited.")
    tenant_max_running: int = Field(
        0, ge=0, description="Jobs of one tenant that workers run at once; the rest wait their turn. 0: unlimited."
    )
    tenant_images_per_period: int = Field(
        0, ge=0, description="Images (jobs x num_images) a tenant may submit per quota period. 0: unlimited."
    )
    tenant_quota_period: str = Field(
        "day",
        pattern=r"^(hour|day|month|[1-9][0-9]*)$",
        description="Length of the images quota period: `hour`, `day`, `month` (UTC calendar) or a number of "
        "seconds (periods aligned to the Unix epoch).",
    )
    tenant_max_priority: Literal["low", "normal", "high"] = Field(
        "high", description="Highest `priority` a tenant's jobs may ask for; above it a submit is refused with 422."
    )
    nsfw_action: str = Field(
        "withhold",
        description="What a safety-checker hit does by default: `withhold` (job fails with `content_policy`) "
        "or `flag` (image returned with `nsfw: true`).",
    )

    @model_validator(mode="after")
    def _defaults_and_secrets(self) -> Settings:
        self.data_dir = self.data_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'darkroom.db'}"
        if not self.storage_url:
            self.storage_url = (self.data_dir / "storage").as_uri()
        if self.model_cache_dir is None:
            self.model_cache_dir = self.data_dir / "models"
        if self.inductor_cache_dir is None:
            self.inductor_cache_dir = self.data_dir / "inductor-cache"
        if self.env == "production" and self.secret_key == PLACEHOLDER_SECRET:
            raise ValueError("DARKROOM_SECRET_KEY must be set when DARKROOM_ENV=production")
        if self.job_hard_time_limit <= self.job_soft_time_limit:
            raise ValueError("DARKROOM_JOB_HARD_TIME_LIMIT must be greater than DARKROOM_JOB_SOFT_TIME_LIMIT")
        if self.compile and not self.compile_shapes.strip():
            # Only listed shapes run compiled (worker/acceleration.py): compile without one compiles nothing.
            raise ValueError("DARKROOM_COMPILE_SHAPES must list the shapes to compile when DARKROOM_COMPILE is on")
        if self.test_faults and self.env != "test":
            raise ValueError("DARKROOM_TEST_FAULTS is only allowed with DARKROOM_ENV=test")
        return self

    @property
    def faults(self) -> frozenset[str]:
        """Test faults in force: none unless DARKROOM_ENV=test."""
        if self.env != "test":
            return frozenset()
        return frozenset(f.strip() for f in self.test_faults.split(",") if f.strip())

    @property
    def visibility_timeout(self) -> int:
        # Redis re-delivers an unacked message after this; it must outlast the longest job or a
        # running job would be handed to a second worker.
        return self.job_hard_time_limit * 2


@lru_cache
def get_settings() -> Settings:
    # DARKROOM_ENV_FILE picks another dotenv file; empty disables it (the test suite does, so a developer's
    # .env never leaks into tests).
    env_file = os.environ.get("DARKROOM_ENV_FILE", ".env")
    return Settings(_env_file=env_file or None)
