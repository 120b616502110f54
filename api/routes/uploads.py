"""/v1/uploads: input images for img2img, inpaint and upscale jobs, owned by the uploading tenant."""

from __future__ import annotations

from fastapi import APIRouter, UploadFile

from api.deps import TenantDep
from api.errors import responses
from api.schemas import UploadRead
from shared.db import session_scope
from shared.errors import InvalidRequest
from shared.images import decode_image
from shared.settings import get_settings
from shared.storage import get_storage
from shared.uploads import create_upload

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post("", status_code=201, response_model=UploadRead, responses=responses(401, 413, 422))
def upload_image(file: UploadFile, tenant_id: TenantDep) -> UploadRead:
    """Upload a PNG, JPEG or WebP image; pass the returned key as a job's `image` or `mask` until it expires."""
    settings = get_settings()
    data = file.file.read(settings.max_input_bytes + 1)
    if len(data) > settings.max_input_bytes:
        raise InvalidRequest(f"file: image file over {settings.max_input_bytes} bytes")
    # Stored decoded and re-encoded as PNG: what a job later reads has passed every check already.
    image = decode_image(data, "file", max_pixels=settings.max_input_pixels, mode="RGBA")
    with session_scope() as session:
        upload = create_upload(session, get_storage(), tenant_id, image, settings.upload_ttl_seconds)
    return UploadRead(key=upload.key, width=upload.width, height=upload.height, expires_at=upload.expires_at)
