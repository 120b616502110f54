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

import importlib.util
from functools import cache
from pathlib import Path
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


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: cv2.dct(x) == C @ x @ C.T for an n x n block."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    c = np.sqrt(2 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2)
    return c


_DCT = _dct_matrix(BLOCK)


def _blocks(frame: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The frame's whole BLOCK x BLOCK blocks in row-major order, as a (count, BLOCK, BLOCK) array."""
    rows, cols = frame.shape[0] // BLOCK, frame.shape[1] // BLOCK
    area = frame[: rows * BLOCK, : cols * BLOCK]
    return area.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK, BLOCK), rows, cols


def _largest_singular(blocks: np.ndarray) -> np.ndarray:
    # The square roots of the Gram matrices' eigenvalues are the singular values; numpy's symmetric
    # eigensolver takes about half the time of its SVD on a stack of 4x4 matrices.
    gram = blocks.transpose(0, 2, 1) @ blocks
    return np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[:, -1], 0.0))


def _top_singular(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, s, v) of each block's largest singular value, from its Gram matrix's top eigenvector."""
    gram = blocks.transpose(0, 2, 1) @ blocks
    values, vectors = np.linalg.eigh(gram)
    s, v = np.sqrt(np.maximum(values[:, -1], 0.0)), vectors[:, :, -1]
    degenerate = s < 1e-9  # a zero block has no direction of its own: the full SVD picks one
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (blocks @ v[:, :, None])[:, :, 0] / s[:, None]
    if degenerate.any():
        full_u, full_s, full_vt = np.linalg.svd(blocks[degenerate])
        u[degenerate], s[degenerate], v[degenerate] = full_u[:, :, 0], full_s[:, 0], full_vt[:, 0, :]
    return u, s, v


# pywt's Haar filter taps. The transforms below do its arithmetic in its order, so they give its very floats.
_HAAR = 0.7071067811865476


def _haar2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """pywt.dwt2(x, "haar") of an even-sized array, to the bit: (cA, (cH, cV, cD)) as (cA, cH, cV, cD)."""
    x = x.astype(np.float64)
    low, high = x[0::2] * _HAAR + x[1::2] * _HAAR, x[0::2] * _HAAR - x[1::2] * _HAAR
    return (
        low[:, 0::2] * _HAAR + low[:, 1::2] * _HAAR,
        high[:, 0::2] * _HAAR + high[:, 1::2] * _HAAR,
        low[:, 0::2] * _HAAR - low[:, 1::2] * _HAAR,
        high[:, 0::2] * _HAAR - high[:, 1::2] * _HAAR,
    )


def _unhaar(low: np.ndarray, high: np.ndarray, axis: int) -> np.ndarray:
    shape = list(low.shape)
    shape[axis] *= 2
    out = np.empty(shape)
    even, odd = [slice(None)] * 2, [slice(None)] * 2
    even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
    out[tuple(even)] = low * _HAAR + high * _HAAR
    out[tuple(odd)] = low * _HAAR - high * _HAAR
    return out


def _ihaar2(ca: np.ndarray, ch: np.ndarray, cv: np.ndarray, cd: np.ndarray) -> np.ndarray:
    """pywt.idwt2((ca, (ch, cv, cd)), "haar"), to the bit."""
    return _unhaar(_unhaar(ca, cv, 1), _unhaar(ch, cd, 1), 0)


@cache
def _batched_transform() -> type:
    """The package's DWT-DCT-SVD transform with its per-block Python loops done as array operations.

    The package visits a 512x512 image's 4,096 blocks one by one (about 150 ms); the same maths on all
    blocks at once (batched DCT as matrix products, batched SVD, the Haar transform as array slices, a
    third of pywt's time) takes a few ms and writes the same pixels, read back by the package's own
    decoder. Built once, on first use: the package pulls in OpenCV.
    """
    import cv2

    class Batched(_package_transform()):  # type: ignore[misc]
        def encode(self, bgr: np.ndarray) -> np.ndarray:
            rows, cols = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
            yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
            for channel, scale in enumerate(self._scales[:2]):
                if scale <= 0:
                    continue
                ca, ch, cv, cd = _haar2(yuv[:rows, :cols, channel])
                self.encode_frame(ca, scale)
                # The package puts its horizontal and vertical details back the other way round: so do we,
                # for its very pixels. Assigning floats to the uint8 plane truncates them, as it does there.
                yuv[:rows, :cols, channel] = _ihaar2(ca, cv, ch, cd)
            return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)

        def decode(self, bgr: np.ndarray) -> np.ndarray:
            rows, cols = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
            yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
            ones, seen = np.zeros(self._wmLen), np.zeros(self._wmLen)
            for channel, scale in enumerate(self._scales[:2]):
                if scale <= 0:
                    continue
                blocks, _rows, _cols = _blocks(_haar2(yuv[:rows, :cols, channel])[0])
                largest = _largest_singular(_DCT @ blocks @ _DCT.T)
                bit_of_block = np.arange(len(blocks)) % self._wmLen
                ones += np.bincount(bit_of_block, weights=(largest % scale) > scale * 0.5, minlength=self._wmLen)
                seen += np.bincount(bit_of_block, minlength=self._wmLen)
            # The package's vote: a bit is 1 where the mean of its blocks' readings, times 255, passes 127.
            return np.asarray((ones / seen) * 255 > 127)

        def encode_frame(self, frame: np.ndarray, scale: float) -> None:
            blocks, rows, cols = _blocks(frame)
            wanted = np.asarray(self._watermarks, dtype=np.float64)[np.arange(len(blocks)) % self._wmLen]
            dct = _DCT @ blocks @ _DCT.T
            u, s, v = _top_singular(dct)
            # The package rebuilds each block from its SVD with the largest singular value moved; moving it
            # alone is the same matrix, a rank-one change along its own singular vectors.
            moved = (s // scale + 0.25 + 0.5 * wanted) * scale
            diffused = _DCT.T @ (dct + (moved - s)[:, None, None] * u[:, :, None] * v[:, None, :]) @ _DCT
            area = diffused.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK)
            frame[: rows * BLOCK, : cols * BLOCK] = area

    return Batched


def _package_transform() -> type:
    """The package's `EmbedDwtDctSvd`, from its module alone. Importing it the usual way runs the package's
    `__init__`, which imports its RivaGAN watermarker and with it torch: seconds in every encoder process
    (worker/store.py), which never use torch, and a process's first image waited for them."""
    package = importlib.util.find_spec("imwatermark")
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("invisible-watermark is not installed", name="imwatermark")
    path = Path(package.submodule_search_locations[0]) / "dwtDctSvd.py"
    spec = importlib.util.spec_from_file_location("darkroom_imwatermark_dwtdctsvd", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EmbedDwtDctSvd


def _transform(bits: list[int]) -> Any:
    return _batched_transform()(bits, wmLen=len(WATERMARK_BITS), scales=SCALES, block=BLOCK)


def _bgr(image: Image.Image) -> np.ndarray:
    return _swap_red_blue(np.asarray(image.convert("RGB")))


def _swap_red_blue(pixels: np.ndarray) -> np.ndarray:
    """RGB to BGR or back, contiguous: OpenCV's copy took 0.06 ms at 512x512, numpy's of a reversed view 2.4."""
    import cv2  # loaded already: the transform needs it

    return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)


def embed_watermark(image: Image.Image) -> tuple[Image.Image, int]:
    """The image with darkroom's mark, and how many bits its exact pixels read back (0: too small to hold one)."""
    if not can_watermark(image):
        return image, 0
    marked, matching = image, 0
    for _ in range(EMBED_PASSES):
        # Re-embedding into the already rounded pixels pulls back the bits that rounding pushed over.
        encoded = _transform(WATERMARK_BITS).encode(_bgr(marked))
        marked = Image.fromarray(_swap_red_blue(encoded))
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
