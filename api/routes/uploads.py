"""/v1/uploads: input images for img2img, inpaint and upscale jobs, owned by the uploading tenant."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Response, UploadFile

from api.deps import TenantDep
from api.errors import responses
from api.idempotency import REPLAYED_HEADER, IdempotencyKeyHeader
from api.schemas import UploadRead
from shared import idempotency
from shared.db import session_scope
from shared.errors import InvalidRequest
from shared.images import decode_image
from shared.settings import get_settings
from shared.storage import get_storage
from shared.uploads import create_upload

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post(
    "",
    status_code=201,
    response_model=UploadRead,
    responses={
        200: {"model": UploadRead, "description": "An idempotent replay: the upload the key first made."},
        **responses(401, 409, 413, 422),
    },
)
def upload_image(
    file: UploadFile, tenant_id: TenantDep, response: Response, idempotency_key: IdempotencyKeyHeader = None
) -> UploadRead:
    """Upload a PNG, JPEG or WebP image; pass the returned key as a job's `image` or `mask` until it expires."""
    settings = get_settings()
    data = file.file.read(settings.max_input_bytes + 1)
    if len(data) > settings.max_input_bytes:
        raise InvalidRequest(f"file: image file over {settings.max_input_bytes} bytes")
    # Stored decoded and re-encoded as PNG: what a job later reads has passed every check already.
    image = decode_image(data, "file", max_pixels=settings.max_input_pixels, mode="RGBA")
    if idempotency_key is not None:
        # The file's bytes are the request: the same key with another file is a reuse (422).
        digest = hashlib.sha256(data).hexdigest()
        fingerprint = idempotency.fingerprint("POST", "/v1/uploads", {"file_sha256": digest})
        replay = idempotency.claim(tenant_id, idempotency_key, fingerprint)
        if replay is not None and replay.body is not None:
            response.headers[REPLAYED_HEADER] = "true"
            response.status_code = 200
            return UploadRead.model_validate(replay.body)
    try:
        with session_scope() as session:
            upload = create_upload(session, get_storage(), tenant_id, image, settings.upload_ttl_seconds)
            made = UploadRead(key=upload.key, width=upload.width, height=upload.height, expires_at=upload.expires_at)
            if idempotency_key is not None:
                body = made.model_dump(mode="json")
                idempotency.complete(session, tenant_id, idempotency_key, status=201, body=body, job_id=None)
    except BaseException:
        idempotency.release_after_failure(tenant_id, idempotency_key)
        raise
    return made
