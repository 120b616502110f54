"""Blocking client: submit, get, wait (polling), cancel, list, download."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled")


class DarkroomAPIError(Exception):
    def __init__(self, status_code: int, code: str, message: str):
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message


class Client:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0):
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise DarkroomAPIError(response.status_code, error["code"], error["message"])
            except (ValueError, KeyError, TypeError):
                raise DarkroomAPIError(response.status_code, "http_error", response.text[:500]) from None
        result: dict[str, Any] = response.json()
        return result

    def submit(self, prompt: str, **fields: Any) -> dict[str, Any]:
        body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        return self._request("POST", "/v1/jobs", json=body)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def list(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._request("GET", "/v1/jobs", params=params)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.5,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job ends; `on_update` sees every state read (for progress bars)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(interval)

    def download(self, url: str) -> bytes:
        # Output URLs carry their own credentials (signature); do not send the API key elsewhere.
        response = httpx.get(url, timeout=60.0)
        response.raise_for_status()
        return response.content
