"""/v1/batches: submit many jobs at once (all or nothing), read them as one, cancel what has not ended."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from api.batch_schemas import BatchCreate, BatchList, BatchRead, BatchSummary
from api.deps import SessionDep, TenantDep
from api.errors import responses
from api.generation import store_inputs
from api.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader
from api.pagination import decode_cursor, encode_cursor
from api.routes.jobs import PreparedJob, job_fields, prepare_job
from api.routes.webhooks import deliveries_read
from api.schemas import JobCreate, WebhookDeliveryList
from shared import batches, broker, idempotency, jobs, limits
from shared.batch_view import batch_view
from shared.db import session_scope
from shared.errors import DarkroomError, InvalidRequest
from shared.settings import get_settings
from shared.storage import get_storage
from shared.tables import WebhookDelivery, new_id
from shared.webhooks import validate_webhook_url

router = APIRouter(prefix="/v1/batches", tags=["batches"])
log = logging.getLogger("darkroom.api")

# Where a job's error points in the batch request: a function from "field: reason" to "path.field: reason".
Locate = Callable[[str], str]


def _in_jobs(i: int) -> Locate:
    return lambda message: f"jobs[{i}].{message}"


def _expand(body: BatchCreate) -> list[tuple[JobCreate, Locate]]:
    """The batch's job requests, each with how to name its fields in an error (`jobs[3].width`)."""
    if body.jobs is not None:
        return [(job, _in_jobs(i)) for i, job in enumerate(body.jobs)]
    assert body.job is not None
    template, field = body.job, "prompt" if body.prompts is not None else "seed"
    if field == "prompt" and template.prompt is not None:
        raise InvalidRequest("job.prompt: leave it out when `prompts` gives each job's prompt")
    if field == "seed" and template.seed is not None:
        raise InvalidRequest("job.seed: leave it out when `seeds` gives each job's seed")
    if field == "seed" and template.prompt is None:
        raise InvalidRequest("job.prompt: field required")
    values: list[str] | list[int] = body.prompts if body.prompts is not None else body.seeds or []

    def locate(i: int) -> Locate:
        # An error in the varying field names the list item; any other names the shared template.
        def at(message: str) -> str:
            name, _, reason = message.partition(":")
            return f"{field}s[{i}]:{reason}" if name == field else f"job.{message}"

        return at

    return [(template.model_copy(update={field: value}), locate(i)) for i, value in enumerate(values)]


def _prepare(body: BatchCreate, tenant_id: str) -> list[PreparedJob]:
    # The cap first, before any job is built or checked.
    cap = get_settings().max_jobs_per_batch
    for name in ("jobs", "prompts", "seeds"):
        given = getattr(body, name)
        if given is not None and len(given) > cap:
            raise InvalidRequest(f"{name}: at most {cap} jobs per batch, got {len(given)}")
    items = _expand(body)
    if body.webhook_url is not None:
        validate_webhook_url(body.webhook_url, allow_private=get_settings().webhook_allow_private)
    prepared = []
    for job, locate in items:
        try:
            prepared.append(prepare_job(job, tenant_id))
        except DarkroomError as exc:
            exc.message = locate(exc.message)
            raise
    return prepared


def _read(batch_id: str, tenant_id: str) -> BatchRead:
    with session_scope() as session:
        return BatchRead.model_validate(batch_view(session, batches.get_batch(session, batch_id, tenant_id)))


