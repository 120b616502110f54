"""Verifying darkroom's webhooks on the receiving side (Standard Webhooks, HMAC-SHA256)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import cast

from client.types import WebhookPayload

TOLERANCE_SECONDS = 5 * 60


class WebhookVerificationError(Exception):
    """The request is not a genuine, fresh darkroom webhook: reject it (e.g. with 400)."""


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | list[str],
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> WebhookPayload:
    """Check a delivery's signature and timestamp, and return its parsed body.

    `body` must be the raw bytes received (not re-serialised JSON). `secret` is the `whsec_...` from
    GET /v1/webhook-secret, or a list of them while you switch secrets. Raises WebhookVerificationError.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance (replayed or clock skew)")
    text = body.decode() if isinstance(body, bytes) else body
    signed = f"{msg_id}.{sent_at}.{text}".encode()
    expected = []
    for one in [secret] if isinstance(secret, str) else secret:
        key = base64.b64decode(one.removeprefix("whsec_"))
        expected.append(hmac.new(key, signed, hashlib.sha256).digest())
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except ValueError:
            continue
        if any(hmac.compare_digest(given, mine) for mine in expected):
            return cast(WebhookPayload, json.loads(text))
    raise WebhookVerificationError("no signature matches the secret")
