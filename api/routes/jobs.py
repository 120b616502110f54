"""/v1/jobs: submit, read, list and cancel generation jobs."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import SessionDep, TenantDep
from api.errors import responses
from api.generation import read_inputs, store_inputs
from api.schemas import JobCreate, JobList, JobRead, JobStatus
from shared import broker, jobs
from shared.db import session_scope
from shared.errors import InvalidRequest
from shared.policy import check_prompt, policy_for
from shared.registry import get_registry
from shared.settings import get_settings
from shared.storage import get_storage
from shared.tables import Job, Tenant, new_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("darkroom.api")


def to_read(job: Job) -> JobRead:
    storage = get_storage()
    outputs = [
        {
            "url": storage.url(o["key"]),
            "nsfw": o.get("nsfw", False),
            **{k: o[k] for k in ("width", "height", "seed", "content_type")},
        }
        for o in job.outputs or []
    ]
    progress = None
    if job.status == jobs.RUNNING and job.progress_total:
        progress = {"step": job.progress_step or 0, "total": job.progress_total}
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    return JobRead.model_validate(
        {
            "id": job.id,
            "status": job.status,
            "model": job.model,
            "request": job.request,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "progress": progress,
            "outputs": outputs,
            "error": error,
            "metadata": job.client_metadata,
        }
    )


@router.post("", status_code=202, response_model=JobRead, responses=responses(401, 413, 422, 503))
def create_job(body: JobCreate, tenant_id: TenantDep) -> JobRead:
    """Submit a job; it is queued at once and runs on the next free worker for its model."""
    settings = get_settings()
    # Cheap refusals first: the content policy, then input images (fetched and decoded here, so a bad
    # image is a 422 now rather than a failed job later), then the model's limits.
    with session_scope() as session:
        tenant_name = session.get_one(Tenant, tenant_id).name
    policy = policy_for(tenant_name)
    check_prompt(policy, tenant_name, {"prompt": body.prompt, "negative_prompt": body.negative_prompt})
    inputs = read_inputs(body.image, body.mask, tenant_id)
    spec, request = body.normalise(get_registry(), settings.default_model, input_size=inputs.size)
    request["nsfw"] = policy.nsfw
    job_id = new_id()
    store_inputs(get_storage(), job_id, inputs, request)
    with session_scope() as session:
        job = jobs.create_job(
            session,
            job_id=job_id,
            tenant_id=tenant_id,
            model=spec.name,
            queue=broker.queue_for_model(spec.name),
            request=request,
            metadata=body.metadata,
        )
    # Published only after the commit. If Redis is down the job is still durable: the reconciler
    # publishes it once Redis is back, so the client keeps its 202.
    try:
        broker.publish_job(job.id, job.queue)
    except Exception as exc:
        log.warning("publishing job %s failed (%s); the reconciler will retry", job.id, type(exc).__name__)
    return to_read(job)


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidRequest("cursor: not a cursor returned by this API") from exc


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(json.dumps([job.created_at.isoformat(), job.id]).encode()).decode()


@router.get("", response_model=JobList, responses=responses(401, 422))
def list_jobs(
    session: SessionDep,
    tenant_id: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobList:
    """Your jobs, newest first, one page at a time."""
    after = _decode_cursor(cursor) if cursor else None
    page = jobs.list_jobs(session, tenant_id, status=status, limit=limit + 1, after=after)
    more = len(page) > limit
    page = page[:limit]
    return JobList(data=[to_read(j) for j in page], next_cursor=_encode_cursor(page[-1]) if more else None)


@router.get("/{job_id}", response_model=JobRead, responses=responses(401, 404))
def get_job(job_id: str, session: SessionDep, tenant_id: TenantDep) -> JobRead:
    """One job with its status, progress and, once succeeded, its output URLs."""
    return to_read(jobs.get_job(session, job_id, tenant_id))


@router.post("/{job_id}/cancel", response_model=JobRead, responses=responses(401, 404, 409))
def cancel_job(job_id: str, tenant_id: TenantDep) -> JobRead:
    """Cancel a queued or running job. A running job stops at its next denoising step."""
    with session_scope() as session:
        job = jobs.cancel_job(session, job_id, tenant_id)
    try:
        broker.request_cancel(job_id)
    except Exception as exc:
        # The job is already canceled in the database; the worker also sees that at its next
        # progress write, so a missing Redis flag only makes it stop a little later.
        log.warning("cancel flag for %s not set (%s)", job_id, type(exc).__name__)
    return to_read(job)
