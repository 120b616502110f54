"""The benchmarks' HTTP client: HTTP/1.1 over keep-alive connections, answers parsed by httptools (the
parser uvicorn itself uses).

On a 2-core machine the client shares the CPU with the server it measures, so it has to be cheap: httpx
costs several hundred microseconds of CPU per request (and builds an SSL context per client), enough to
slow the server down by itself; this client costs a few tens.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection; one request at a time, answers read by httptools."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._status = 0
        self._body: list[bytes] = []
        self._done = False
        self._keep_alive = True
        self._parser = httptools.HttpResponseParser(self)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        # Asked here: once feed_data returns, llhttp has reset for the next message and always says False,
        # which had this client open a new connection for every request.
        self._keep_alive = self._parser.should_keep_alive()
        self._done = True

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self._body, self._done = [], False
        self.writer.write(raw)
        while not self._done:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._parser.feed_data(data)
        status = self._parser.get_status_code()
        if not self._keep_alive:
            await self.close()
        return status, b"".join(self._body)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self._parser = httptools.HttpResponseParser(self)


def http_request(method: str, path: str, port: int, key: str, body: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {key}"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload
