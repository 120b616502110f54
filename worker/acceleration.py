"""GPU execution options: channels_last, torch.compile over warmed shape buckets, VAE tiling for big images.

All of it is off on a CPU worker, and compile is off unless `DARKROOM_COMPILE=1`. Attention is left to
diffusers' default processor, which calls torch's scaled_dot_product_attention (SDPA): nothing here
replaces the attention processors, so SDPA stays on.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from shared.settings import Settings
from worker.upscale import is_upscaler

if TYPE_CHECKING:  # torch loads where it is used: a pool process sets the compile cache before importing it
    import torch

log = logging.getLogger("darkroom.worker")

# The prompt used to warm compiled shapes; what it says does not matter, only the tensor shapes do.
_WARM_PROMPT = "warm-up"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """`512x512x1,512x512x8` -> [(512, 512, 1), (512, 512, 8)] (width, height, images per call)."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height, batch = (int(n) for n in item.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"DARKROOM_COMPILE_SHAPES: {item!r} is not WIDTHxHEIGHTxBATCH") from exc
        shapes.append((width, height, batch))
    return shapes


def bucket_for(images: int, width: int, height: int, shapes: list[tuple[int, int, int]]) -> int:
    """Images per call to run `images` at: the smallest warmed bucket that holds them, else `images` as is.

    Padding up to a compiled shape costs a few wasted rows; a shape never seen costs a recompilation.
    """
    sizes = sorted(b for w, h, b in shapes if (w, h) == (width, height) and b >= images)
    return sizes[0] if sizes else images


def configure_compile_cache(settings: Settings) -> None:
    """Point inductor at a cache that outlives the process, so a restarted worker starts warm."""
    if not settings.compile:
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.inductor_cache_dir))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def prepare(pipe: Any, device: torch.device, settings: Settings) -> Any:
    """Apply the device's execution options to a freshly loaded pipeline (already on `device`)."""
    import torch

    if device.type != "cuda":
        return pipe
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(memory_format=torch.channels_last)
    # Compiled shapes are text-to-image shapes; an upscaler's follow its input images, so it runs eagerly.
    if settings.compile and getattr(pipe, "unet", None) is not None and not is_upscaler(pipe):
        configure_compile_cache(settings)
        # Static shapes: calls are padded to the listed buckets, so each bucket gets kernels specialised to
        # its sizes; by default a second shape would turn the batch dimension symbolic for every bucket.
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", dynamic=False)
        warm(pipe, parse_shapes(settings.compile_shapes))
    return pipe


def warm(pipe: Any, shapes: list[tuple[int, int, int]]) -> None:
    """Compile every configured shape now (two steps each), not in the middle of somebody's job."""
    import torch

    for width, height, batch in shapes:
        log.info("compiling shape %dx%d x%d", width, height, batch)
        with torch.inference_mode():
            pipe(
                prompt=[_WARM_PROMPT] * batch,
                width=width,
                height=height,
                num_inference_steps=2,
                guidance_scale=7.5,
                output_type="latent",
            )


def configure_vae(pipe: Any, width: int, height: int, tiling_pixels: int) -> None:
    """Big images decode in tiles, one at a time, so the VAE's activations fit beside a batch's latents."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        return
    if tiling_pixels and width * height > tiling_pixels:
        vae.enable_tiling()
        vae.enable_slicing()
    else:
        vae.disable_tiling()
        vae.disable_slicing()
