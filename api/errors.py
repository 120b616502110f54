"""One rendering for every error: {"error": {"code", "message"}} with the right status."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import psycopg_pool
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorResponse
from shared.errors import DarkroomError
from shared.logs import redact

log = logging.getLogger("darkroom.api")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
}
# Routes that never count against a tenant's limits, so never answer 429 (see api.deps).
UNMETERED = frozenset({"/v1/usage"})
RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}}
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # Messages may quote what the client sent (an unknown model, an id); a key pasted in the wrong field
    # is still masked, so that no error, and no log of one, ever carries a key.
    return JSONResponse({"error": {"code": code, "message": redact(message)}}, status_code=status, headers=headers)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the error statuses a route can return."""
    return {code: {"model": ErrorResponse} for code in codes}


def _field(loc: tuple[Any, ...]) -> str:
    # List items read as in the JSON they came from: `jobs[3].width`, not `jobs.3.width`.
    path = ""
    for part in loc:
        if part == "body":
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or "body"


def _describe(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"{_field(err['loc'])}: unknown field"
    if kind == "json_invalid":
        return f"body: invalid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
    if kind == "missing":
        return f"{_field(err['loc'])}: field required"
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{_field(err['loc'])}: {message}"


def install(app: FastAPI) -> None:
    @app.exception_handler(DarkroomError)
    async def _darkroom(_: Request, exc: DarkroomError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message = "; ".join(_describe(e) for e in errors[:5]) or "invalid request"
        return error_response(422, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 400:
            log.info("bad request: %s", exc.detail)
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg_pool.PoolTimeout)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(psycopg.InterfaceError)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        # The database is down or overloaded: tell clients to come back rather than hang or 500.
        log.warning("database unavailable: %s", type(exc).__name__)
        return error_response(
            503, "database_unavailable", "the database is unavailable; retry shortly", {"Retry-After": "5"}
        )


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document tell the truth about errors, which every route renders as ErrorResponse.

    FastAPI documents its own 422 body (HTTPValidationError); ours is ErrorResponse. Every authenticated
    route can also answer 401, 429 past the tenant's rate limit, and 503 while the database is down; every
    route with a body 413.
    """
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        error = {"description": "Error", "content": {"application/json": {"schema": ref}}}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault(
            "ErrorResponse", ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        for name, model_schema in (
            ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}).items()
        ):
            components.setdefault(name, model_schema)
        components["ErrorResponse"].pop("$defs", None)
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                answers = operation.setdefault("responses", {})
                wanted = {"422"}
                if path.startswith("/v1/"):
                    wanted |= {"401", "503"}
                if "requestBody" in operation:
                    wanted |= {"413"}
                if path.startswith("/v1/") and path not in UNMETERED:
                    wanted |= {"429"}
                for status in wanted:
                    answers[status] = {**error, "description": answers.get(status, {}).get("description", "Error")}
                if "429" in answers:
                    answers["429"]["description"] = (
                        "A per-tenant limit refused the request (`code` names it; GET /v1/usage shows them all)."
                    )
                    answers["429"]["headers"] = RETRY_AFTER
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
