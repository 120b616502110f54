"""Per-tenant webhook signing secrets and Standard Webhooks signatures.

A tenant has one current secret (`whsec_` + base64 of 24 random bytes). Rotating keeps the previous one
valid for a grace period, during which every delivery carries both signatures, space-separated, so a
receiver can switch secrets at its own pace.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from shared.tables import WebhookSecret, utcnow

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def current_secret(session: Session, tenant_id: str) -> WebhookSecret:
    """The tenant's current secret, created on first use (a tenant may subscribe before asking for it)."""
    row = session.scalars(
        select(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_(None))
        .order_by(WebhookSecret.created_at.desc(), WebhookSecret.id.desc())
        .limit(1)
    ).first()
    if row is None:
        row = WebhookSecret(tenant_id=tenant_id, secret=new_secret(), created_at=utcnow())
        session.add(row)
        session.flush()
    return row


def previous_expiry(session: Session, tenant_id: str) -> datetime | None:
    """When the last rotated-out secret stops signing, or None when none is still in its grace period."""
    return session.scalar(
        select(WebhookSecret.expires_at)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at > utcnow())
        .order_by(WebhookSecret.expires_at.desc())
        .limit(1)
    )


def signing_secrets(session: Session, tenant_id: str) -> list[str]:
    """Every secret that signs right now: the current one first, then those still in grace."""
    current = current_secret(session, tenant_id)
    others = session.scalars(
        select(WebhookSecret.secret).where(
            WebhookSecret.tenant_id == tenant_id,
            WebhookSecret.id != current.id,
            or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > utcnow()),
        )
    ).all()
    return [current.secret, *others]


def rotate(session: Session, tenant_id: str, grace: timedelta) -> WebhookSecret:
    """Make a new current secret; the old ones keep signing for `grace` (zero: they stop at once)."""
    now = utcnow()
    session.execute(
        update(WebhookSecret)
        .where(
            WebhookSecret.tenant_id == tenant_id,
            or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now + grace),
        )
        .values(expires_at=now + grace)
        .execution_options(synchronize_session=False)
    )
    row = WebhookSecret(tenant_id=tenant_id, secret=new_secret(), created_at=now)
    session.add(row)
    session.flush()
    return row


def signature(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """One `v1,<base64 HMAC-SHA256>` entry over `id.timestamp.body`, as the Standard Webhooks spec says."""
    key = base64.b64decode(secret.removeprefix(PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(all_secrets: list[str], msg_id: str, timestamp: int, body: str) -> str:
    return " ".join(signature(s, msg_id, timestamp, body) for s in all_secrets)
