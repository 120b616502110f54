"""/v1/admin: operator views of the cluster (workers, queues), for keys of admin tenants only."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import AdminDep, SessionDep
from api.errors import responses
from shared import broker, workers
from shared.jobs import queue_stats
from shared.registry import get_registry
from shared.tables import utcnow

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class WorkerRead(BaseModel):
    id: str
    hostname: str | None = None
    pid: int | None = None
    heartbeat: datetime
    started: datetime | None = None
    loaded_models: list[str] = []
    current_job: str | None = None
    jobs: dict[str, int] = Field(default_factory=dict, description="Jobs this process ended, by outcome.")
    stopping: bool = False
    gpu_memory_allocated_bytes: int | None = None
    gpu_memory_reserved_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None


class WorkerList(BaseModel):
    data: list[WorkerRead]


class QueueRead(BaseModel):
    queue: str
    queued_jobs: int = Field(description="Jobs in status queued (database).")
    messages: int | None = Field(description="Messages in the queue's Redis list; null when Redis is unreachable.")
    oldest_queued_age_seconds: float | None


class QueueList(BaseModel):
    data: list[QueueRead]


def _time(value: object) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if isinstance(value, int | float) else None


@router.get("/workers", response_model=WorkerList, responses=responses(401, 403, 503))
def list_workers(_: AdminDep) -> WorkerList:
    """Live workers (those whose status report in Redis has not expired) and what each one is doing."""
    data = []
    for report in workers.read_all():
        heartbeat = _time(report.get("heartbeat"))
        if heartbeat is None:
            continue
        data.append(
            WorkerRead.model_validate({**report, "heartbeat": heartbeat, "started": _time(report.get("started"))})
        )
    return WorkerList(data=sorted(data, key=lambda w: w.id))


@router.get("/queues", response_model=QueueList, responses=responses(401, 403, 503))
def list_queues(session: SessionDep, _: AdminDep) -> QueueList:
    """Every model's queue: queued jobs, waiting messages, and how long the oldest job has waited."""
    stats = {queue: (n, first) for queue, n, first in queue_stats(session)}
    names = sorted({broker.queue_for_model(m) for m in get_registry().names} | set(stats))
    now = utcnow()
    data = []
    for queue in names:
        n, first = stats.get(queue, (0, None))
        try:
            messages: int | None = broker.queue_length(queue)
        except Exception:
            messages = None
        age = (now - first).total_seconds() if first is not None else None
        data.append(QueueRead(queue=queue, queued_jobs=n, messages=messages, oldest_queued_age_seconds=age))
    return QueueList(data=data)
