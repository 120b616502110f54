"""Writing a call's progress: each job's step, and its live stream's progress event. Nothing here imports
torch: the worker's sidecar (worker/sidecar.py) writes it while the call runs."""

from __future__ import annotations

import logging

from shared.db import DB_UNAVAILABLE, session_scope
from shared.jobs import record_progress_many

log = logging.getLogger("darkroom.worker")


def write_progress(attempts: dict[str, int], step: int, total: int, previews: dict[str, str]) -> set[str] | None:
    """Record the progress of these jobs (job id -> attempt); the ids still ours, or None if not written."""
    try:
        with session_scope() as session:
            return record_progress_many(session, attempts, step=step, total=total, previews=previews)
    except DB_UNAVAILABLE:
        # Progress is a nicety: a database outage must not fail the jobs, only leave progress stale.
        log.warning("progress not recorded: database unavailable")
        return None
