"""Input images and the content policy at submit time: every refusal is a 422 naming the field and why,
and nothing is queued. URL fetches go to a real local HTTP server; SSRF targets are refused unconnected."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from shared.db import session_scope
from shared.tables import Job
from tests.support import reset_caches


def png_bytes(width: int = 64, height: int = 64, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def bomb(side: int) -> bytes:
    """A valid PNG header declaring side x side pixels, in a few hundred bytes."""
    raw = png_bytes(8, 8)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


class Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Handler.routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, png_bytes()),
        "/to-private": (302, {"Location": "https://10.0.0.1/x.png"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-ok": (302, {"Location": "/ok.png"}, b""),
        "/huge": (200, {}, b"\0" * 200_000),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def allow_server(monkeypatch: pytest.MonkeyPatch, image_server: str, api: TestClient) -> str:
    """Only the test server's exact host:port may be fetched although it is on loopback."""
    monkeypatch.setenv("DARKROOM_FETCH_ALLOW_HOSTS", f'["{image_server}"]')
    monkeypatch.setenv("DARKROOM_MAX_INPUT_BYTES", "100000")
    reset_caches()
    return f"http://{image_server}"


def submit(api: TestClient, auth: dict[str, str], **body: Any) -> Any:
    return api.post("/v1/jobs", json={"prompt": "a lighthouse", **body}, headers=auth)


