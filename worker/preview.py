"""Cheap previews of a job's image while it denoises: the latents mapped to RGB by a fixed linear map.

No VAE decode (which would cost as much as a step or more): each latent pixel becomes one preview pixel,
so a 512x512 job previews at 64x64. The factors are the ones ComfyUI and AUTOMATIC1111 use for their
"latent2rgb" previews; a latent space they do not fit (not 4 channels) gets no preview.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from PIL import Image

# (factors 4x3, bias 3) per latent space.
Factors = tuple[list[list[float]], list[float]]
_SD: Factors = (
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
    [0.0, 0.0, 0.0],
)
_SDXL: Factors = (
    [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
    [0.1084, -0.0175, -0.0011],
)
JPEG_QUALITY = 70


def factors_for(pipe: Any) -> Factors | None:
    """The latent-to-RGB map for this pipeline's latent space, or None where previews are not available."""
    vae = getattr(pipe, "vae", None)
    if vae is None or getattr(vae.config, "latent_channels", None) != 4:
        return None
    # SDXL's VAE has its own latent space (and scaling factor 0.13025 instead of SD's 0.18215).
    return _SDXL if hasattr(pipe, "text_encoder_2") else _SD


def preview_uri(latents: torch.Tensor, factors: Factors) -> str:
    """One image's latents (C, H, W) as a small JPEG `data:` URI."""
    weights = torch.tensor(factors[0], dtype=torch.float32)
    bias = torch.tensor(factors[1], dtype=torch.float32)
    rgb = latents.detach().to("cpu", torch.float32).permute(1, 2, 0) @ weights + bias
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
