"""Async client (asyncio): the same calls as `Client`, awaited."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httpx

from client.protocol import (
    TERMINAL,
    DarkroomAPIError,
    Event,
    SSEParser,
    batch_body,
    job_body,
    new_idempotency_key,
    progress_events,
    raise_for_error,
    retry_delay,
    submit_options,
    upload_file,
)
from client.types import Batch, BatchList, Job, JobList, Upload, Usage

# Module-level names: inside the class, `list` is the method that lists jobs.
JobBodies = list[dict[str, Any]]
Prompts = list[str]
Seeds = list[int]

__all__ = ["AsyncClient"]


class AsyncClient:
    """`AsyncClient(url, api_key)`; every method returns the API's JSON as typed dicts.

    Requests answered 429 or 503 are retried up to `max_retries` times, honouring Retry-After. Submits
    carry an Idempotency-Key (a new UUID unless given), so retrying one never creates a second job.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0, max_retries: int = 3):
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, safe: bool = True, **kwargs: Any) -> Any:
        """One call with bounded retries. `safe`: a lost connection may be retried (reads, keyed POSTs)."""
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if not safe or attempt >= self.max_retries:
                    raise
                await asyncio.sleep(min(0.5 * 2**attempt, 5))
                attempt += 1
                continue
            delay = retry_delay(response, attempt) if attempt < self.max_retries else None
            if delay is None:
                raise_for_error(response)
                return response.json()
            await asyncio.sleep(delay)
            attempt += 1

    async def submit(
        self,
        prompt: str,
        *,
        idempotency_key: str | None = None,
        wait: int | None = None,
        **fields: Any,
    ) -> Job:
        """Submit a job. `wait`: ask the server to hold the answer up to that many seconds (Prefer: wait)."""
        headers, timeout = submit_options(idempotency_key, wait, self._http.timeout.read)
        body = job_body(prompt, fields)
        return cast(Job, await self._request("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout))

    async def upload(self, image: bytes | str | os.PathLike[str], *, idempotency_key: str | None = None) -> Upload:
        """Upload an input image (PNG, JPEG or WebP: its bytes, or a file's path) for a job's `image` or
        `mask`. Keyed as a submit is, so a retried upload stores the image once."""
        headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
        files = await asyncio.to_thread(upload_file, image)  # a file's read off the event loop
        return cast(Upload, await self._request("POST", "/v1/uploads", files=files, headers=headers))

    async def get(self, job_id: str, *, wait: int | None = None) -> Job:
        """One job; `wait` long-polls up to that many seconds (<= 60) for it to end."""
        if wait:
            return cast(
                Job,
                await self._request("GET", f"/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 30.0),
            )
        return cast(Job, await self._request("GET", f"/v1/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> Job:
        return cast(Job, await self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    async def usage(self) -> Usage:
        """Your limits and what you have used of each (never counted against the rate limit)."""
        return cast(Usage, await self._request("GET", "/v1/usage"))

    async def list(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobList:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return cast(JobList, await self._request("GET", "/v1/jobs", params=params))

    async def batch(
        self,
        jobs: JobBodies | None = None,
        *,
        job: dict[str, Any] | None = None,
        prompts: Prompts | None = None,
        seeds: Seeds | None = None,
        webhook_url: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        """Submit many jobs at once: `jobs` (job bodies), or one `job` with `prompts` or `seeds`. All or none."""
        headers, _ = submit_options(idempotency_key, None, None)
        body = batch_body(jobs, job, prompts, seeds, webhook_url, metadata)
        return cast(Batch, await self._request("POST", "/v1/batches", json=body, headers=headers))

    async def get_batch(self, batch_id: str) -> Batch:
        """A batch: aggregate status, counts per job status, and its jobs."""
        return cast(Batch, await self._request("GET", f"/v1/batches/{batch_id}"))

    async def cancel_batch(self, batch_id: str) -> Batch:
        """Cancel every job of the batch that has not ended."""
        return cast(Batch, await self._request("POST", f"/v1/batches/{batch_id}/cancel"))

    async def list_batches(self, *, limit: int = 20, cursor: str | None = None) -> BatchList:
        params = {k: v for k, v in {"limit": limit, "cursor": cursor}.items() if v is not None}
        return cast(BatchList, await self._request("GET", "/v1/batches", params=params))

    async def delete(self, job_id: str) -> Job:
        """Delete a finished job's images now; the job stays, as `expired`."""
        return cast(Job, await self._request("DELETE", f"/v1/jobs/{job_id}"))

    async def events(self, job_id: str, *, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """Yield the job's live events (Event) until the terminal one; resumes itself after a dropped line."""
        parser = SSEParser(last_id=last_event_id)
        drops = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if parser.last_id:
                headers["Last-Event-ID"] = parser.last_id
            try:
                async with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30.0, read=60.0)
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for_error(response)
                    async for line in response.aiter_lines():
                        event = parser.line(line)
                        if event is None:
                            continue
                        yield event
                        if event.type in TERMINAL:
                            return
            except httpx.TransportError:
                drops += 1
                if drops > self.max_retries:
                    raise
                await asyncio.sleep(0.5)
                continue
            # The server closed the stream without a terminal event: reconnect and resume.
            drops += 1
            if drops > self.max_retries:
                raise httpx.RemoteProtocolError("event stream ended before the job did")

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float = 600.0,
        on_event: Callable[[Event], None] | None = None,
        use_sse: bool = True,
    ) -> Job:
        """Block until the job ends and return it. `on_event` sees queued/started/progress/terminal events.

        Uses the SSE stream; if that is unavailable it falls back to long polls of GET ?wait=.
        """
        deadline = time.monotonic() + timeout
        if use_sse:
            try:
                async for event in self.events(job_id):
                    if on_event is not None:
                        on_event(event)
                    if event.type in TERMINAL:
                        return cast(Job, event.data)
                    if time.monotonic() > deadline:
                        break
            except (httpx.HTTPError, DarkroomAPIError) as exc:
                if isinstance(exc, DarkroomAPIError) and exc.status_code in (401, 404):
                    raise
        return await self._poll(job_id, deadline, timeout, on_event)

    async def _poll(
        self, job_id: str, deadline: float, timeout: float, on_event: Callable[[Event], None] | None
    ) -> Job:
        last: tuple[str, int | None] | None = None
        while True:
            started = time.monotonic()
            # wait=1: answers at once when the job ends, else after a second with fresh progress.
            job = await self.get(job_id, wait=1)
            for event in progress_events(dict(job), last):
                if on_event is not None:
                    on_event(event)
            progress = job["progress"]
            last = (job["status"], progress["step"] if progress else None)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            # A server without long polls answers at once; do not spin.
            await asyncio.sleep(max(0.0, 0.25 - (time.monotonic() - started)))

    async def download(self, url: str) -> bytes:
        # Output URLs carry their own credentials (signature); do not send the API key elsewhere.
        async with httpx.AsyncClient(timeout=60.0) as http:
            response = await http.get(url)
        response.raise_for_status()
        return response.content
