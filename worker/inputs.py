"""A job's input images and the task-specific arguments of its pipeline call.

The API has already fetched, checked and stored the inputs (api/generation.py); here they are only read
back from storage. `pipe_kwargs_for(request, inputs)` is what `generate()` adds to the common arguments.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from shared.storage import get_storage
from worker.upscale import low_res_input


def load_inputs(request: dict[str, Any]) -> dict[str, Image.Image]:
    storage = get_storage()
    inputs: dict[str, Image.Image] = {}
    for field, mode in (("image", "RGB"), ("mask", "L")):
        key = request.get(field)
        if key:
            inputs[field] = Image.open(io.BytesIO(storage.get(key))).convert(mode)
    return inputs


def effective_steps(request: dict[str, Any]) -> int:
    """Denoising steps the pipeline actually runs: image-to-image tasks skip the first (1 - strength)."""
    steps = int(request["steps"])
    # txt2img, and upscale on an upscaler, which has no strength: every step runs.
    if request.get("task", "txt2img") == "txt2img" or request.get("strength") is None:
        return steps
    return min(steps, int(steps * float(request["strength"])))


def pipe_kwargs_for(request: dict[str, Any], inputs: dict[str, Image.Image]) -> dict[str, Any]:
    task = request.get("task", "txt2img")
    width, height = int(request["width"]), int(request["height"])
    if task == "txt2img":
        return {"width": width, "height": height}
    if task == "img2img":
        return {"image": inputs["image"], "strength": float(request["strength"])}
    if task == "inpaint":
        return {
            "image": inputs["image"],
            "mask_image": inputs["mask"],
            "strength": float(request["strength"]),
            "width": width,
            "height": height,
        }
    if task == "upscale" and request.get("upscaler"):
        return {"image": low_res_input(inputs["image"]), "noise_level": int(request["noise_level"])}
    if task == "upscale":
        # The refine pass: enlarge, then let img2img add detail at the new size.
        enlarged = inputs["image"].resize((width, height), Image.Resampling.LANCZOS)
        return {"image": enlarged, "strength": float(request["strength"])}
    raise ValueError(f"unknown task {task!r}")
