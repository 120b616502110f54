"""Logging for the API and the worker: one JSON object per line, with the request, tenant, job and worker
each line belongs to when known.

The context travels in contextvars set by the API's request middleware and the worker's task hooks, so log
calls stay plain `log.info(...)`. As a last line of defence, anything shaped like an API key is masked
before a line is written: keys must never reach a log, whatever a message or a traceback contains.
"""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
tenant: ContextVar[str | None] = ContextVar("tenant", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
worker: ContextVar[str | None] = ContextVar("worker", default=None)
CONTEXT = {"request_id": request_id, "tenant": tenant, "job_id": job_id, "worker": worker}

# API keys (shared.tenants.KEY_PREFIX + token_urlsafe) and bearer credentials of any kind.
SECRET = re.compile(r"dr_[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}")


def redact(text: str) -> str:
    return SECRET.sub(lambda m: "dr_***" if m.group(0).startswith("dr_") else "Bearer ***", text)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for name, var in CONTEXT.items():
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = redact(str(value))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Replace the root handlers with one writing to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
