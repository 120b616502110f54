"""Running one job's request through a loaded pipeline, with a per-step hook for progress and cancel."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from worker.inputs import effective_steps, pipe_kwargs_for


class StopGeneration(Exception):
    """Raised from the step hook to abandon a job mid-denoising (canceled, or taken over by another worker).

    Raising is the one way to stop diffusers without also decoding an image (`_interrupt` still decodes).
    """


def generators(seed: int, count: int) -> list[torch.Generator]:
    # One CPU generator per image: image i is reproducible from seed + i alone, on any device and
    # whatever else shares its batch.
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(count)]


def generate(
    pipe: Any,
    request: dict[str, Any],
    on_step: Callable[[int, int], None],
    inputs: dict[str, Image.Image] | None = None,
) -> list[Image.Image]:
    total = effective_steps(request)
    count = int(request["num_images"])

    def step_end(_pipe: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, total)
        return callback_kwargs

    negative = request.get("negative_prompt")
    with torch.inference_mode():
        result = pipe(
            prompt=[request["prompt"]] * count,
            negative_prompt=[negative] * count if negative else None,
            num_inference_steps=int(request["steps"]),
            guidance_scale=float(request["guidance_scale"]),
            generator=generators(int(request["seed"]), count),
            output_type="pil",
            callback_on_step_end=step_end,
            **pipe_kwargs_for(request, inputs or {}),
        )
    return list(result.images)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
