"""/metrics: Prometheus exposition of job, queue and worker figures (see api/metrics.py for each source).

Unauthenticated, like /healthz: it carries no tenant data (models, queues, counts and worker ids only).
Keep it on the private network Prometheus scrapes from.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.metrics import DarkroomCollector

router = APIRouter(tags=["metrics"])
_registry = CollectorRegistry(auto_describe=False)
_registry.register(DarkroomCollector())


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def get_metrics() -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(generate_latest(_registry), media_type=CONTENT_TYPE_LATEST)
