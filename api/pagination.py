"""Opaque list cursors: the (created_at, id) of the last row a page showed, for keyset pagination."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from shared.errors import InvalidRequest


def encode_cursor(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), row_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor names; a 422 naming `cursor` for anything this API did not hand out."""
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), str(row_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidRequest("cursor: not a cursor returned by this API") from exc
