"""Uploaded input images: stored under `uploads/<tenant>/<id>.png`, owned by one tenant, expiring.

A key is only ever resolved together with the tenant asking, so another tenant's key, an expired key
and a made-up key all read the same: "unknown or expired upload".
"""

from __future__ import annotations

from datetime import timedelta

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import InvalidRequest
from shared.png import encode_png
from shared.storage import Storage
from shared.tables import Upload, new_id, utcnow

PREFIX = "uploads/"


def create_upload(session: Session, storage: Storage, tenant_id: str, image: Image.Image, ttl: int) -> Upload:
    upload_id = new_id()
    key = f"{PREFIX}{tenant_id}/{upload_id}.png"
    storage.put(key, encode_png(image), "image/png")
    now = utcnow()
    upload = Upload(
        id=upload_id,
        tenant_id=tenant_id,
        key=key,
        width=image.width,
        height=image.height,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl),
    )
    session.add(upload)
    session.flush()
    return upload


def resolve_upload(session: Session, tenant_id: str, key: str, field: str) -> Upload:
    upload = session.scalar(select(Upload).where(Upload.key == key, Upload.tenant_id == tenant_id))
    if upload is None or upload.expires_at <= utcnow():
        raise InvalidRequest(f"{field}: unknown or expired upload {key!r}")
    return upload
