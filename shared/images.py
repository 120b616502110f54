"""Decoding client-supplied images safely: a format allow-list, a pixel cap checked on the header before
any pixel is decoded, EXIF orientation applied, and one normalised form (RGB or L, PNG) stored for the
worker. Every refusal is an `InvalidRequest` naming the field, so the client gets a 422 it can act on.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import InvalidRequest

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,", re.I)


def parse_data_uri(uri: str, field: str) -> bytes:
    match = _DATA_URI.match(uri)
    if match is None or not match.group("b64"):
        raise InvalidRequest(f"{field}: a data: URI must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(uri[match.end() :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{field}: the data: URI is not valid base64") from exc


def decode_image(data: bytes, field: str, *, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode `data` into a loaded image of `mode`, or refuse with a 422 naming `field`."""
    # 1. Identify from the header only: Image.open reads no pixel data yet.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own cap (far above ours) tripped on the header: refused for the same reason as below.
        raise InvalidRequest(f"{field}: image is over the limit of {max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        raise InvalidRequest(f"{field}: not a readable image ({', '.join(ALLOWED_FORMATS)} accepted)") from exc
    except Exception as exc:
        raise InvalidRequest(f"{field}: not a readable image ({type(exc).__name__})") from exc
    # 2. Refuse what we do not decode, and what would decode into too many pixels.
    if image.format not in ALLOWED_FORMATS:
        raise InvalidRequest(f"{field}: unsupported image format {image.format}; use PNG, JPEG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequest(f"{field}: image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidRequest(f"{field}: animated images are not accepted")
    # 3. Decode, then apply the EXIF orientation so the pixels are the way the client sees them.
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise InvalidRequest(f"{field}: the image data is corrupt or truncated ({type(exc).__name__})") from exc
    if mode == "L":
        return image.convert("RGBA").convert("L") if image.mode in ("P", "LA", "PA") else image.convert("L")
    return image.convert(mode)
