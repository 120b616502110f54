"""The clients against a real HTTP server that answers 429: short Retry-After is waited out, a long one raised."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from client import AsyncClient, Client, DarkroomAPIError

USAGE = {"tenant": "acme", "max_priority": "high", "limits": {}}


class Server:
    """Answers each GET with the next scripted (status, Retry-After), then 200 with a usage body."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str]] = []
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                status, retry_after = server.script.pop(0) if server.script else (200, "")
                if status == 200:
                    body = json.dumps(USAGE).encode()
                else:
                    body = json.dumps({"error": {"code": "images_quota_exceeded", "message": "quota"}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if retry_after:
                    self.send_header("Retry-After", retry_after)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.http.shutdown()


def test_a_short_retry_after_is_waited_out(server: Server) -> None:
    server.script = [(429, "1"), (503, "0")]
    with Client(server.url, "k") as client:
        assert client.usage() == USAGE
    assert server.requests == ["/v1/usage"] * 3


def test_a_retry_after_beyond_the_clients_patience_is_raised_at_once(server: Server) -> None:
    server.script = [(429, "86400")]
    with Client(server.url, "k") as client, pytest.raises(DarkroomAPIError) as refused:
        client.usage()
    assert (refused.value.status_code, refused.value.code) == (429, "images_quota_exceeded")
    assert len(server.requests) == 1


def test_the_async_client_does_the_same(server: Server) -> None:
    server.script = [(429, "0"), (429, "86400")]

    async def call() -> None:
        async with AsyncClient(server.url, "k") as client:
            await client.usage()

    with pytest.raises(DarkroomAPIError):
        asyncio.run(call())
    assert len(server.requests) == 2
