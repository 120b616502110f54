"""The CPU each output image costs a worker after its pipeline call: watermark, PNG encoding, embedded record.

On a GPU host this is the part of a lone job's latency that is not the call, and what the encoder processes
(`DARKROOM_ENCODE_PROCESSES`) must keep up with. The images are smooth gradients with a little grain, as
generated pictures are, so that PNG compression works as hard as it does on real outputs.

    python -m bench.encode [--sizes 64,512] [--images 20]

Prints ms per image by stage, with Pillow's PNG writer beside darkroom's (shared/png.py) for scale; the last
line is one JSON object with `encode_ms_<size>` and `png_bytes_vs_pillow_<size>` for each size.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from shared.png import encode_png
from worker.outputs import encode_output
from worker.watermark import embed_watermark, watermark_bits_matching

# For scale: Pillow's writer at the level darkroom used before shared/png.py (ComfyUI's default too).
PILLOW_LEVEL = 4
REQUEST = {"prompt": "a lighthouse at dusk", "steps": 30, "guidance_scale": 7.0, "model": "sd15"}


def picture(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.integers(-4, 5, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(base).astype(int) + grain, 0, 255).astype(np.uint8))


def per_image_ms(work: Callable[[Image.Image], object], images: list[Image.Image]) -> float:
    """The median over `images` of one call's time (the first image warms caches and is timed twice)."""
    work(images[0])
    times = []
    for image in images:
        start = time.perf_counter()
        work(image)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def pillow_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PILLOW_LEVEL)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512", help="square image sizes, comma-separated")
    parser.add_argument("--images", type=int, default=20, help="images per size (default 20)")
    args = parser.parse_args()
    table = Table(title="output encoding, ms per image (median), one core")
    columns = ("size", "output", "mark", "mark read", "PNG", f"Pillow PNG {PILLOW_LEVEL}", "PNG bytes/Pillow's")
    for column in columns:
        table.add_column(column, justify="right")
    figures = {}
    for size in (int(s) for s in args.sizes.split(",")):
        images = [picture(size, seed) for seed in range(args.images)]
        row = [
            per_image_ms(lambda im: encode_output(im, REQUEST, job_id="j", seed=1, sampler="Euler"), images),
            per_image_ms(embed_watermark, images),
            per_image_ms(watermark_bits_matching, images),
            per_image_ms(lambda im: encode_png(im, {}), images),
            per_image_ms(pillow_png, images),
        ]
        ratio = sum(len(encode_png(im, {})) for im in images) / sum(len(pillow_png(im)) for im in images)
        table.add_row(f"{size}x{size}", *(f"{ms:.1f}" for ms in row), f"{ratio:.3f}")
        figures[f"encode_ms_{size}"] = round(row[0], 2)
        figures[f"png_bytes_vs_pillow_{size}"] = round(ratio, 3)
    Console().print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
