"""Heartbeat for the job a worker is running: renews its lease until the job ends.

If the worker process dies, renewals stop, the lease expires, and the reconciler gives the job to another
worker: recovery takes about `DARKROOM_LEASE_SECONDS`, not the broker's visibility timeout.
"""

from __future__ import annotations

import logging
import threading

from shared.db import session_scope
from shared.jobs import renew_lease

log = logging.getLogger("darkroom.worker")


class Heartbeat:
    def __init__(self, job_id: str, attempt: int, lease_seconds: int):
        self.job_id = job_id
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                with session_scope() as session:
                    if not renew_lease(session, self.job_id, attempt=self.attempt, lease_seconds=self.lease_seconds):
                        return  # no longer ours: canceled, finished or taken over
            except Exception:  # a database blip must not kill the heartbeat; the next beat retries
                log.warning("lease renewal for job %s failed", self.job_id, exc_info=True)
