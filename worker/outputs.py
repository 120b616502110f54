"""Encoding finished images: watermark, format (PNG, JPEG, WebP), and the embedded generation record.

Every image carries its parameters in AUTOMATIC1111's `parameters` format (a PNG text chunk, or EXIF
UserComment for JPEG and WebP, as A1111 writes them) so tools that read those show how it was made, and a
provenance line (generator=darkroom, model, job id) in a `provenance` text chunk or EXIF ImageDescription.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from shared.png import encode_png
from worker.watermark import MATCH_THRESHOLD, embed_watermark, has_watermark

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
EXIF_IFD, USER_COMMENT, IMAGE_DESCRIPTION, SOFTWARE = 0x8769, 0x9286, 0x010E, 0x0131


@dataclass
class Encoded:
    data: bytes
    content_type: str
    extension: str
    watermarked: bool


def parameters_text(request: dict[str, Any], *, seed: int, sampler: str, width: int, height: int) -> str:
    """AUTOMATIC1111's "parameters": prompt, negative prompt, then one line of `Key: value` pairs."""
    lines = [request["prompt"]]
    if request.get("negative_prompt"):
        lines.append(f"Negative prompt: {request['negative_prompt']}")
    pairs = [
        f"Steps: {request['steps']}",
        f"Sampler: {sampler}",
        f"CFG scale: {request['guidance_scale']:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
        f"Model: {request['model']}",
    ]
    if request.get("strength") is not None:
        pairs.append(f"Denoising strength: {request['strength']:g}")
    if request.get("upscaler"):
        pairs.append(f"Upscaler: {request['upscaler']}")
        pairs.append(f"Noise level: {request['noise_level']}")
    if request.get("loras"):
        pairs.append("Lora weights: " + '"' + ", ".join(f"{x['name']}: {x['scale']:g}" for x in request["loras"]) + '"')
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def provenance_text(request: dict[str, Any], job_id: str) -> str:
    return f"generator=darkroom; model={request['model']}; job={job_id}"


def user_comment(text: str) -> bytes:
    # EXIF UserComment: an 8-byte character-code prefix, then the text (A1111 writes it via piexif, UTF-16BE).
    return b"UNICODE\0" + text.encode("utf-16-be")


def read_user_comment(raw: bytes) -> str:
    if raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw[8:].decode("utf-8", errors="replace")


def encode_output(image: Image.Image, request: dict[str, Any], *, job_id: str, seed: int, sampler: str) -> Encoded:
    fmt = request.get("output_format", "png")
    parameters = parameters_text(request, seed=seed, sampler=sampler, width=image.width, height=image.height)
    provenance = provenance_text(request, job_id)
    image, matching = embed_watermark(image)
    if fmt == "png":
        data = encode_png(image, {"parameters": parameters, "provenance": provenance})
    else:
        buffer = io.BytesIO()
        exif = Image.Exif()
        exif[SOFTWARE] = "darkroom"
        exif[IMAGE_DESCRIPTION] = provenance
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(parameters)
        quality = int(request.get("quality") or 90)
        image.save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes())
        data = buffer.getvalue()
    # What clients get must read back: PNG stores exactly the pixels just checked; a lossy format may erase
    # the mark of a small image, so its bytes are read again.
    lossless = fmt == "png"
    watermarked = matching >= MATCH_THRESHOLD if lossless else has_watermark(Image.open(io.BytesIO(data)))
    return Encoded(data, CONTENT_TYPES[fmt], EXTENSIONS[fmt], watermarked)


def read_parameters(image: Image.Image) -> str | None:
    """The embedded `parameters` text of a darkroom (or A1111) image, whatever its format."""
    if "parameters" in image.info:
        return str(image.info["parameters"])
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    return read_user_comment(raw) if isinstance(raw, bytes) else None