def refused(response: Any, field: str, reason: str, code: str = "invalid_request") -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"].startswith(f"{field}:") and reason in error["message"], error["message"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://127.0.0.1/x.png", "non-public address (127.0.0.1)"),
        ("https://169.254.169.254/latest/meta-data/", "non-public address (169.254.169.254)"),
        ("https://10.1.2.3/x.png", "non-public address"),
        ("https://localhost/x.png", "resolves to a non-public address"),
        ("https://[::1]/x.png", "non-public address"),
        ("ftp://example.com/x.png", "must be an https:// URL"),
        ("http://93.184.215.14/x.png", "only https://"),
        ("file:///etc/passwd", "must be an https:// URL"),
    ],
)
def test_urls_to_private_addresses_are_refused(api: TestClient, auth: dict[str, str], url: str, reason: str) -> None:
    refused(submit(api, auth, task="img2img", image=url), "image", reason)
    assert job_count() == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_redirects_are_checked_like_the_first_url(api: TestClient, auth: dict[str, str], allow_server: str) -> None:
    accepted = submit(api, auth, task="img2img", image=f"{allow_server}/to-ok")
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["request"]["image"].startswith("inputs/")
    refused(submit(api, auth, task="img2img", image=f"{allow_server}/to-private"), "image", "(10.0.0.1)")
    refused(submit(api, auth, task="img2img", image=f"{allow_server}/to-metadata"), "image", "(169.254.169.254)")
    refused(submit(api, auth, task="img2img", image=f"{allow_server}/huge"), "image", "over 100000 bytes")
    refused(submit(api, auth, task="img2img", image=f"{allow_server}/missing"), "image", "HTTP 404")
    assert job_count() == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_images_are_refused_before_decoding(api: TestClient, auth: dict[str, str]) -> None:
    # Over our cap (5000x5000: below Pillow's own), and far over Pillow's too: both refused from the header.
    refused(
        submit(api, auth, task="img2img", image=data_uri(bomb(5000))), "image", "5000x5000 pixels is over the limit"
    )
    refused(submit(api, auth, task="img2img", image=data_uri(bomb(30000))), "image", "over the limit")
    refused(submit(api, auth, task="img2img", image=data_uri(png_bytes(fmt="GIF"), "gif")), "image", "GIF")
    refused(submit(api, auth, task="img2img", image=data_uri(png_bytes(fmt="BMP"), "bmp")), "image", "BMP")
    refused(submit(api, auth, task="img2img", image="data:image/png;base64,!!!"), "image", "base64")
    refused(submit(api, auth, task="img2img", image=data_uri(b"not an image")), "image", "not a readable image")
    refused(submit(api, auth, task="img2img", image=data_uri(png_bytes()[:60])), "image", "corrupt or truncated")
    refused(
        submit(api, auth, task="inpaint", image=data_uri(png_bytes(64, 64)), mask=data_uri(png_bytes(64, 72))),
        "mask",
        "must be the size of image (64x64), got 64x72",
    )
    refused(submit(api, auth, task="img2img"), "image", "required for task 'img2img'")
    refused(submit(api, auth, task="inpaint", image=data_uri(png_bytes())), "mask", "required")
    refused(submit(api, auth, image=data_uri(png_bytes())), "image", "not used by task 'txt2img'")
    refused(submit(api, auth, task="upscale", image=data_uri(png_bytes(320, 320)), scale=4), "width", "between")
    refused(submit(api, auth, loras=[{"name": "nope"}]), "loras", "unknown LoRA", code="unknown_lora")
    refused(submit(api, auth, model="tiny-sdxl", loras=[{"name": "tiny-lora"}]), "loras", "for sd1 models")
    refused(submit(api, auth, scheduler="dpmpp_2m", model="tiny-sdxl-turbo", steps=9), "steps", "at most 4")
    refused(submit(api, auth, output_format="png", quality=80), "quality", "jpeg and webp")
    assert job_count() == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_outpainting_pads_are_refused_naming_pad(api: TestClient, auth: dict[str, str]) -> None:
    image = data_uri(png_bytes(64, 64))
    refused(
        submit(api, auth, task="inpaint", image=image, pad=5), "pad", "left must be a non-negative multiple of 8, got 5"
    )
    refused(submit(api, auth, task="inpaint", image=image, pad={"top": -8}), "pad", "top must be a non-negative")
    refused(submit(api, auth, task="inpaint", image=image, pad={"left": 12}), "pad", "multiple of 8, got 12")
    refused(submit(api, auth, task="inpaint", image=image, pad=0), "pad", "at least one side")
    refused(submit(api, auth, task="inpaint", image=image, pad={}), "pad", "at least one side")
    # tiny-sd's canvas is at most 512x512: 64 + 2 x 232 = 528.
    refused(
        submit(api, auth, task="inpaint", image=image, pad=232), "pad", "canvas 528x528, over tiny-sd's max of 512x512"
    )
    refused(submit(api, auth, task="inpaint", image=image, pad={"middle": 8}), "pad", "unknown side 'middle'")
    refused(submit(api, auth, task="inpaint", image=image, pad={"left": "8"}), "pad", "left must be an integer")
    refused(submit(api, auth, task="inpaint", image=image, pad="64"), "pad", "must be an integer or an object")
    refused(submit(api, auth, task="inpaint", image=image, pad=8.0), "pad", "must be an integer or an object")
    refused(submit(api, auth, task="inpaint", image=image, pad=True), "pad", "must be an integer or an object")
    refused(submit(api, auth, task="inpaint", image=image, pad=64, width=0), "width", "at least 8, got 0")
    refused(submit(api, auth, task="img2img", image=image, pad=8), "pad", "not used by task 'img2img'")
    refused(submit(api, auth, pad=8), "pad", "not used by task 'txt2img'")
    assert job_count() == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_exif_orientation_is_applied(api: TestClient, auth: dict[str, str]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = png_bytes(96, 64, fmt="JPEG", exif=exif.tobytes())
    response = submit(api, auth, task="img2img", image=data_uri(data, "jpeg"))
    assert response.status_code == 202, response.text
    assert (response.json()["request"]["width"], response.json()["request"]["height"]) == (64, 96)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_uploads_belong_to_their_tenant_and_expire(
    api: TestClient, make_key: Callable[[str], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme, other = make_key("acme"), make_key("other")
    files = {"file": ("in.webp", png_bytes(64, 64, fmt="WEBP"), "image/webp")}
    upload = api.post("/v1/uploads", files=files, headers=acme)
    assert upload.status_code == 201, upload.text
    key = upload.json()["key"]
    assert key.startswith("uploads/") and upload.json()["width"] == 64
    assert submit(api, acme, task="img2img", image=key).status_code == 202
    refused(submit(api, other, task="img2img", image=key), "image", "unknown or expired upload")
    refused(submit(api, acme, task="img2img", image=key.replace(".png", "x.png")), "image", "unknown or expired")
    gif = {"file": ("in.gif", png_bytes(fmt="GIF"), "image/gif")}
    refused(api.post("/v1/uploads", files=gif, headers=acme), "file", "unsupported image format GIF")

    import shared.uploads

    future = shared.uploads.utcnow() + __import__("datetime").timedelta(days=2)
    monkeypatch.setattr(shared.uploads, "utcnow", lambda: future)
    refused(submit(api, acme, task="img2img", image=key), "image", "unknown or expired upload")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_content_policy_refuses_and_counts(
    api: TestClient, make_key: Callable[[str], dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    policy = tmp_path / "tenants.toml"
    policy.write_text('[tenants.strict]\ndeny_terms = ["castle"]\ndeny_patterns = ["sea\\\\s*monster"]\n')
    monkeypatch.setenv("DARKROOM_POLICY_DENY_TERMS", '["gore"]')
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(policy))
    reset_caches()
    from prometheus_client import REGISTRY

    def refusals(tenant: str) -> float:
        return REGISTRY.get_sample_value("darkroom_policy_refusals_total", {"tenant": tenant}) or 0.0

    strict, relaxed = make_key("strict"), make_key("relaxed")
    before = refusals("strict")
    refused(submit(api, strict, prompt="GORE everywhere"), "prompt", "content policy", code="content_policy")
    refused(submit(api, strict, prompt="a castle"), "prompt", "content policy", code="content_policy")
    refused(
        submit(api, strict, prompt="x", negative_prompt="Sea  Monster"),
        "negative_prompt",
        "content policy",
        code="content_policy",
    )
    assert refusals("strict") == before + 3
    assert submit(api, strict, prompt="a gorge at dusk").status_code == 202  # whole words only
    assert submit(api, relaxed, prompt="a castle").status_code == 202
    refused(submit(api, relaxed, prompt="gore"), "prompt", "content policy", code="content_policy")