def _submit(body: BatchCreate, tenant_id: str, key: str | None) -> tuple[BatchRead, bool]:
    """Create the batch and all its jobs in one transaction, or replay what this key made."""
    # 1. Every job is checked before anything is stored: one bad job refuses the whole batch.
    prepared = _prepare(body, tenant_id)
    # 2. Claim the key, or replay the batch its first request created.
    if key is not None:
        fingerprint = idempotency.fingerprint("POST", "/v1/batches", body.model_dump(mode="json", exclude_unset=True))
        replay = idempotency.claim(tenant_id, key, fingerprint)
        if replay is not None and replay.body is not None:
            return _read(str(replay.body["batch_id"]), tenant_id), True
    # 3. Inputs stored, then the batch, its jobs and the completed key commit together. The images quota is
    # charged for the whole batch first and refunded if the batch is not made, as for a single job.
    tenant_limits = prepared[0].limits
    charged = 0
    try:
        charged = limits.charge_images(tenant_id, tenant_limits, sum(job.body.num_images for job in prepared))
        job_ids = [new_id() for _ in prepared]
        storage = get_storage()
        for job_id, job in zip(job_ids, prepared, strict=True):
            store_inputs(storage, job_id, job.inputs, job.request)
        with session_scope() as session:
            batch = batches.create_batch(
                session, tenant_id=tenant_id, total=len(prepared), webhook_url=body.webhook_url, metadata=body.metadata
            )
            created = [
                jobs.create_job(session, **job_fields(job, tenant_id, job_id, batch_id=batch.id, batch_index=i))
                for i, (job_id, job) in enumerate(zip(job_ids, prepared, strict=True))
            ]
            limits.check_queued(session, tenant_id, tenant_limits, adding=len(created))
            if key is not None:
                idempotency.complete(session, tenant_id, key, status=202, body={"batch_id": batch.id}, job_id=None)
            result = BatchRead.model_validate(batch_view(session, batch))
            # 4. Published after the commit, with the jobs' stream events; the reconciler publishes whatever
            # Redis missed.
            for made in created:
                jobs.publish_after_commit(session, made)
    except BaseException:
        limits.refund_images(tenant_id, tenant_limits, charged)
        idempotency.release_after_failure(tenant_id, key)
        raise
    return result, False


@router.post(
    "",
    status_code=202,
    response_model=BatchRead,
    responses={
        200: {
            "model": BatchRead,
            "description": "An idempotent replay: the batch the key first created, as it is now.",
        },
        **responses(401, 409, 413, 422, 429, 503),
    },
)
async def create_batch(
    body: BatchCreate, tenant_id: TenantDep, response: Response, idempotency_key: IdempotencyKeyHeader = None
) -> BatchRead:
    """Submit many jobs at once: all are queued, or (any invalid) none is and the error names the job."""
    batch, replayed = await run_in_threadpool(_submit, body, tenant_id, idempotency_key)
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
        response.status_code = 200
    return batch


@router.get("", response_model=BatchList, responses=responses(401, 422))
def list_batches(
    session: SessionDep,
    tenant_id: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> BatchList:
    """Your batches, newest first, with their counts (not their jobs), one page at a time."""
    after = decode_cursor(cursor) if cursor else None
    page = batches.list_batches(session, tenant_id, limit=limit + 1, after=after)
    more = len(page) > limit
    page = page[:limit]
    return BatchList(
        data=[BatchSummary.model_validate(batch_view(session, b, with_jobs=False)) for b in page],
        next_cursor=encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    )


@router.get("/{batch_id}", response_model=BatchRead, responses=responses(401, 404))
def get_batch(batch_id: str, tenant_id: TenantDep) -> BatchRead:
    """One batch: its aggregate status, the count of its jobs in each status, and the jobs."""
    return _read(batch_id, tenant_id)


@router.post("/{batch_id}/cancel", response_model=BatchRead, responses=responses(401, 404, 409))
def cancel_batch(batch_id: str, tenant_id: TenantDep) -> BatchRead:
    """Cancel every job of the batch that has not ended (running ones stop at their next step)."""
    with session_scope() as session:
        canceled = batches.cancel_batch(session, batch_id, tenant_id)
    for job_id in canceled:
        try:
            broker.request_cancel(job_id)
        except Exception as exc:  # the job is canceled in the database; its worker sees that at its next step
            log.warning("cancel flag for %s not set (%s)", job_id, type(exc).__name__)
    return _read(batch_id, tenant_id)


@router.get("/{batch_id}/webhooks", response_model=WebhookDeliveryList, responses=responses(401, 404))
def list_batch_webhooks(batch_id: str, session: SessionDep, tenant_id: TenantDep) -> WebhookDeliveryList:
    """The batch's own webhook deliveries (`batch.completed`), each with its attempts."""
    batches.get_batch(session, batch_id, tenant_id)
    return deliveries_read(session, WebhookDelivery.batch_id == batch_id)
