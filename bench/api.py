"""The API's submit and poll paths under load, against the raw work they wrap.

A throw-away darkroom (its own PostgreSQL database, Redis key prefix and data directory; the API as a real
`darkroom api` process, no worker) takes, each for `--seconds`:

1. `accept`: POST /v1/jobs from `--concurrency` clients at once, each sending its next request as soon as
   the last is answered. Accepted jobs/s (202s) and the latency of each POST (p50, p99).
2. `poll`: GET /v1/jobs/{id} of the jobs accepted in 1, chosen at random, at the same concurrency.
3. `raw`: the limit to compare with: the same work done directly, at the same concurrency, with no HTTP
   and no service code: per job one INSERT of the row the service wrote (a copy of an accepted job, new
   id) committed on its own, plus one Redis LPUSH of a Celery-sized message. asyncio psycopg and
   redis.asyncio, one connection each per client.

The load generator is one asyncio process (uvloop) with the cheap keep-alive client of bench/client.py
(its CPU share of the run is printed). Several client processes would only add more contenders for the
same two cores.

    python -m bench.api [--seconds 10] [--concurrency 32] [--api-workers N]

The last line of output is one JSON object: accept_per_s, accept_p99_ms, poll_per_s, raw_per_s,
accept_vs_raw (and a few more figures for the curious).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bench.client import HTTPConnection, http_request
from bench.e2e import PG_ADMIN_URL, REDIS_URL, ROOT, darkroom, free_port, stop, wait_until

console = Console(stderr=True)


class Service:
    """A throw-away darkroom API: its own PostgreSQL database, Redis prefix and data directory, no worker."""

    def __init__(self, workdir: Path, api_workers: int):
        self.run_id = uuid.uuid4().hex[:8]
        self.database = f"darkroom_bench_api_{self.run_id}"
        self.prefix = f"darkroom-bench:{self.run_id}:"
        self.workdir = workdir
        self.api_workers = api_workers
        self.port = free_port()
        self.db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.database}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")},
            "DARKROOM_ENV_FILE": "",
            "DARKROOM_DATA_DIR": str(workdir),
            "DARKROOM_DATABASE_URL": self.db_url,
            "DARKROOM_REDIS_URL": REDIS_URL,
            "DARKROOM_REDIS_PREFIX": self.prefix,
            "DARKROOM_STORAGE_URL": (workdir / "storage").as_uri(),
            "DARKROOM_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
            "DARKROOM_SECRET_KEY": "bench-secret",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.key = ""

    def __enter__(self) -> Service:
        from sqlalchemy import create_engine, text

        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.database}"'))
        admin.dispose()
        try:
            cli = [sys.executable, "-m", "cli"]
            subprocess.run([*cli, "migrate"], env=self.env, cwd=ROOT, check=True, capture_output=True)
            created = subprocess.run(
                [*cli, "keys", "create", "--tenant", "bench"],
                env=self.env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            )
            self.key = created.stdout.strip()
            args = ["api", "--port", str(self.port), "--workers", str(self.api_workers), "--log-level", "warning"]
            self.procs.append(darkroom(args, self.env, self.workdir / "api.log"))
            wait_until(self._healthy, 60, "API up", interval=0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _healthy(self) -> bool:
        if self.procs[0].poll() is not None:
            log = (self.workdir / "api.log").read_text(errors="replace")
            raise RuntimeError(f"the API exited during start-up:\n{log[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    def stop_api(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)

    def __exit__(self, *exc: object) -> None:
        import redis
        from sqlalchemy import create_engine, text

        self.stop_api()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        client.close()
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        admin.dispose()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants (uvicorn's workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == current]
    return total


@dataclass
class Phase:
    """What one load phase saw: successful operations, their latencies, and the failures by kind."""

    name: str
    seconds: float = 0.0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run_load(
    phase: Phase,
    concurrency: int,
    seconds: float,
    make_client: Callable[[int], Awaitable[Callable[[], Awaitable[bool]]]],
    progress: Progress,
    server_pid: int | None = None,
) -> Phase:
    """`concurrency` clients, each running its operation back to back until `seconds` have passed.

    An operation returns True when it succeeded; only operations started before the deadline count.
    """
    clients = [await make_client(i) for i in range(concurrency)]
    task = progress.add_task(phase.name, total=seconds, rate="")
    start = time.perf_counter()
    deadline = start + seconds
    cpu_start = time.process_time()
    server_start = tree_cpu_seconds(server_pid) if server_pid else 0.0

    async def client(operation: Callable[[], Awaitable[bool]]) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                ok = await operation()
            except Exception as exc:
                phase.fail(type(exc).__name__)
                await asyncio.sleep(0.01)
                continue
            if ok:
                phase.ok += 1
                phase.latencies.append(time.perf_counter() - t0)

    async def ticker() -> None:
        while (now := time.perf_counter()) < deadline:
            elapsed = now - start
            progress.update(task, completed=elapsed, rate=f"{phase.ok / max(elapsed, 1e-9):8.0f} /s")
            await asyncio.sleep(0.25)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(client(op) for op in clients))
    # Operations started before the deadline finish a little after it: count the time they took.
    phase.seconds = time.perf_counter() - start
    phase.client_cpu_s = time.process_time() - cpu_start
    if server_pid:
        phase.server_cpu_s = tree_cpu_seconds(server_pid) - server_start
    tick.cancel()
    progress.update(task, completed=seconds, rate=f"{phase.per_s:8.0f} /s")
    return phase


def job_body(i: int) -> dict[str, Any]:
    return {"prompt": f"a lighthouse at dusk, oil painting, variant {i}", "seed": i, "metadata": {"bench": i}}


async def accept_phase(service: Service, args: argparse.Namespace, progress: Progress, ids: list[str]) -> Phase:
    counter = iter(range(10**9))

    async def make_client(_: int) -> Callable[[], Awaitable[bool]]:
        conn = HTTPConnection("127.0.0.1", service.port)

        async def submit() -> bool:
            status, body = await conn.request(
                http_request("POST", "/v1/jobs", service.port, service.key, job_body(next(counter)))
            )
            if status != 202:
                phase.fail(f"HTTP {status}")
                return False
            ids.append(json.loads(body)["id"])
            return True

        return submit

    phase = Phase("accept: POST /v1/jobs")
    return await run_load(phase, args.concurrency, args.seconds, make_client, progress, service.procs[0].pid)


async def poll_phase(service: Service, args: argparse.Namespace, progress: Progress, ids: list[str]) -> Phase:
    rng = random.Random(6)
    requests = [http_request("GET", f"/v1/jobs/{job_id}", service.port, service.key) for job_id in ids]

    async def make_client(_: int) -> Callable[[], Awaitable[bool]]:
        conn = HTTPConnection("127.0.0.1", service.port)

        async def poll() -> bool:
            status, _ = await conn.request(rng.choice(requests))
            if status != 200:
                phase.fail(f"HTTP {status}")
                return False
            return True

        return poll

    phase = Phase("poll: GET /v1/jobs/{id}")
    return await run_load(phase, args.concurrency, args.seconds, make_client, progress, service.procs[0].pid)


async def raw_phase(service: Service, args: argparse.Namespace, progress: Progress, template_id: str) -> Phase:
    """One INSERT of a copy of a row the service wrote, committed, plus one LPUSH, per operation."""
    import psycopg
    import redis.asyncio as aioredis
    from psycopg.types.json import Json

    dsn = f"postgresql://postgres@127.0.0.1:5432/{service.database}"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT * FROM jobs WHERE id = %s", (template_id,))
        columns = [d.name for d in cur.description or ()]
        template = dict(zip(columns, await cur.fetchone() or (), strict=True))
    # The message the service publishes for a job is about this big (Celery's JSON envelope, base64 body).
    message = json.dumps({"body": "x" * 600, "headers": {"task": "jobs.run", "id": "0" * 36}}).encode()
    values = [Json(v) if isinstance(v, dict | list) else v for v in template.values()]
    id_index = columns.index("id")
    insert = f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
    queue = f"{service.prefix}raw"
    redis = aioredis.Redis.from_url(REDIS_URL, max_connections=args.concurrency)
    connections: list[Any] = []

    async def make_client(_: int) -> Callable[[], Awaitable[bool]]:
        conn = await psycopg.AsyncConnection.connect(dsn)
        connections.append(conn)

        async def work() -> bool:
            row = list(values)
            row[id_index] = uuid.uuid4().hex
            await conn.execute(insert, row)
            await conn.commit()
            await redis.lpush(queue, message)
            return True

        return work

    phase = Phase("raw: INSERT + commit + LPUSH")
    try:
        return await run_load(phase, args.concurrency, args.seconds, make_client, progress)
    finally:
        for conn in connections:
            await conn.close()
        await redis.aclose()


async def measure(service: Service, args: argparse.Namespace) -> tuple[Phase, Phase, Phase]:
    ids: list[str] = []
    columns = (
        TextColumn("{task.description:<32}"),
        BarColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        # Warm-up: every API process opens its connections and fills its caches before the clock runs.
        warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
        await accept_phase(service, warm, progress, [])
        accept = await accept_phase(service, args, progress, ids)
        if not ids:
            raise RuntimeError(f"no job was accepted: {accept.failures}")
        poll = await poll_phase(service, args, progress, ids)
        # The raw work runs alone: the API stops first, giving back its CPU and its database connections.
        service.stop_api()
        raw = await raw_phase(service, args, progress, ids[0])
    return accept, poll, raw


def report(accept: Phase, poll: Phase, raw: Phase, args: argparse.Namespace, api_workers: str) -> dict[str, Any]:
    load = os.getloadavg()
    table = Table(
        title=f"darkroom API: concurrency {args.concurrency}, {args.seconds:g} s per phase, "
        f"{api_workers} API process(es), {os.cpu_count()} cores, load before {args.load_before}"
    )
    columns = ("phase", "per s", "p50 ms", "p99 ms", "max ms", "failures", "client CPU", "API CPU ms/op")
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in (accept, poll, raw):
        table.add_row(
            phase.name,
            f"{phase.per_s:.0f}",
            f"{phase.percentile_ms(0.5):.1f}",
            f"{phase.percentile_ms(0.99):.1f}",
            f"{max(phase.latencies, default=0) * 1000:.1f}",
            ", ".join(f"{k}: {v}" for k, v in phase.failures.items()) or "0",
            f"{phase.client_cpu_s / phase.seconds:.0%}" if phase.seconds else "-",
            f"{phase.server_cpu_s * 1000 / phase.ok:.2f}" if phase.server_cpu_s and phase.ok else "-",
        )
    out = Console()
    if not out.is_terminal:
        out = Console(width=140)  # piped into a file: wide enough for the table, not rich's 80 columns
    out.print(table)
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return {
        "accept_per_s": round(accept.per_s, 1),
        "accept_p50_ms": round(accept.percentile_ms(0.5), 1),
        "accept_p99_ms": round(accept.percentile_ms(0.99), 1),
        "poll_per_s": round(poll.per_s, 1),
        "poll_p99_ms": round(poll.percentile_ms(0.99), 1),
        "raw_per_s": round(raw.per_s, 1),
        "accept_vs_raw": round(accept.per_s / raw.per_s, 3) if raw.per_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured submits first (default 2 s)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--api-workers",
        type=int,
        default=os.cpu_count(),
        help="API processes (`darkroom api --workers`; default: one per core, as deployed on such a machine)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    args.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-api-") as tmp, Service(Path(tmp), args.api_workers) as svc:
        # uvloop (it comes with uvicorn[standard]): the client's own CPU per request is what matters here.
        accept, poll, raw = uvloop.run(measure(svc, args))
    figures = report(accept, poll, raw, args, str(args.api_workers))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
