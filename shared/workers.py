"""Worker status reports: each worker process writes a small JSON document to Redis with a TTL.

A live worker refreshes its report every DARKROOM_WORKER_STATUS_INTERVAL seconds; a dead one simply
disappears when the TTL runs out, so no one has to clean up after a kill -9. The API reads the reports for
`/metrics` and `GET /v1/admin/workers`.
"""

from __future__ import annotations

import json
from typing import Any

from shared import broker
from shared.settings import get_settings


def _key(worker: str) -> str:
    return f"{get_settings().redis_prefix}worker:{worker}"


def report(worker: str, status: dict[str, Any], ttl: float) -> None:
    broker.get_redis().set(_key(worker), json.dumps(status), ex=max(1, int(ttl)))


def forget(worker: str) -> None:
    broker.get_redis().delete(_key(worker))


def read_all() -> list[dict[str, Any]]:
    client = broker.get_redis()
    keys = sorted(client.scan_iter(match=_key("*"), count=500))
    reports = []
    for raw in client.mget(keys) if keys else []:
        if raw is not None:
            try:
                reports.append(json.loads(raw))
            except ValueError:
                continue
    return reports
