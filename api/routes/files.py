"""/files: serves local-storage outputs behind signed, expiring URLs (S3 deployments use presigned URLs)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from api.errors import responses
from shared.errors import NotFound
from shared.storage import LocalStorage, get_storage

router = APIRouter(tags=["files"])
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@router.get("/files/{key:path}", response_class=FileResponse, responses=responses(403, 404))
def get_file(
    key: str, expires: int = Query(..., ge=0, le=2**40), sig: str = Query(..., max_length=128)
) -> FileResponse:
    """Download an output through the signed URL a job returned."""
    storage = get_storage()
    if not isinstance(storage, LocalStorage):
        raise NotFound("no such file")
    path = storage.open_signed(key, expires, sig)
    media_type = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})
