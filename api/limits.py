"""Request limits enforced while the body streams in: its size (a huge upload is never buffered) and the
nesting depth of a JSON body (a deeply nested document would otherwise exhaust the parser's recursion)."""

from __future__ import annotations

import json
import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing re-raises it as it is instead of turning it into a 400.
    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body over {max_bytes} bytes")


MAX_JSON_DEPTH = 32


class JSONTooDeep(HTTPException):
    def __init__(self, max_depth: int):
        super().__init__(422, f"body: JSON nested deeper than {max_depth} levels")


# The only bytes that change the depth or whether we are inside a string: a backslash (the byte after it
# is escaped), a quote, a bracket. A regular expression finds them in C, so a megabyte of base64 costs a
# few Python steps rather than one per byte, on the event loop.
_TOKENS = re.compile(rb'[\\"\[\]{}]')


class _DepthScanner:
    """Tracks the nesting depth of a JSON text fed in chunks, skipping brackets inside strings."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.depth = 0
        self.in_string = False
        self.escaped = False  # the last chunk ended with a backslash: the next byte is escaped

    def feed(self, chunk: bytes, *, last: bool = False) -> bool:
        """False as soon as the depth passes the maximum. `last`: no chunk follows this one."""
        if last and self.depth + chunk.count(b"[") + chunk.count(b"{") <= self.max_depth:
            # Too few brackets to go too deep, and no later chunk needs to know where this one ended (in a
            # string or not): most bodies, a few bytes of JSON in one piece, skip the scan in Python.
            return True
        position = 0
        if self.escaped and chunk:
            self.escaped, position = False, 1
        while match := _TOKENS.search(chunk, position):
            token, position = match.group(), match.end()
            if token == b"\\":  # whatever it escapes is not structure
                if position == len(chunk):
                    self.escaped = True
                position += 1
            elif token == b'"':
                self.in_string = not self.in_string
            elif self.in_string:
                continue
            elif token in (b"[", b"{"):
                self.depth += 1
                if self.depth > self.max_depth:
                    return False
            else:
                self.depth -= 1
        return True


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, max_json_depth: int = MAX_JSON_DEPTH):
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if b"content-length" not in headers and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body: nothing to limit (most GETs)
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send, 413, "payload_too_large", f"request body over {self.max_bytes} bytes")
            return
        seen = 0
        started = False
        # Scan whatever FastAPI would try to parse as JSON (it parses any body whose type mentions json).
        scanner = _DepthScanner(self.max_json_depth) if b"json" in headers.get(b"content-type", b"").lower() else None

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen += len(body)
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                if scanner is not None and not scanner.feed(body, last=not message.get("more_body", False)):
                    raise JSONTooDeep(self.max_json_depth)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, 413, "payload_too_large", f"request body over {self.max_bytes} bytes")
        except JSONTooDeep as exc:
            if not started:
                await self._refuse(send, 422, "invalid_request", str(exc.detail))

    async def _refuse(self, send: Send, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
