"""Outpainting: an `inpaint` job's `pad`, checked, and the canvas and mask it makes.

The API builds both at submit time (api/generation.py) and stores them as the job's inputs, so the worker
runs a plain inpaint at the padded size. The new area is filled by extending the image's edge pixels
outwards and blurring them, which gives the model the surrounding colours to continue (a flat or noise fill
shows as a seam at partial strength), and the mask is white there: repaint. A given mask keeps its own
white inside the original area.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from shared.errors import InvalidRequest

SIDES = ("left", "right", "top", "bottom")


def check_pad(pad: int | dict[str, Any] | None) -> dict[str, int] | None:
    """Pixels to add on each side: one int for all four, or {left, right, top, bottom} (missing sides 0)."""
    if pad is None:
        return None
    sides = dict.fromkeys(SIDES, pad) if isinstance(pad, int) else {side: pad.get(side, 0) for side in SIDES}
    for side, value in sides.items():
        if value < 0 or value % 8:
            raise InvalidRequest(f"pad: {side} must be a non-negative multiple of 8, got {value}")
    if not any(sides.values()):
        raise InvalidRequest("pad: must extend at least one side")
    return sides


def padded_size(width: int, height: int, pad: dict[str, int]) -> tuple[int, int]:
    return width + pad["left"] + pad["right"], height + pad["top"] + pad["bottom"]


def extend_canvas(image: Image.Image, pad: dict[str, int]) -> Image.Image:
    """The image in the middle of a padded canvas whose new area is its edges stretched outwards, blurred."""
    pixels = np.asarray(image.convert("RGB"))
    widths = ((pad["top"], pad["bottom"]), (pad["left"], pad["right"]), (0, 0))
    stretched = Image.fromarray(np.pad(pixels, widths, mode="edge"))
    canvas = stretched.filter(ImageFilter.GaussianBlur(radius=max(4, max(pad.values()) // 4)))
    canvas.paste(image.convert("RGB"), (pad["left"], pad["top"]))
    return canvas


def outpaint_mask(size: tuple[int, int], pad: dict[str, int], mask: Image.Image | None) -> Image.Image:
    """White (repaint) on the new area; inside, the given mask, or black (keep) without one."""
    full = Image.new("L", padded_size(*size, pad), 255)
    full.paste(mask.convert("L") if mask is not None else Image.new("L", size, 0), (pad["left"], pad["top"]))
    return full
