"""What GET /metrics exposes, gathered at scrape time from where each figure is kept.

- Job totals by model, status and error code: counted in the database, so they survive any restart and
  agree across API processes.
- Queue depth: queued jobs per queue in the database, messages per queue in Redis, and the age of the
  oldest queued job.
- Durations and images: cluster counters that workers keep in Redis (shared.metrics).
- Workers: their status reports in Redis (shared.workers): heartbeat, loaded models, GPU memory.

A source that is down is skipped (and `darkroom_scrape_errors` says which), so /metrics keeps answering
through an outage: that is when it matters most.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import broker, metrics, workers
from shared.db import session_scope
from shared.jobs import TERMINAL, queue_stats, status_counts
from shared.tables import utcnow

log = logging.getLogger("darkroom.api")


class DarkroomCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        errors = GaugeMetricFamily(
            "darkroom_scrape_errors", "1 when a source of metrics could not be read in this scrape.", labels=["source"]
        )
        for source, gather in (("database", _from_database), ("redis", _from_redis), ("workers", _from_workers)):
            try:
                families = list(gather())
            except Exception as exc:
                log.warning("metrics source %s unavailable: %s", source, type(exc).__name__)
                errors.add_metric([source], 1)
                continue
            errors.add_metric([source], 0)
            yield from families
        yield errors


def _from_database() -> Iterator[Metric]:
    with session_scope() as session:
        counts = status_counts(session)
        queues = queue_stats(session)
    submitted = CounterMetricFamily("darkroom_jobs_submitted", "Jobs accepted, by model.", labels=["model"])
    finished = CounterMetricFamily(
        "darkroom_jobs_finished",
        "Jobs that ended, by model, final status (succeeded, failed, canceled) and error code.",
        labels=["model", "status", "code"],
    )
    by_model: dict[str, int] = defaultdict(int)
    for model, status, code, n in counts:
        by_model[model] += n
        if status in TERMINAL:
            finished.add_metric([model, status, code or ""], n)
    for model, n in sorted(by_model.items()):
        submitted.add_metric([model], n)
    depth = GaugeMetricFamily("darkroom_queue_depth", "Jobs in status queued, per queue.", labels=["queue"])
    oldest = GaugeMetricFamily(
        "darkroom_queue_oldest_age_seconds", "Age of the oldest queued job, per queue.", labels=["queue"]
    )
    now = utcnow()
    for queue, n, first in queues:
        depth.add_metric([queue], n)
        if first is not None:
            oldest.add_metric([queue], max(0.0, (now - first).total_seconds()))
    yield from (submitted, finished, depth, oldest)
    messages = GaugeMetricFamily(
        "darkroom_queue_messages", "Messages waiting in each queue's Redis list.", labels=["queue"]
    )
    for queue, _, _ in queues:
        messages.add_metric([queue], broker.queue_length(queue))
    yield messages


def _from_redis() -> Iterator[Metric]:
    samples = list(metrics.read_all())
    for name, help_text in metrics.COUNTERS.items():
        family = CounterMetricFamily(f"darkroom_{name.removesuffix('_total')}", help_text, labels=None)
        for sample, labels, value in samples:
            if sample == name:
                family.add_sample(f"darkroom_{name}", labels, value)
        yield family
    for name, help_text in metrics.HISTOGRAMS.items():
        series: dict[tuple[tuple[str, str], ...], dict[str, float]] = defaultdict(dict)
        for sample, labels, value in samples:
            if sample.startswith(name + "_"):
                le = labels.pop("le", None)
                key = tuple(sorted(labels.items()))
                suffix = sample.removeprefix(name + "_")
                series[key][f"le={le}" if suffix == "bucket" else suffix] = value
        label_names = sorted({k for key in series for k, _ in key})
        histogram = HistogramMetricFamily(f"darkroom_{name}", help_text, labels=label_names)
        for key, values in series.items():
            labels = dict(key)
            buckets = [
                (le, values.get(f"le={le}", 0.0))
                for le in ("+Inf" if math.isinf(b) else repr(float(b)) for b in metrics.DURATION_BUCKETS)
            ]
            histogram.add_metric([labels.get(n, "") for n in label_names], buckets, values.get("sum", 0.0))
        yield histogram


def _from_workers() -> Iterator[Metric]:
    reports = workers.read_all()
    up = GaugeMetricFamily("darkroom_workers", "Worker processes with a live status report.")
    up.add_metric([], len(reports))
    heartbeat = GaugeMetricFamily(
        "darkroom_worker_heartbeat_timestamp_seconds", "Unix time of each worker's last report.", labels=["worker"]
    )
    age = GaugeMetricFamily(
        "darkroom_worker_heartbeat_age_seconds", "Seconds since each worker's last report.", labels=["worker"]
    )
    busy = GaugeMetricFamily("darkroom_worker_busy", "1 while a worker runs a job.", labels=["worker"])
    loaded = GaugeMetricFamily(
        "darkroom_worker_model_loaded", "1 for each model a worker holds in memory.", labels=["worker", "model"]
    )
    gpu = GaugeMetricFamily(
        "darkroom_worker_gpu_memory_bytes",
        "GPU memory of each worker (kind: allocated, reserved, total); absent without a GPU.",
        labels=["worker", "kind"],
    )
    now = time.time()
    for report in reports:
        worker = str(report.get("id", "?"))
        heartbeat.add_metric([worker], float(report.get("heartbeat", 0)))
        age.add_metric([worker], max(0.0, now - float(report.get("heartbeat", now))))
        busy.add_metric([worker], 1 if report.get("current_job") else 0)
        for model in report.get("loaded_models", []):
            loaded.add_metric([worker, str(model)], 1)
        for kind in ("allocated", "reserved", "total"):
            if f"gpu_memory_{kind}_bytes" in report:
                gpu.add_metric([worker, kind], float(report[f"gpu_memory_{kind}_bytes"]))
    yield from (up, heartbeat, age, busy, loaded, gpu)
