"""Heartbeat for the jobs a worker is running: one thread renews every lease of the batch until it ends.

If the worker process dies, renewals stop, the leases expire, and the reconciler gives the jobs to another
worker: recovery takes about `DARKROOM_LEASE_SECONDS`, not the broker's visibility timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from shared.db import session_scope
from shared.jobs import renew_lease

log = logging.getLogger("darkroom.worker")


class Heartbeat:
    """Renews the leases of `attempts` (job id -> attempt); jobs that are no longer ours land in `lost`."""

    def __init__(self, attempts: Mapping[str, int], lease_seconds: int):
        self.attempts = dict(attempts)
        self.lease_seconds = lease_seconds
        self.lost: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            live = {job_id: a for job_id, a in self.attempts.items() if job_id not in self.lost}
            if not live:
                return  # every job is canceled, finished or taken over
            try:
                with session_scope() as session:
                    for job_id, attempt in live.items():
                        if not renew_lease(session, job_id, attempt=attempt, lease_seconds=self.lease_seconds):
                            self.lost.add(job_id)
            except Exception:  # a database blip must not kill the heartbeat; the next beat retries
                log.warning("lease renewal for %d jobs failed", len(live), exc_info=True)
