"""The pipeline one job runs: its task's pipeline class, its scheduler and its LoRAs, over a model's loaded
components.

`prepare_pipeline(base, request)` is the entry point. It builds a pipeline object with diffusers' Auto
pipelines' `from_pipe`, which shares the base pipeline's modules (nothing is loaded twice, whatever the
task) but holds its own scheduler instance, so a job's scheduler choice never reaches the next job. One
such pipeline per (task, scheduler) is kept for as long as its base pipeline is loaded: building it
(a scheduler from its config, a pipeline from the base's components) cost about 5 ms of the generating
thread's time between two calls, every batch. A scheduler's state is per call: `set_timesteps` resets it.
LoRA adapters live inside the shared modules; each job activates exactly its own set, or disables them all.
"""

from __future__ import annotations

import hashlib
import logging
import re
import weakref
from pathlib import Path
from typing import Any

from shared.registry import LoraSpec, get_registry
from shared.settings import get_settings
from shared.storage import get_storage
from worker.acceleration import has_compiled_unet
from worker.upscale import is_upscaler

log = logging.getLogger("darkroom.worker")

# Public scheduler name -> (diffusers class, options over the model's scheduler config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
# AUTOMATIC1111's sampler names, for the `parameters` text embedded in outputs.
SAMPLER_NAMES = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "lcm": "LCM",
}

# Adapters loaded into each base pipeline's modules, by id of the base pipeline.
_loaded: dict[int, set[str]] = {}
# The pipelines built over each base pipeline, by (task, scheduler); they go when it is evicted.
_variants: weakref.WeakKeyDictionary[Any, dict[tuple[str, str | None], Any]] = weakref.WeakKeyDictionary()


def make_scheduler(config: Any, name: str | None, default_class: Any) -> Any:
    """A new scheduler instance: `name`'s class, or the model's own, configured from the model's config."""
    if name is None:
        return default_class.from_config(config)
    import diffusers

    class_name, options = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **options)


def _auto_class(task: str) -> Any:
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    # upscale without an upscaler model is an img2img refine pass at the larger size.
    return {
        "txt2img": AutoPipelineForText2Image,
        "img2img": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting,
        "upscale": AutoPipelineForImage2Image,
    }[task]


def prepare_pipeline(base: Any, request: dict[str, Any]) -> Any:
    """The pipeline for this request, sharing `base`'s modules; see the module docstring."""
    task, scheduler = request.get("task", "txt2img"), request.get("scheduler")
    built = _variants.setdefault(base, {})
    pipe = built.get((task, scheduler))
    if pipe is None:
        pipe = built[(task, scheduler)] = _variant(base, task, scheduler)
    apply_loras(base, pipe, request.get("loras") or [])
    return pipe


def _variant(base: Any, task: str, scheduler_name: str | None) -> Any:
    scheduler = make_scheduler(base.scheduler.config, scheduler_name, type(base.scheduler))
    overrides: dict[str, Any] = {"scheduler": scheduler}
    if "safety_checker" in base.components:
        # The checker runs after generation (worker/safety.py), on our terms: the pipeline's own run
        # would black out flagged images, which a tenant set to `flag` wants returned.
        overrides["safety_checker"] = None
        if "requires_safety_checker" in base.config:  # the x4 upscaler has no such option
            overrides["requires_safety_checker"] = False
    if "watermarker" in base.components:
        overrides["watermarker"] = None  # darkroom watermarks every output itself (worker/watermark.py)
    # A dedicated upscaler is its own task's pipeline; the Auto classes know only text-to-image families.
    maker = type(base) if is_upscaler(base) else _auto_class(task)
    pipe = maker.from_pipe(base, **overrides)
    # diffusers gives every SDXL pipeline a mark of its own whenever invisible-watermark is installed (as it
    # is, for darkroom's): SDXL outputs were marked twice, the first time in the call, on the CPU, while the
    # accelerator waited (1.3 s per call of 8 images at 1024x1024 on the 2-core VM). An attribute, not a
    # component: `from_pipe` cannot override it.
    if getattr(pipe, "watermark", None) is not None:
        pipe.watermark = None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampler_name(pipe: Any, request: dict[str, Any]) -> str:
    name = request.get("scheduler")
    return SAMPLER_NAMES[name] if name else type(pipe.scheduler).__name__


def adapter_name(lora: str) -> str:
    # PEFT keeps adapters in ModuleDicts, whose keys may not contain dots.
    return "lora_" + re.sub(r"\W", "_", lora)


def apply_loras(base: Any, pipe: Any, loras: list[dict[str, Any]]) -> None:
    """Activate exactly `loras` (name, scale) on the shared modules; none at all for an empty list."""
    loaded = _loaded.setdefault(id(base), set())
    if not loras:
        if loaded and has_compiled_unet(base):
            # Its graphs were traced on the UNet without adapters, and disabled ones stay in it: every later
            # job would run eagerly. Unloaded (PEFT puts back each layer it wrapped), the next jobs run
            # compiled again; a job that asks for a LoRA again loads it again.
            pipe.unload_lora_weights()
            loaded.clear()
        elif loaded:
            pipe.disable_lora()
        return
    registry = get_registry()
    for lora in loras:
        if lora["name"] not in loaded:
            spec = registry.loras.get(lora["name"])
            if spec is None:
                raise ValueError(f"LoRA {lora['name']!r} is not in this worker's registry")
            source, weight_name = resolve_lora(spec)
            log.info("loading LoRA %s from %s", spec.name, source)
            kwargs = {"weight_name": weight_name} if weight_name else {}
            pipe.load_lora_weights(source, adapter_name=adapter_name(spec.name), **kwargs)
            loaded.add(lora["name"])
    pipe.enable_lora()
    pipe.set_adapters([adapter_name(lora["name"]) for lora in loras], adapter_weights=[lora["scale"] for lora in loras])


def resolve_lora(spec: LoraSpec) -> tuple[str, str | None]:
    """(path or hub id, weight file name) of a LoRA: built-in, in job storage, local, or on the hub."""
    settings = get_settings()
    if spec.source.startswith("builtin:"):
        from worker.pipelines import build_builtin

        return str(build_builtin(spec.source.removeprefix("builtin:"), settings)), spec.weight_name
    if spec.source.startswith("storage:"):
        key = spec.source.removeprefix("storage:")
        assert settings.model_cache_dir is not None
        path = settings.model_cache_dir / "loras" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".safetensors")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(get_storage().get(key))
            tmp.replace(path)
        return str(path), None
    if Path(spec.source).is_file():
        return spec.source, None
    return spec.source, spec.weight_name
