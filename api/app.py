"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI

from api import aio_reads, errors
from api.context import RequestContext
from api.limits import BodySizeLimit
from api.routes import admin, batches, events, files, health, jobs, metrics, models, uploads, usage, webhooks
from shared import limits
from shared.settings import get_settings

DESCRIPTION = """
darkroom runs Stable Diffusion jobs on a pool of GPU workers. Submit a job, get its id at once, then poll
`GET /v1/jobs/{id}` until it is `succeeded` and download its `outputs`.

Every `/v1` route needs `Authorization: Bearer <key>`. Errors are `{"error": {"code", "message"}}`.

For product backends: `Idempotency-Key` on creating POSTs makes retries safe; `webhook_url` on a job gets
signed Standard Webhooks notifications; `GET /v1/jobs/{id}/events` streams live progress (SSE);
`GET /v1/jobs/{id}?wait=N` and `Prefer: wait=N` on submit long-poll for the result; `POST /v1/batches`
submits many jobs at once. Images expire after a retention period (the job then reads `expired`);
`DELETE /v1/jobs/{id}` deletes them at once. Per-tenant limits (request rate, queued and running jobs,
images per period) answer 429 with `Retry-After`; `GET /v1/usage` shows them.
"""


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Sync work (database, Redis, input images) runs on anyio's thread pool. Its default of 40 threads
    # fighting over one GIL cost a fifth of the throughput of a busy process (bench.api).
    to_thread.current_default_thread_limiter().total_tokens = get_settings().api_threads
    # What start-up made (modules, routes, models, metadata) lives as long as the process: moved out of the
    # collector's reach, a full collection no longer walks it, and under load those collections were the
    # slowest submits (bench.api: accept p99 about 140 ms with them, 65-90 ms without). Once per process.
    if not gc.get_freeze_count():
        gc.collect()
        gc.freeze()
    yield
    await aio_reads.close()


def create_app() -> FastAPI:
    settings = get_settings()
    limits.check_tenant_file()
    app = FastAPI(title="darkroom", version="1", description=DESCRIPTION, lifespan=lifespan)
    errors.install(app)
    for module in (jobs, batches, events, webhooks, models, uploads, usage, health, files, admin, metrics):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Outermost, so the request id is known to every log line and echoed on every response, refusals too.
    app.add_middleware(RequestContext)
    errors.document_errors(app)
    return app
