"""client.verify_webhook against signatures made by the `standardwebhooks` reference library."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from client import WebhookVerificationError, verify_webhook
from shared.webhook_secrets import new_secret, signature_header

BODY = json.dumps({"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "j1"}})


def signed(secret: str, body: str = BODY, at: float | None = None, msg_id: str = "msg_1") -> dict[str, str]:
    stamp = int(at if at is not None else time.time())
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(stamp, tz=UTC), body)
    return {"Webhook-Id": msg_id, "Webhook-Timestamp": str(stamp), "Webhook-Signature": signature}


def test_a_reference_signature_verifies_and_returns_the_payload() -> None:
    secret = new_secret()
    payload = verify_webhook(signed(secret), BODY.encode(), secret)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == "j1"


def test_the_server_signature_is_what_the_reference_library_makes() -> None:
    secret = new_secret()
    headers = signed(secret, at=1_767_225_600)
    assert signature_header([secret], "msg_1", 1_767_225_600, BODY) == headers["Webhook-Signature"]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b.replace("j1", "j2")),
        lambda h, b: ({**h, "Webhook-Id": "msg_2"}, b),
        lambda h, b: ({**h, "Webhook-Signature": "v1,AAAA"}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "Webhook-Timestamp"}, b),
    ],
)
def test_tampered_or_incomplete_deliveries_are_rejected(tamper) -> None:  # type: ignore[no-untyped-def]
    secret = new_secret()
    headers, body = tamper(signed(secret), BODY)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body, secret)


def test_stale_timestamps_are_rejected_beyond_five_minutes() -> None:
    secret = new_secret()
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify_webhook(signed(secret, at=time.time() - 301), BODY, secret)
    verify_webhook(signed(secret, at=time.time() - 200), BODY, secret)


def test_during_a_rotation_either_secret_verifies_a_double_signature() -> None:
    old, new = new_secret(), new_secret()
    stamp = int(time.time())
    headers = {
        "webhook-id": "msg_9",
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature_header([new, old], "msg_9", stamp, BODY),
    }
    for secret in (old, new, [new_secret(), old]):
        verify_webhook(headers, BODY, secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, BODY, new_secret())
