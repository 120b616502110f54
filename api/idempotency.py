"""The `Idempotency-Key` request header for creating POSTs (the rules live in shared.idempotency)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header

KEY_HEADER = "Idempotency-Key"
KEY_DESCRIPTION = (
    "Any unique string (a UUID is ideal), at most 255 characters. A retry with the same key and body returns "
    "the first request's result (200, `Idempotent-Replayed: true`) instead of acting twice; the same key with "
    "another body is refused (422 `idempotency_key_reused`); while the first request is still being processed "
    "a retry gets 409 `idempotency_key_in_flight`. Keys are per tenant and kept for at least 24 hours."
)
KEY_EXAMPLE = "0f8b2c1e-7d4a-4b8e-9c3f-2a1d5e6f7a8b"
IdempotencyKeyHeader = Annotated[
    str | None, Header(alias=KEY_HEADER, description=KEY_DESCRIPTION, examples=[KEY_EXAMPLE])
]
REPLAYED_HEADER = "Idempotent-Replayed"


def optional_header(name: str, description: str, example: str) -> dict[str, Any]:
    """The OpenAPI parameter FastAPI writes for an optional string `Header`, for a route that reads the header
    from its request instead (POST /v1/jobs)."""
    schema = {"anyOf": [{"type": "string"}, {"type": "null"}], "description": description, "examples": [example]}
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {**schema, "title": name},
        "description": description,
    }
