"""GET /v1/jobs/{id}/events: a job's live progress as Server-Sent Events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api import live
from api.deps import TenantDep
from api.errors import responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

EVENTS_DESCRIPTION = """
`text/event-stream`, one event per change, ending after the terminal one:

* `queued` `{"status": "queued", "queue_position": 2, "eta_seconds": 14}` (sent again, without an id,
  when the position changes)
* `started` `{"status": "running", "attempt": 1}`
* `progress` `{"step": 3, "total": 20}`, and every few steps (`DARKROOM_PREVIEW_EVERY_STEPS`) a `preview`: a small
  JPEG `data:` URI of the job's first image so far, drawn from the latents (one pixel per latent pixel, so
  1/8 of the size; models with another latent space send none)
* `succeeded` | `failed` | `canceled` | `expired`: the job exactly as `GET /v1/jobs/{id}` returns it; then
  the stream closes.

Events carry ids: reconnect with `Last-Event-ID` to resume after the last one you saw. A new connection
without it replays the job's events from the start (kept for 24 h), so a finished job answers with its
whole story at once. Comments (`: ping`) keep idle connections open.
"""

EXAMPLE_STREAM = (
    'id: 1767268800000-0\\nevent: queued\\ndata: {"status": "queued", "queue_position": 0, "eta_seconds": 4}\\n\\n'
    'id: 1767268800950-0\\nevent: started\\ndata: {"status": "running", "attempt": 1}\\n\\n'
    'id: 1767268801200-0\\nevent: progress\\ndata: {"step": 1, "total": 4}\\n\\n'
    'id: 1767268802100-0\\nevent: succeeded\\ndata: {"id": "3f1c...", "status": "succeeded", ...}\\n\\n'
)


def _check(job_id: str, tenant_id: str) -> None:
    live.snapshot(job_id, tenant_id)  # raises NotFound before the stream starts


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    description=EVENTS_DESCRIPTION,
    responses={
        200: {"content": {"text/event-stream": {"example": EXAMPLE_STREAM}}, "description": "The event stream."},
        **responses(401, 404),
    },
)
async def job_events(
    job_id: str,
    tenant_id: TenantDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this event id.")
    ] = None,
) -> EventSourceResponse:
    """Live events of one job (Server-Sent Events), from queued to its terminal event."""
    await run_in_threadpool(_check, job_id, tenant_id)
    return EventSourceResponse(live.job_events(job_id, last_event_id), ping=15)
