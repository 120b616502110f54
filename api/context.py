"""Per-request context: the request id (X-Request-ID) and one structured access-log line per request.

A client's X-Request-ID is kept when it is short and plain (letters, digits, `.`, `_`, `-`, up to 64),
so it can be traced from the caller into our logs; anything else is replaced by a fresh id rather than
written to logs verbatim. The id is echoed on every response.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import logs

HEADER = b"x-request-id"
VALID_ID = re.compile(rb"^[A-Za-z0-9._\-]{1,64}$")
access = logging.getLogger("darkroom.access")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == HEADER and VALID_ID.match(value):
            return value.decode()
    return uuid.uuid4().hex


class RequestContext:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope["headers"])
        token = logs.request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *[(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER],
                    (HEADER, rid.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            access.info(
                "%s %s %d %.1f ms from %s",
                scope["method"],
                scope["path"],
                status,
                (time.monotonic() - started) * 1000,
                f"{client[0]}:{client[1]}" if client else "-",
                extra={"tenant": scope["state"].get("tenant")},
            )
            logs.request_id.reset(token)
