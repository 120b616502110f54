"""The invisible watermark on every output, and the helper that reads it back.

It uses the `invisible-watermark` package's DWT-DCT-SVD transform, as SDXL's reference pipeline uses the
package: plain DWT-DCT (SDXL's) lost 10 of 48 bits after a JPEG re-encode at quality 90 in our tests,
DWT-DCT-SVD none. The package's encoder refuses images under 256x256, but only as a blanket guard: the
transform writes one bit per 4x4 block of the image's half-size DWT band, so any image with at least 48
such blocks (8x8 pixels each, e.g. 64x48) holds all 48 bits. We call the transform class directly, so the
mark is the very one `WatermarkEncoder` writes on large images. Small images get fewer copies of each bit,
so rounding to 8-bit pixels can flip some: embedding repeats (up to EMBED_PASSES) until the exact pixels
read back every bit. What survives lossy re-encoding is size-dependent: at 256x256 and above a JPEG at
quality 90 keeps the mark; smaller images keep it losslessly (PNG) only. The output encoder checks the
bytes it actually writes, so an output's `watermarked` flag is true only when the mark reads back.

The package needs OpenCV; darkroom installs opencv-python-headless (no GUI libraries) and
invisible-watermark without its opencv-python dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

# 48 bits: "drkrm" + version 1.
WATERMARK_BITS = [int(b) for b in format(int.from_bytes(b"drkrm\x01", "big"), "048b")]
# The parameters WatermarkEncoder uses for "dwtDctSvd": the U channel, scale 36, 4x4 blocks.
SCALES, BLOCK = [0, 36, 0], 4
# One bit per 4x4 block of the DWT band, itself half the image: a block is 8x8 image pixels.
PIXELS_PER_BLOCK = 8
EMBED_PASSES = 3
# Bits that must match for `has_watermark`: 44 of 48 leaves room for lossy re-encoding, while a chance
# match on an unmarked image is about 1 in 10^9.
MATCH_THRESHOLD = 44


def blocks(width: int, height: int) -> int:
    return (width // PIXELS_PER_BLOCK) * (height // PIXELS_PER_BLOCK)


def can_watermark(image: Image.Image) -> bool:
    """Whether the image has room for every bit once (at least 48 blocks: 64x48, 56x56 and up)."""
    return blocks(image.width, image.height) >= len(WATERMARK_BITS)


def _transform(bits: list[int]) -> Any:
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    return EmbedDwtDctSvd(bits, wmLen=len(WATERMARK_BITS), scales=SCALES, block=BLOCK)


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def embed_watermark(image: Image.Image) -> tuple[Image.Image, int]:
    """The image with darkroom's mark, and how many bits its exact pixels read back (0: too small to hold one)."""
    if not can_watermark(image):
        return image, 0
    marked, matching = image, 0
    for _ in range(EMBED_PASSES):
        # Re-embedding into the already rounded pixels pulls back the bits that rounding pushed over.
        encoded = _transform(WATERMARK_BITS).encode(_bgr(marked))
        marked = Image.fromarray(np.ascontiguousarray(encoded[:, :, ::-1]))
        matching = watermark_bits_matching(marked)
        if matching == len(WATERMARK_BITS):
            break
    return marked, matching


def apply_watermark(image: Image.Image) -> Image.Image:
    """The image with darkroom's mark; unchanged if it is too small to hold one (see `can_watermark`)."""
    return embed_watermark(image)[0]


def watermark_bits_matching(image: Image.Image) -> int:
    if not can_watermark(image):
        return 0
    bits = _transform([]).decode(_bgr(image))
    return sum(int(a) == int(b) for a, b in zip(bits, WATERMARK_BITS, strict=True))


def has_watermark(image: Image.Image) -> bool:
    """Whether `image` carries darkroom's watermark (tolerating a few bits lost to re-encoding)."""
    return watermark_bits_matching(image) >= MATCH_THRESHOLD
