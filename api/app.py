"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.limits import BodySizeLimit
from api.routes import files, health, jobs, models, uploads
from shared.settings import get_settings

DESCRIPTION = """
darkroom runs Stable Diffusion jobs on a pool of GPU workers. Submit a job, get its id at once, then poll
`GET /v1/jobs/{id}` until it is `succeeded` and download its `outputs`.

Every `/v1` route needs `Authorization: Bearer <key>`. Errors are `{"error": {"code", "message"}}`.
"""


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="darkroom", version="1", description=DESCRIPTION)
    errors.install(app)
    for module in (jobs, models, uploads, health, files):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
