"""/v1/models: what this deployment serves, with defaults and limits."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import TenantDep
from api.errors import responses
from api.schemas import LoraRead, ModelList, ModelRead
from shared.registry import get_registry

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses=responses(401))
def list_models(_: TenantDep) -> ModelList:
    """The model registry: each model's family, default parameters and limits."""
    registry = get_registry()
    return ModelList(
        loras=[
            LoraRead(
                name=lora.name,
                families=list(lora.families),
                description=lora.description,
                default_scale=lora.default_scale,
                max_scale=lora.max_scale,
            )
            for lora in registry.loras.values()
        ],
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
                    "scheduler": m.default_scheduler,
                    "strength": m.default_strength,
                    "upscale_strength": m.upscale_strength,
                    "upscaler": m.upscaler,
                },
                limits={
                    "min_size": m.min_size,
                    "max_width": m.max_width,
                    "max_height": m.max_height,
                    "max_steps": m.max_steps,
                    "max_guidance_scale": m.max_guidance,
                    "max_images": 8,
                    "tasks": list(m.tasks),
                    "schedulers": list(m.schedulers),
                    "upscale_scales": [2, 4],
                },
            )
            for m in registry.models.values()
        ],
    )
