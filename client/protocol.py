"""What the blocking and the async client share: errors, the retry policy, and an SSE parser."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled", "expired")
RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER = 30.0


class DarkroomAPIError(Exception):
    def __init__(self, status_code: int, code: str, message: str):
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message


def raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise DarkroomAPIError(response.status_code, code, message)


def retry_delay(response: httpx.Response, attempt: int) -> float | None:
    """Seconds to wait before retrying this answer, or None when it is not worth retrying.

    429 and 503 are retried, as is 409 `idempotency_key_in_flight` (our own earlier try is still running).
    Retry-After is honoured; one longer than MAX_RETRY_AFTER (an images quota that resets tomorrow) is not
    waited out but raised at once. Without it the wait doubles from 0.5 s.
    """
    retryable = response.status_code in RETRY_STATUSES
    if response.status_code == 409:
        try:
            retryable = response.json()["error"]["code"] == "idempotency_key_in_flight"
        except (ValueError, KeyError, TypeError):
            retryable = False
    if not retryable:
        return None
    header = response.headers.get("retry-after", "")
    try:
        seconds = max(float(header), 0.0)
    except ValueError:
        return min(0.5 * 2**attempt, MAX_RETRY_AFTER)
    return seconds if seconds <= MAX_RETRY_AFTER else None


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def upload_file(image: bytes | str | os.PathLike[str]) -> dict[str, tuple[str, bytes]]:
    """The multipart `file` field of POST /v1/uploads: the image's bytes, or those of the file at its path."""
    if isinstance(image, bytes):
        return {"file": ("image", image)}
    path = Path(image)
    return {"file": (path.name, path.read_bytes())}


def submit_options(
    idempotency_key: str | None, wait: int | None, read_timeout: float | None
) -> tuple[dict[str, str], httpx.Timeout | None]:
    """Headers and timeout of a submit: an idempotency key always, and `Prefer: wait` with a read timeout
    that outlasts the wait."""
    headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
    if not wait:
        return headers, None
    headers["Prefer"] = f"wait={wait}"
    return headers, httpx.Timeout(read_timeout or 30.0, read=wait + 30.0)


def job_body(prompt: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}


def batch_body(
    jobs: list[dict[str, Any]] | None,
    job: dict[str, Any] | None,
    prompts: list[str] | None,
    seeds: list[int] | None,
    webhook_url: str | None,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    fields = {"jobs": jobs, "job": job, "prompts": prompts, "seeds": seeds, "webhook_url": webhook_url}
    return {k: v for k, v in {**fields, "metadata": metadata}.items() if v is not None}


@dataclass
class Event:
    """One Server-Sent Event of GET /v1/jobs/{id}/events (`data` parsed as JSON)."""

    type: str
    data: dict[str, Any]
    id: str | None = None


@dataclass
class SSEParser:
    """Feeds on lines, yields complete events (the WHATWG event-stream rules darkroom uses)."""

    last_id: str | None = None
    _type: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, lines: Iterable[str]) -> list[Event]:
        out = []
        for line in lines:
            event = self.line(line)
            if event is not None:
                out.append(event)
        return out

    def line(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data and not self._type:
                return None
            event = Event(self._type or "message", json.loads("\n".join(self._data) or "{}"), self._id)
            if self._id is not None:
                self.last_id = self._id
            self._type, self._data, self._id = "", [], None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


def progress_events(job: dict[str, Any], last: tuple[str, int | None] | None) -> list[Event]:
    """Events a poll reveals, for the polling fallback of `wait` (so callers see one kind of callback)."""
    status, step = job["status"], (job.get("progress") or {}).get("step")
    if last == (status, step):
        return []
    if status in TERMINAL:
        return [Event(status, job)]
    if status == "queued":
        return [Event("queued", {"status": "queued", "queue_position": job.get("queue_position")})]
    events = [] if last and last[0] == "running" else [Event("started", {"status": "running"})]
    if job.get("progress"):
        events.append(Event("progress", dict(job["progress"])))
    return events
