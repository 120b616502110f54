"""Cluster-wide metrics kept in Redis, so that every process can add to them and any API process can serve them.

Workers count what they did (images, job durations) and the API counts refusals; all of it lands in one
Redis hash of counters. Prometheus counters may reset (a Redis restart empties the hash): `rate()` and
`increase()` handle resets, so nothing here needs to survive one. Job totals by status are not kept here but
counted from the database at scrape time (see api/metrics.py), which no restart can lose.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping

import redis

from shared import broker
from shared.settings import get_settings

log = logging.getLogger("darkroom.metrics")

# Seconds: from a fraction of a second (tiny models, idle queues) to half an hour (a deep queue).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, math.inf)

COUNTERS: dict[str, str] = {
    "images_total": "Images generated and stored, by model (rate() gives images per second).",
    "rate_limit_refusals_total": "Requests refused with 429 by a per-tenant limit, by limit (requests, queued_jobs, "
    "images).",
    "webhook_deliveries_total": "Webhook delivery attempts by outcome: delivered, retrying, failed (attempts "
    "spent) or gone (410: endpoint disabled).",
}
HISTOGRAMS: dict[str, str] = {
    "job_queued_seconds": "Time from submission to a worker starting the job (last attempt), by model.",
    "job_running_seconds": "Time from a worker starting the job to its end, by model and final status.",
}


def _hash_key() -> str:
    return f"{get_settings().redis_prefix}metrics"


def _field(name: str, labels: Mapping[str, str]) -> str:
    return json.dumps([name, sorted(labels.items())], separators=(",", ":"))


def count(name: str, labels: Mapping[str, str], amount: float = 1) -> None:
    """Add to a counter. Never raises: a metric is not worth failing a job or a request for."""
    record(counts=[(name, labels, amount)])


def observe(name: str, labels: Mapping[str, str], value: float) -> None:
    """Add one observation to a histogram (cumulative buckets, as Prometheus exposes them)."""
    record(observations=[(name, labels, value)])


def record(
    observations: Iterable[tuple[str, Mapping[str, str], float]] = (),
    counts: Iterable[tuple[str, Mapping[str, str], float]] = (),
) -> None:
    """Histogram observations and counter additions in one Redis round trip (a batch's jobs end together).
    Never raises."""
    try:
        pipe = broker.get_redis().pipeline(transaction=False)
        for name, labels, value in observations:
            for bound in DURATION_BUCKETS:
                if value <= bound:
                    le = "+Inf" if math.isinf(bound) else repr(float(bound))
                    pipe.hincrbyfloat(_hash_key(), _field(f"{name}_bucket", {**labels, "le": le}), 1)
            pipe.hincrbyfloat(_hash_key(), _field(f"{name}_sum", labels), value)
            pipe.hincrbyfloat(_hash_key(), _field(f"{name}_count", labels), 1)
        for name, labels, amount in counts:
            pipe.hincrbyfloat(_hash_key(), _field(name, labels), amount)
        pipe.execute()
    except redis.RedisError as exc:
        log.debug("metrics not recorded: %s", type(exc).__name__)


def read_all() -> Iterable[tuple[str, dict[str, str], float]]:
    """Every stored sample as (name, labels, value)."""
    raw = broker.get_redis().hgetall(_hash_key())
    for field, value in raw.items():
        try:
            name, labels = json.loads(field)
            yield str(name), {str(k): str(v) for k, v in labels}, float(value)
        except (ValueError, TypeError):
            continue
