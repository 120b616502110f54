"""Errors as types. Each carries the HTTP status and the machine-readable code clients see."""

from __future__ import annotations


class DarkroomError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(DarkroomError):
    status_code = 422
    code = "invalid_request"


class Unauthorized(DarkroomError):
    status_code = 401
    code = "unauthorized"


class NotFound(DarkroomError):
    status_code = 404
    code = "not_found"


class Conflict(DarkroomError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(DarkroomError):
    status_code = 413
    code = "payload_too_large"


class Forbidden(DarkroomError):
    status_code = 403
    code = "forbidden"


class TooManyRequests(DarkroomError):
    """A per-tenant limit refused the request; `code` names the limit and `Retry-After` says when to retry."""

    status_code = 429
    code = "rate_limited"


class ServiceUnavailable(DarkroomError):
    status_code = 503
    code = "service_unavailable"


class IllegalTransition(RuntimeError):
    """A programming error: code asked the state machine for a move it does not allow."""
