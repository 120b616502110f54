"""darkroom's own PNG writer (shared/png.py): what browsers, Pillow and libpng read from it."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.png import encode_png
from worker.outputs import encode_output, read_parameters

SHAPES = [(1, 1), (3, 5), (37, 53), (64, 48), (300, 200)]


def scenes(width: int, height: int, channels: int) -> list[np.ndarray]:
    """Noise (every Paeth branch taken) and a smooth picture with grain, as generated images are."""
    rng = np.random.default_rng(width * 1000 + height)
    noise = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    smooth = np.asarray(small).astype(int)[:, :, [0, 1, 2, 0][:channels]] + rng.integers(-3, 4, noise.shape)
    return [noise, np.clip(smooth, 0, 255).astype(np.uint8)]


def chunks(data: bytes) -> list[tuple[bytes, bytes, bool]]:
    """(type, data, whether its CRC is right) of each chunk of a PNG file."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    found, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        found.append((kind, body, crc == zlib.crc32(kind + body)))
        at += 12 + length
    return found


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("RGBA", 4)])
@pytest.mark.parametrize("size", SHAPES)
def test_every_pixel_reads_back_exactly_through_pillow_and_libpng(
    mode: str, channels: int, size: tuple[int, int]
) -> None:
    for pixels in scenes(*size, channels):
        array = pixels[:, :, 0] if channels == 1 else pixels
        data = encode_png(Image.fromarray(array, mode), {})
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.mode == mode and image.size == size
            np.testing.assert_array_equal(np.asarray(image), array)
        # OpenCV decodes with libpng, which rejects a bad CRC or a malformed stream; it returns BGR(A).
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        expected = (
            array if channels == 1 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR if channels == 3 else cv2.COLOR_RGBA2BGRA)
        )
        np.testing.assert_array_equal(decoded, expected)
        assert all(ok for _kind, _body, ok in chunks(data))


def test_a_big_image_spreads_over_several_idat_chunks_and_still_reads_back() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8)  # noise: ~1.5 MB deflated
    data = encode_png(Image.fromarray(pixels), {})
    kinds = [kind for kind, _body, _ok in chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"IDAT") == 2
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)


def test_the_generation_record_reads_back_whatever_its_script() -> None:
    request = {"prompt": "café at dusk, 夜の灯台 🌙", "negative_prompt": "blurry", "steps": 30}
    request |= {"guidance_scale": 7.0, "model": "tiny-sd"}
    encoded = encode_output(Image.fromarray(scenes(64, 64, 3)[1]), request, job_id="j1", seed=7, sampler="Euler")
    with Image.open(io.BytesIO(encoded.data)) as image:
        parameters = read_parameters(image)
        assert parameters is not None and parameters.startswith("café at dusk, 夜の灯台 🌙\nNegative prompt: blurry\n")
        assert image.info["provenance"] == "generator=darkroom; model=tiny-sd; job=j1"
    # Latin-1 text goes in tEXt, which every reader knows; the rest in iTXt (UTF-8), as Pillow writes them.
    kinds = {kind: body for kind, body, _ok in chunks(encoded.data) if kind in (b"tEXt", b"iTXt")}
    assert kinds[b"tEXt"].startswith(b"provenance\0") and kinds[b"iTXt"].startswith(b"parameters\0")


def test_files_are_about_as_small_as_pillows() -> None:
    # Storage and transfer are paid per byte: the faster writer may not cost much of either.
    for size in ((512, 512), (300, 200)):
        image = Image.fromarray(scenes(*size, 3)[1])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # Pillow's default, zlib level 6
        assert len(encode_png(image, {})) <= 1.03 * len(buffer.getvalue())


def test_other_modes_go_through_pillow() -> None:
    palette = Image.fromarray(scenes(40, 30, 3)[1]).convert("P")
    with Image.open(io.BytesIO(encode_png(palette, {"parameters": "p"}))) as image:
        assert image.mode == "P" and image.info["parameters"] == "p"
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(palette.convert("RGB")))
