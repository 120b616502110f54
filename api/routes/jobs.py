"""/v1/jobs: submit (idempotently, optionally waiting), read (optionally long-polling), list and cancel jobs."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import aio_reads, deps, group_commit, live
from api.deps import SessionDep, SubmitterDep, TenantDep
from api.errors import responses
from api.generation import Inputs, read_inputs, store_inputs
from api.idempotency import KEY_DESCRIPTION, KEY_EXAMPLE, KEY_HEADER, REPLAYED_HEADER, optional_header
from api.pagination import decode_cursor, encode_cursor
from api.schemas import JobCreate, JobList, JobRead, JobStatus
from shared import broker, idempotency, jobs, limits, retention
from shared.db import read_scope, session_scope
from shared.job_view import eta_from, job_view, place_of
from shared.policy import check_prompt, policy_for
from shared.registry import ModelSpec, get_registry
from shared.scheduling import batch_key
from shared.settings import get_settings
from shared.storage import get_storage
from shared.tables import Job, new_id
from shared.tenants import cached_tenant_name, tenant_name
from shared.webhooks import validate_webhook_url

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("darkroom.api")


def to_read(job: Job, session: Session | None = None) -> JobRead:
    """The job as the API shows it; with a session, a queued job also gets queue_position and eta_seconds."""
    return JobRead.model_validate(job_view(session, job))


def _read(job_id: str, tenant_id: str) -> JobRead:
    # Reads only, on an autocommit connection: a poll is the hottest request there is, and BEGIN and COMMIT
    # would be two of its round trips. The job and its queue position may come from two snapshots, which a
    # view that is stale the moment it is sent can afford.
    with read_scope() as session:
        return to_read(jobs.get_job(session, job_id, tenant_id), session)


@dataclass
class PreparedJob:
    """A request that passed every check POST /v1/jobs makes, ready to be stored and inserted."""

    body: JobCreate
    spec: ModelSpec
    request: dict[str, Any]
    inputs: Inputs
    limits: limits.TenantLimits


def prepare_job(body: JobCreate, tenant_id: str) -> PreparedJob:
    """Validate a job request as POST /v1/jobs does (POST /v1/batches runs each of its jobs through here)."""
    settings = get_settings()
    # Cheap refusals first: the content policy, then input images (fetched and decoded here, so a bad
    # image is a 422 now rather than a failed job later), then the model's limits.
    name = tenant_name(tenant_id)
    tenant_limits = limits.limits_for(name)
    limits.check_priority(body.priority, tenant_limits)
    policy = policy_for(name)
    check_prompt(policy, name, {"prompt": body.prompt, "negative_prompt": body.negative_prompt})
    inputs = read_inputs(body.image, body.mask, tenant_id)
    spec, request = body.normalise(get_registry(), settings.default_model, input_size=inputs.size)
    request["nsfw"] = policy.nsfw
    if body.webhook_url is not None:
        validate_webhook_url(body.webhook_url, allow_private=settings.webhook_allow_private)
    return PreparedJob(body, spec, request, inputs, tenant_limits)


def job_fields(
    prepared: PreparedJob, tenant_id: str, job_id: str, *, batch_id: str | None = None, batch_index: int | None = None
) -> dict[str, Any]:
    """The fields of `shared.jobs.new_job` for a prepared job (its inputs already stored under `job_id`)."""
    body, request = prepared.body, prepared.request
    return {
        "job_id": job_id,
        "tenant_id": tenant_id,
        "model": prepared.spec.name,
        "queue": broker.queue_for_model(prepared.spec.name),
        "request": request,
        "metadata": body.metadata,
        "webhook_url": body.webhook_url,
        "webhook_events": list(body.webhook_events) if body.webhook_events else None,
        "batch_key": batch_key(request),
        "batch_id": batch_id,
        "batch_index": batch_index,
        "priority": limits.PRIORITIES[body.priority],
    }


@dataclass
class Staged:
    """A submit ready for a group commit: validated, its images charged, its inputs stored."""

    job: Job
    limits: limits.TenantLimits
    charged: int


def _stage(body: JobCreate, tenant_id: str, prepared: PreparedJob | None = None) -> Staged | PreparedJob:
    """Everything a submit does before its insert; a tenant with a queued-jobs limit gets its prepared job
    back instead: that limit is counted under a per-tenant lock after each insert, one submit at a time."""
    if prepared is None:
        prepared = prepare_job(body, tenant_id)
    if prepared.limits.max_queued:
        return prepared
    charged = limits.charge_images(tenant_id, prepared.limits, body.num_images)
    try:
        job_id = new_id()
        store_inputs(get_storage(), job_id, prepared.inputs, prepared.request)
        return Staged(jobs.new_job(**job_fields(prepared, tenant_id, job_id)), prepared.limits, charged)
    except BaseException:
        limits.refund_images(tenant_id, prepared.limits, charged)
        raise


async def _submit_grouped(body: JobCreate, submitter: deps.Submitter) -> JobRead:
    tenant_id = submitter.tenant_id
    staged: Staged | PreparedJob
    if body.image is None and body.mask is None and body.webhook_url is None and cached_tenant_name(tenant_id):
        # No image to fetch or decode, no webhook host to resolve, a tenant this process knows: validating is
        # CPU only, done here rather than after a hop to a worker thread. An images quota is charged in Redis.
        try:
            prepared = prepare_job(body, tenant_id)
            if prepared.limits.images_per_period:
                staged = await run_in_threadpool(_stage, body, tenant_id, prepared)
            else:
                staged = _stage(body, tenant_id, prepared)
        except Exception:
            await deps.confirm(submitter)  # a revoked key is told so, not what else was wrong (a quota, say)
            raise
    else:
        # Input images are fetched and stored, and a webhook host resolved, for a live key only.
        await deps.confirm(submitter)
        staged = await run_in_threadpool(_stage, body, tenant_id)
    if isinstance(staged, PreparedJob):
        await deps.confirm(submitter)
        return (await run_in_threadpool(_submit, body, tenant_id, None, staged))[0]
    try:
        # The insert checks a key not confirmed yet, in the same statement.
        return await group_commit.commit(staged.job, submitter.unconfirmed)
    except Exception:
        await run_in_threadpool(limits.refund_images, tenant_id, staged.limits, staged.charged)
        raise


def _submit(
    body: JobCreate, tenant_id: str, key: str | None, prepared: PreparedJob | None = None
) -> tuple[JobRead, bool]:
    """Create and publish the job, or find the one this idempotency key made. Returns (job, replayed)."""
    # 1. Validate everything first: an invalid request does not use up its idempotency key.
    if prepared is None:
        prepared = prepare_job(body, tenant_id)
    # 2. Claim the key, or replay what its first request created.
    if key is not None:
        fingerprint = idempotency.fingerprint("POST", "/v1/jobs", body.model_dump(mode="json", exclude_unset=True))
        replay = idempotency.claim(tenant_id, key, fingerprint)
        if replay is not None and replay.job_id is not None:
            return _read(replay.job_id, tenant_id), True
    # 3. The job and the completed key commit together: a key never points at a job that does not exist.
    # Inputs are stored only once the key is ours, so a replay leaves no orphaned images behind.
    charged = 0
    try:
        # Charged before the job exists and refunded if it is not made: two API processes racing for the
        # last images of a quota cannot both win.
        charged = limits.charge_images(tenant_id, prepared.limits, body.num_images)
        job_id = new_id()
        store_inputs(get_storage(), job_id, prepared.inputs, prepared.request)
        with session_scope() as session:
            job = jobs.create_job(session, **job_fields(prepared, tenant_id, job_id))
            limits.check_queued(session, tenant_id, prepared.limits)
            if key is not None:
                idempotency.complete(session, tenant_id, key, status=202, body=None, job_id=job.id)
            # Rendered inside the creating transaction: once it commits, the answer is a 202 whatever the
            # database does next, so a client is never told "refused" about a job that exists.
            created = to_read(job, session)
            # 4. Published only after the commit; if Redis is down then, the client keeps its 202.
            jobs.publish_after_commit(session, job)
    except BaseException:
        limits.refund_images(tenant_id, prepared.limits, charged)
        idempotency.release_after_failure(tenant_id, key)
        raise
    return created, False


PREFER_DESCRIPTION = (
    "RFC 7240 `wait=N` (N <= 60): hold the response up to N seconds; if the job ends by then the answer is 200 "
    "with the finished job, otherwise 202 as usual. `Preference-Applied: wait=N` confirms the wait."
)


@router.post(
    "",
    status_code=202,
    response_model=JobRead,
    responses={
        200: {
            "model": JobRead,
            "description": "An idempotent replay (`Idempotent-Replayed: true`: the job the key first created, as it "
            "is now), or a job that finished within `Prefer: wait`.",
        },
        **responses(401, 409, 413, 422, 429, 503),
    },
    # Its two optional headers are read from the request, not declared as Header parameters: FastAPI resolves
    # each declared parameter with type introspection on every request, about 13 us apiece in-process, on
    # the route that takes the most requests. Documented as FastAPI would document them.
    openapi_extra={
        "parameters": [
            optional_header(KEY_HEADER, KEY_DESCRIPTION, KEY_EXAMPLE),
            optional_header("Prefer", PREFER_DESCRIPTION, "wait=30"),
        ]
    },
)
async def create_job(body: JobCreate, submitter: SubmitterDep, request: Request) -> Response:
    """Submit a job; it is queued at once and runs on the next free worker for its model."""
    tenant_id = submitter.tenant_id
    idempotency_key, prefer = request.headers.get(KEY_HEADER), request.headers.get("Prefer")
    if idempotency_key is None:
        job, replayed = await _submit_grouped(body, submitter), False
    else:
        await deps.confirm(submitter)
        job, replayed = await run_in_threadpool(_submit, body, tenant_id, idempotency_key)
    headers = {}
    wait = live.prefer_wait(prefer)
    if wait is not None:
        await live.wait_for_terminal(job.id, wait)
        headers["Preference-Applied"] = f"wait={wait}"
        with contextlib.suppress(Exception):  # the job exists: a failed re-read still answers with it
            job = await run_in_threadpool(_read, job.id, tenant_id)
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    status = 200 if replayed or (wait is not None and job.status in jobs.TERMINAL) else 202
    return _json(job, status, headers)


def _json(job: JobRead, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Rendered here rather than by FastAPI, which would validate the model a second time.
    return Response(job.model_dump_json(), status, headers, media_type="application/json")


@router.get("", response_model=JobList, responses=responses(401, 422))
def list_jobs(
    session: SessionDep,
    tenant_id: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobList:
    """Your jobs, newest first, one page at a time."""
    after = decode_cursor(cursor) if cursor else None
    page = jobs.list_jobs(session, tenant_id, status=status, limit=limit + 1, after=after)
    more = len(page) > limit
    page = page[:limit]
    return JobList(
        data=[to_read(j, session) for j in page],
        next_cursor=encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    )


@router.get("/{job_id}", response_model=JobRead, responses=responses(401, 404, 422))
async def get_job(
    request: Request,
    job_id: str,
    wait: Annotated[
        int,
        Query(ge=0, le=live.MAX_WAIT, description="Long poll: answer once the job ends, or after this many seconds."),
    ] = 0,
) -> Response:
    """One job with its status, progress and, once succeeded, its output URLs."""
    job = await _poll(request, job_id, metered=True)
    if wait and job.status not in jobs.TERMINAL:
        await live.wait_for_terminal(job_id, wait)
        job = await _poll(request, job_id, metered=False)
    return _json(job)


async def _poll(request: Request, job_id: str, *, metered: bool) -> JobRead:
    """The job for the request's key (401, 404), counted against the tenant's rate if `metered` (429)."""
    if not aio_reads.enabled():
        return await run_in_threadpool(_poll_sync, request, job_id, metered)
    digest = deps.key_hash(request)
    found = await aio_reads.find(job_id, digest) if digest else None
    if found is None:
        raise deps.invalid_key()
    tenant_id = deps.admit(request, found.tenant_id)
    if metered:
        await deps.check_rate(tenant_id)
    if found.job is None:
        raise aio_reads.not_found(job_id)
    place = None
    if found.job.status == "queued":
        position, average = await aio_reads.place(found)
        if position < 0:  # Redis cannot tell: the jobs ahead are counted in the database
            return await run_in_threadpool(_read_counted, found.job, (position, average))
        place = position, eta_from(average, position, found.running)
    return JobRead.model_validate(job_view(None, found.job, place=place))


def _read_counted(job: Job, asked: tuple[int, float | None]) -> JobRead:
    with read_scope() as session:
        return JobRead.model_validate(job_view(None, job, place=place_of(session, job, asked=asked)))


def _poll_sync(request: Request, job_id: str, metered: bool) -> JobRead:
    tenant_id = deps.get_tenant_sync(request) if metered else deps.authenticate_request(request)
    return _read(job_id, tenant_id)


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


@router.delete("/{job_id}", response_model=JobRead, responses=responses(401, 404, 409))
def delete_job(job_id: str, tenant_id: TenantDep) -> JobRead:
    """Delete a finished job's images now; the job stays, as `expired`. Queued or running: 409, cancel first."""
    return to_read(retention.delete_job(job_id, tenant_id))
