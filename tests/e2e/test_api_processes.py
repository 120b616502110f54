"""`darkroom api --workers N` (cli/serve.py): the workers share the clients, and stop together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.support import Process, free_port, wait_for, wait_http

pytestmark = pytest.mark.e2e


def api_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    return env | {"DARKROOM_ENV_FILE": "", "DARKROOM_DATA_DIR": str(tmp_path)}


def listening_sockets(port: int) -> int:
    """Sockets listening on `port`, from the kernel's own table (a socket shared by processes counts once)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "0A"
    return count


async def open_clients(port: int, n: int) -> list[asyncio.StreamWriter]:
    """n keep-alive connections opened at once, as a backend's pool does, each answered once."""

    async def client() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        return writer

    return await asyncio.gather(*(client() for _ in range(n)))


def connections_per_worker(api: Process, port: int) -> Counter[int]:
    workers = psutil.Process(api.proc.pid).children(recursive=True)
    return Counter(
        worker.pid
        for worker in workers
        for conn in worker.net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
    )


def test_api_workers_each_listen_and_share_clients_that_connect_together(tmp_path: Path) -> None:
    port = free_port()
    api = Process(
        ["api", "--workers", "2", "--port", str(port), "--log-level", "warning"],
        api_env(tmp_path),
        tmp_path / "api.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=api)
        wait_for(lambda: listening_sockets(port) == 2, timeout=30, what="both workers listening")

        async def check() -> Counter[int]:
            writers = await open_clients(port, 32)
            try:
                return connections_per_worker(api, port)
            finally:
                for writer in writers:
                    writer.close()

        per_worker = asyncio.run(check())
        # Spread by address hash: a worker with fewer than 4 of 32 has odds of about 1 in a million.
        assert len(per_worker) == 2 and sum(per_worker.values()) == 32 and min(per_worker.values()) >= 4, per_worker

        workers = psutil.Process(api.proc.pid).children(recursive=True)
        os.kill(api.proc.pid, signal.SIGTERM)
        assert api.proc.wait(timeout=30) == 0
        assert not psutil.wait_procs(workers, timeout=10)[1]  # none still alive
        assert listening_sockets(port) == 0
    finally:
        api.stop()


def test_api_refuses_a_port_already_taken_even_by_a_socket_open_to_sharing_it(tmp_path: Path) -> None:
    # Another server in an SO_REUSEPORT group there (an API left running, say) would otherwise get half the
    # connections without a word.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = Process(["api", "--workers", "2", "--port", str(port)], api_env(tmp_path), tmp_path / "api.log")
        try:
            assert api.proc.wait(timeout=30) != 0
            assert "cannot listen on 127.0.0.1 port" in api.output() and "in use" in api.output()
        finally:
            api.stop()
