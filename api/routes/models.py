"""/v1/models: what this deployment serves, with defaults and limits."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import TenantDep
from api.errors import responses
from api.schemas import ModelList, ModelRead
from shared.registry import get_registry

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses=responses(401))
def list_models(_: TenantDep) -> ModelList:
    """The model registry: each model's family, default parameters and limits."""
    return ModelList(
        data=[
            ModelRead(
                name=m.name,
                family=m.family,
                description=m.description,
                defaults={
                    "width": m.default_width,
                    "height": m.default_height,
                    "steps": m.default_steps,
                    "guidance_scale": m.default_guidance,
                },
                limits={
                    "min_size": m.min_size,
                    "max_width": m.max_width,
                    "max_height": m.max_height,
                    "max_steps": m.max_steps,
                    "max_guidance_scale": m.max_guidance,
                    "max_images": 8,
                },
            )
            for m in get_registry().models.values()
        ]
    )
