"""The `Idempotency-Key` request header for creating POSTs (the rules live in shared.idempotency)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Any unique string (a UUID is ideal), at most 255 characters. A retry with the same key and "
        "body returns the first request's result (200, `Idempotent-Replayed: true`) instead of acting twice; "
        "the same key with another body is refused (422 `idempotency_key_reused`); while the first request is "
        "still being processed a retry gets 409 `idempotency_key_in_flight`. Keys are per tenant and kept "
        "for at least 24 hours.",
        examples=["0f8b2c1e-7d4a-4b8e-9c3f-2a1d5e6f7a8b"],
    ),
]
REPLAYED_HEADER = "Idempotent-Replayed"
