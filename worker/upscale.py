"""`upscale` jobs on a dedicated diffusion upscaler (diffusers' x4 upscaler), where the registry names one.

The API records the upscaler in the request (`request["upscaler"]`, from the job model's `upscaler` entry)
and the worker runs that model instead of the job's own. The upscaler denoises latents at the input's size
and decodes them at its native factor (4 for the x4 upscaler), so the input is handed over as it is (only
rounded to a multiple of 8, which the UNet's downsampling needs), and the result is fitted to the size the
API promised: `scale` times the input. A job asking for 2x of a 4x upscaler gets the 4x result resized down,
as AUTOMATIC1111 does with its upscalers. Without an upscaler, `upscale` is an img2img refine pass at the
larger size (worker/inputs.py).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

# Pipelines that take a low-resolution `image` and return it enlarged.
UPSCALER_CLASSES = ("StableDiffusionUpscalePipeline",)
# The x4 upscaler's UNet halves the latents (the input's own size) up to three times.
INPUT_MULTIPLE = 8


def is_upscaler(pipe: Any) -> bool:
    return type(pipe).__name__ in UPSCALER_CLASSES


def low_res_input(image: Image.Image) -> Image.Image:
    """The input at a size the upscaler's UNet takes: rounded down to a multiple of 8 (unchanged if it is)."""
    width = max(INPUT_MULTIPLE, image.width // INPUT_MULTIPLE * INPUT_MULTIPLE)
    height = max(INPUT_MULTIPLE, image.height // INPUT_MULTIPLE * INPUT_MULTIPLE)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """The upscaler's result at the job's size (scale x the input), resized only where the two differ."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
