"""A small Python client for darkroom's HTTP API. It needs only httpx (no server code).

from client import Client
with Client("http://127.0.0.1:8000", api_key) as darkroom:
    job = darkroom.submit("a lighthouse at dusk", steps=20)
    done = darkroom.wait(job["id"], on_event=print)
"""

from client.aio import AsyncClient
from client.protocol import DarkroomAPIError, Event
from client.sync import Client
from client.types import Batch, BatchList, BatchSummary, Job, JobList, LimitUsage, Output, Upload, Usage, WebhookPayload
from client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "AsyncClient",
    "Batch",
    "BatchList",
    "BatchSummary",
    "Client",
    "DarkroomAPIError",
    "Event",
    "Job",
    "JobList",
    "LimitUsage",
    "Output",
    "Upload",
    "Usage",
    "WebhookPayload",
    "WebhookVerificationError",
    "verify_webhook",
]
