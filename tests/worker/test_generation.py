"""Every task on every model family, submitted through the API and run by the real `jobs.run` task on the
tiny offline pipelines: sizes, determinism, schedulers, LoRAs, formats, embedded parameters, watermark."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from shared.db import session_scope
from shared.jobs import get_job
from shared.storage import get_storage
from shared.tenants import create_key
from worker import tasks
from worker.outputs import read_parameters
from worker.watermark import embed_watermark, has_watermark

FAMILIES = ["tiny-sd", "tiny-sd2", "tiny-sdxl"]


@pytest.fixture
def client(darkroom_env: dict[str, Any]) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def auth(client: TestClient) -> dict[str, str]:
    with session_scope() as session:
        return {"Authorization": f"Bearer {create_key(session, 'acme')}"}


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def picture(width: int = 64, height: int = 64) -> Image.Image:
    gradient = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
    return Image.fromarray(gradient)


def half_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask)


def run(client: TestClient, auth: dict[str, str], **body: Any) -> list[Image.Image]:
    """Submit through the API, run the job in this process, and return its decoded outputs."""
    response = client.post("/v1/jobs", json={"prompt": "a lighthouse", "steps": 3, "seed": 3, **body}, headers=auth)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert tasks.run_job(job_id) == "succeeded", get_job_error(job_id)
    return outputs(job_id)


def get_job_error(job_id: str) -> Any:
    with session_scope() as session:
        return get_job(session, job_id).error_message


def outputs(job_id: str) -> list[Image.Image]:
    with session_scope() as session:
        records = get_job(session, job_id).outputs or []
    return [Image.open(io.BytesIO(get_storage().get(r["key"]))) for r in records]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("model", FAMILIES)
def test_every_task_runs_on_every_family(client: TestClient, auth: dict[str, str], model: str) -> None:
    source = picture(96, 64)
    txt = run(client, auth, model=model, width=96, height=64)
    img = run(client, auth, model=model, task="img2img", image=data_uri(source), strength=0.7)
    inp = run(client, auth, model=model, task="inpaint", image=data_uri(source), mask=data_uri(half_mask(96, 64)))
    # tiny-sd2 upscales with its upscaler (no strength); the others with an img2img refine pass.
    strength = {} if model == "tiny-sd2" else {"strength": 0.7}
    up = run(client, auth, model=model, task="upscale", image=data_uri(source), scale=2, **strength)
    assert [i.size for i in (*txt, *img, *inp, *up)] == [(96, 64), (96, 64), (96, 64), (192, 128)]
    # The same request and seed give the same pixels, for image tasks too.
    again = run(client, auth, model=model, task="img2img", image=data_uri(source), strength=0.7)
    np.testing.assert_array_equal(pixels(img[0]), pixels(again[0]))
    assert not np.array_equal(pixels(img[0]), pixels(inp[0]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_upscale_runs_the_models_x4_upscaler_at_exactly_scale_times_the_input(
    client: TestClient, auth: dict[str, str]
) -> None:
    from shared.registry import get_registry
    from worker.generate import generators
    from worker.watermark import apply_watermark

    source = picture(40, 32)
    x4 = run(client, auth, model="tiny-sd2", task="upscale", image=data_uri(source), scale=4)[0]
    x2 = run(client, auth, model="tiny-sd2", task="upscale", image=data_uri(source), scale=2)[0]
    assert (x4.size, x2.size) == ((160, 128), (80, 64))
    again = run(client, auth, model="tiny-sd2", task="upscale", image=data_uri(source), scale=4)[0]
    np.testing.assert_array_equal(pixels(x4), pixels(again))
    assert "Upscaler: tiny-x4-upscaler, Noise level: 20" in (read_parameters(x4) or "")
    noisier = run(client, auth, model="tiny-sd2", task="upscale", image=data_uri(source), scale=4, noise_level=200)[0]
    assert noisier.size == (160, 128) and not np.array_equal(pixels(x4), pixels(noisier))
    # The very pixels of diffusers' StableDiffusionUpscalePipeline on the input, watermarked: not a refine pass.
    upscaler = tasks.pipeline_cache().get(get_registry().get("tiny-x4-upscaler"))  # type: ignore[arg-type]
    with torch.inference_mode():
        direct = upscaler(
            prompt=["a lighthouse"], image=source, num_inference_steps=3, guidance_scale=7.0, generator=generators(3, 1)
        ).images[0]
    np.testing.assert_array_equal(pixels(x4), pixels(apply_watermark(direct)))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_fields_an_upscaler_does_not_take_are_refused(client: TestClient, auth: dict[str, str]) -> None:
    body = {"prompt": "p", "model": "tiny-sd2", "task": "upscale", "image": data_uri(picture(32, 32)), "scale": 4}
    for extra, field in (({"strength": 0.5}, "strength"), ({"loras": [{"name": "tiny-lora"}]}, "loras")):
        response = client.post("/v1/jobs", json={**body, **extra}, headers=auth)
        assert response.status_code == 422
        assert response.json()["error"]["message"].startswith(f"{field}: not used by upscale jobs on tiny-sd2")
    for extra, reason in (
        ({"noise_level": 351}, "less than or equal to 350"),
        ({"noise_level": 20, "model": "tiny-sd"}, "used only by upscale jobs on a model with an upscaler"),
    ):
        response = client.post("/v1/jobs", json={**body, **extra}, headers=auth)
        assert response.status_code == 422 and response.json()["error"]["message"].startswith("noise_level:")
        assert reason in response.json()["error"]["message"]
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()["data"]}
    assert models["tiny-sd2"]["defaults"]["upscaler"] == "tiny-x4-upscaler"
    assert models["tiny-x4-upscaler"]["limits"]["tasks"] == ["upscale"]


def stored_input(job_id: str, field: str) -> Image.Image:
    with session_scope() as session:
        key = get_job(session, job_id).request[field]
    return Image.open(io.BytesIO(get_storage().get(key)))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_outpainting_extends_the_canvas_and_repaints_only_the_new_area(
    client: TestClient, auth: dict[str, str]
) -> None:
    source = picture(64, 64)
    body = {"prompt": "a lighthouse", "steps": 3, "seed": 3, "task": "inpaint", "image": data_uri(source)}
    response = client.post("/v1/jobs", json={**body, "pad": {"left": 32, "right": 32}, "strength": 1.0}, headers=auth)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["request"]["pad"] == {"left": 32, "right": 32, "top": 0, "bottom": 0}
    assert tasks.run_job(job_id) == "succeeded"
    [out] = outputs(job_id)
    assert out.size == (128, 64)
    # The canvas: the input unchanged in the middle, its edge colours carried outwards; white mask outside.
    canvas, mask = stored_input(job_id, "image"), stored_input(job_id, "mask")
    np.testing.assert_array_equal(pixels(canvas)[:, 32:96], pixels(source))
    assert abs(int(pixels(canvas)[:, 0].mean()) - int(pixels(source)[:, 0].mean())) < 8  # not black, not noise
    expected_mask = np.zeros((64, 128), dtype=np.uint8)
    expected_mask[:, :32] = expected_mask[:, 96:] = 255
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)
    # The model repaints the new strips and keeps the original area.
    kept = np.abs(pixels(out)[:, 40:88] - pixels(source)[:, 8:56]).mean()
    repainted = np.abs(pixels(out)[:, :24] - pixels(canvas)[:, :24]).mean()
    assert kept < repainted
    again = run(client, auth, task="inpaint", image=data_uri(source), pad={"left": 32, "right": 32}, strength=1.0)
    np.testing.assert_array_equal(pixels(out), pixels(again[0]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_outpainting_with_one_int_and_a_mask_repaints_both(client: TestClient, auth: dict[str, str]) -> None:
    source = picture(64, 48)
    body = {"prompt": "a lighthouse", "steps": 2, "task": "inpaint", "image": data_uri(source), "pad": 16}
    response = client.post("/v1/jobs", json={**body, "mask": data_uri(half_mask(64, 48))}, headers=auth)
    job_id = response.json()["id"]
    assert tasks.run_job(job_id) == "succeeded"
    assert outputs(job_id)[0].size == (96, 80)
    mask = np.asarray(stored_input(job_id, "mask"))
    assert (mask[:16] == 255).all() and (mask[-16:] == 255).all() and (mask[:, :16] == 255).all()
    assert (mask[16:64, 16:48] == 0).all() and (mask[16:64, 48:80] == 255).all()  # the given half mask, inside


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_inpaint_keeps_the_unmasked_half_close_to_the_input(client: TestClient, auth: dict[str, str]) -> None:
    source = picture(64, 64)
    [out] = run(client, auth, task="inpaint", image=data_uri(source), mask=data_uri(half_mask()), strength=1.0)
    kept = np.abs(pixels(out)[:, :24] - pixels(source)[:, :24]).mean()
    repainted = np.abs(pixels(out)[:, 40:] - pixels(source)[:, 40:]).mean()
    assert kept < repainted


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_scheduler_choice_changes_the_output_and_does_not_leak(client: TestClient, auth: dict[str, str]) -> None:
    before = run(client, auth)[0]
    names = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "lcm")
    outputs = {name: run(client, auth, scheduler=name)[0] for name in names}
    after = run(client, auth)[0]
    np.testing.assert_array_equal(pixels(before), pixels(after))
    assert not np.array_equal(pixels(before), pixels(outputs["dpmpp_2m_karras"]))
    assert "Sampler: DPM++ 2M Karras" in (read_parameters(outputs["dpmpp_2m_karras"]) or "")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_lora_changes_the_output_and_leaves_no_trace(client: TestClient, auth: dict[str, str]) -> None:
    before = run(client, auth)[0]
    with_lora = run(client, auth, loras=[{"name": "tiny-lora", "scale": 1.0}])[0]
    half = run(client, auth, loras=[{"name": "tiny-lora", "scale": 0.5}])[0]
    after = run(client, auth)[0]
    assert not np.array_equal(pixels(before), pixels(with_lora))
    assert not np.array_equal(pixels(with_lora), pixels(half))
    np.testing.assert_array_equal(pixels(before), pixels(after))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_lcm_lora_job_runs_in_four_steps_at_guidance_one(client: TestClient, auth: dict[str, str]) -> None:
    # LCM-LoRA as people run it: the LoRA, the LCM scheduler, 4 steps, guidance 1 (no classifier-free pass).
    lcm = {"scheduler": "lcm", "steps": 4, "guidance_scale": 1.0}
    [out] = run(client, auth, loras=[{"name": "tiny-lora", "scale": 1.0}], **lcm)
    [plain] = run(client, auth, **lcm)
    assert out.size == (64, 64) and not np.array_equal(pixels(out), pixels(plain))
    parameters = read_parameters(out) or ""
    assert "Steps: 4, Sampler: LCM, CFG scale: 1, " in parameters and "tiny-lora: 1" in parameters


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_few_step_model_runs_with_no_guidance(client: TestClient, auth: dict[str, str]) -> None:
    [out] = run(client, auth, model="tiny-sdxl-turbo", steps=1)
    assert out.size == (64, 64)
    assert "CFG scale: 0, " in (read_parameters(out) or "")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_outputs_carry_parameters_provenance_and_a_watermark(
    client: TestClient, auth: dict[str, str], fmt: str, pil_format: str
) -> None:
    body = {"negative_prompt": "blurry", "width": 256, "height": 256, "output_format": fmt}
    response = client.post("/v1/jobs", json={"prompt": "a lighthouse", "steps": 2, "seed": 11, **body}, headers=auth)
    job_id = response.json()["id"]
    assert tasks.run_job(job_id) == "succeeded"
    [image] = outputs(job_id)
    assert image.format == pil_format and image.size == (256, 256)
    assert read_parameters(image) == (
        "a lighthouse\nNegative prompt: blurry\n"
        "Steps: 2, Sampler: EulerDiscreteScheduler, CFG scale: 7, Seed: 11, Size: 256x256, Model: tiny-sd"
    )
    provenance = image.info.get("provenance") or image.getexif().get(0x010E)
    assert provenance == f"generator=darkroom; model=tiny-sd; job={job_id}"
    if fmt == "png":
        assert has_watermark(image)
    read = client.get("/v1/jobs/" + job_id, headers=auth).json()
    assert read["outputs"][0]["content_type"] == f"image/{fmt}" and read["outputs"][0]["nsfw"] is False
    # The flag is what a reader finds in the stored file, whatever the format.
    assert read["outputs"][0]["watermarked"] is has_watermark(image)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_an_sdxl_output_is_the_models_own_pixels_under_darkroom_mark_alone(
    client: TestClient, auth: dict[str, str], task: str
) -> None:
    # diffusers gives an SDXL pipeline a watermark of its own whenever invisible-watermark is installed (as
    # it is for darkroom's mark), at 256 pixels a side and up: it ran in the call, on the CPU, while the GPU
    # waited (1.3 s per call of 8 at 1024x1024 here), and marked SDXL outputs twice.
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    from shared.settings import get_settings
    from worker.generate import generate_batch
    from worker.pipelines import build_builtin

    inputs = {"image": data_uri(picture(256, 256)), "strength": 0.7} if task == "img2img" else {}
    body = {"prompt": "a lighthouse", "steps": 2, "seed": 11, "width": 256, "height": 256, "task": task, **inputs}
    response = client.post("/v1/jobs", json={"model": "tiny-sdxl", **body}, headers=auth)
    job_id = response.json()["id"]
    assert tasks.run_job(job_id) == "succeeded", get_job_error(job_id)
    [image] = outputs(job_id)

    with session_scope() as session:
        request = get_job(session, job_id).request
    auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForText2Image
    plain = auto.from_pretrained(str(build_builtin("tiny-sdxl", get_settings())), add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    given = {"image": picture(256, 256)} if task == "img2img" else None
    [[reference]] = generate_batch(plain, [request], lambda step, total: None, inputs=given)
    np.testing.assert_array_equal(pixels(image), pixels(embed_watermark(reference)[0]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_small_output_carries_the_watermark_too(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/jobs", json={"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}, headers=auth
    )
    job_id = response.json()["id"]
    assert tasks.run_job(job_id) == "succeeded"
    [image] = outputs(job_id)
    assert image.size == (64, 64) and has_watermark(image)
    assert client.get("/v1/jobs/" + job_id, headers=auth).json()["outputs"][0]["watermarked"] is True


@pytest.mark.parametrize("size", [(64, 48), (64, 64), (96, 64), (128, 128), (200, 136)])
def test_the_watermark_round_trips_losslessly_at_every_size_that_holds_it(size: tuple[int, int]) -> None:
    from worker.watermark import apply_watermark, watermark_bits_matching

    rng = np.random.default_rng(size[0])
    for scene in (
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC),
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)),  # noise, as tiny models make
    ):
        buffer = io.BytesIO()
        apply_watermark(scene).save(buffer, format="PNG")
        read_back = Image.open(io.BytesIO(buffer.getvalue()))
        assert watermark_bits_matching(read_back) == 48
        assert not has_watermark(scene)


@pytest.mark.parametrize("size", [(64, 48), (200, 136), (512, 512)])
def test_the_batched_transform_writes_and_reads_exactly_the_packages_mark(size: tuple[int, int]) -> None:
    # Anyone holding invisible-watermark reads our mark: the pixels are the ones its own encoder writes.
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    from worker.watermark import BLOCK, SCALES, WATERMARK_BITS, _transform

    rng = np.random.default_rng(size[0])
    bgr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    package = EmbedDwtDctSvd(WATERMARK_BITS, wmLen=len(WATERMARK_BITS), scales=SCALES, block=BLOCK)
    ours = _transform(WATERMARK_BITS).encode(bgr.copy())
    np.testing.assert_array_equal(ours, package.encode(bgr.copy()))
    np.testing.assert_array_equal(_transform([]).decode(ours), package.decode(ours))


def test_moving_the_largest_singular_value_rebuilds_each_block_as_the_full_svd_does() -> None:
    # The mark moves one singular value per block; a zero block (a flat band) has no direction of its own.
    from worker.watermark import _largest_singular, _top_singular

    blocks = np.random.default_rng(3).normal(100, 40, (64, 4, 4))
    blocks[5] = 0
    u, s, v = _top_singular(blocks)
    moved = blocks + (90.0 - s)[:, None, None] * u[:, :, None] * v[:, None, :]
    full_u, full_s, full_vt = np.linalg.svd(blocks)
    full_s[:, 0] = 90.0
    np.testing.assert_allclose(moved, full_u @ (full_s[:, :, None] * full_vt), atol=1e-9)
    np.testing.assert_allclose(_largest_singular(moved), np.linalg.svd(moved, compute_uv=False)[:, 0], atol=1e-9)


def test_an_image_too_small_for_every_bit_is_left_unmarked_and_says_so() -> None:
    from worker.outputs import encode_output
    from worker.watermark import apply_watermark

    scene = picture(56, 48)  # 7 x 6 = 42 blocks of 8x8 pixels: fewer than the 48 bits
    assert apply_watermark(scene) is scene
    request = {"prompt": "p", "steps": 1, "guidance_scale": 7.0, "model": "tiny-sd"}
    assert encode_output(scene, request, job_id="j", seed=1, sampler="Euler").watermarked is False
    assert encode_output(picture(64, 48), request, job_id="j", seed=1, sampler="Euler").watermarked is True


class FlagEverything(torch.nn.Module):
    """A deterministic stand-in for StableDiffusionSafetyChecker with its call signature: flags every image."""

    def forward(self, images: Any, clip_input: Any) -> tuple[Any, list[bool]]:
        images[:] = 0  # the stock checker blacks out what it flags; darkroom must not return that copy
        return images, [True] * len(images)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_safety_checker_hit_is_withheld_or_flagged_per_tenant(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from shared.registry import get_registry
    from tests.support import reset_caches

    policy = tmp_path / "tenants.toml"
    policy.write_text('[tenants.lenient]\nnsfw = "flag"\n')
    monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(policy))
    reset_caches()
    with session_scope() as session:
        strict = {"Authorization": f"Bearer {create_key(session, 'strict')}"}
        lenient = {"Authorization": f"Bearer {create_key(session, 'lenient')}"}
    unflagged = run(client, strict)[0]
    base = tasks.pipeline_cache().get(get_registry().get("tiny-sd"))  # type: ignore[arg-type]
    base.register_modules(safety_checker=FlagEverything())
    try:
        response = client.post("/v1/jobs", json={"prompt": "a lighthouse", "steps": 3, "seed": 3}, headers=strict)
        job_id = response.json()["id"]
        assert tasks.run_job(job_id) == "failed"
        with session_scope() as session:
            job = get_job(session, job_id)
        assert job.error_code == "content_policy" and not job.outputs
        flagged = run(client, lenient)[0]
        response = client.get("/v1/jobs", headers=lenient).json()["data"][0]
        assert response["outputs"][0]["nsfw"] is True
        np.testing.assert_array_equal(pixels(flagged), pixels(unflagged))  # returned as made, not blacked out
    finally:
        base.register_modules(safety_checker=None)


def test_the_watermark_survives_a_jpeg_re_encode_at_quality_90() -> None:
    from worker.watermark import apply_watermark, watermark_bits_matching

    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((320, 256), Image.BICUBIC)
    marked = apply_watermark(scene)
    assert np.abs(pixels(marked) - pixels(scene)).mean() < 5  # invisible: a few levels of 255 on average
    buffer = io.BytesIO()
    marked.save(buffer, format="JPEG", quality=90)
    reencoded = Image.open(io.BytesIO(buffer.getvalue()))
    assert has_watermark(reencoded), watermark_bits_matching(reencoded)
    assert not has_watermark(scene)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_images_made_8_bit_where_they_are_equal_diffusers_own_conversion(dtype: torch.dtype) -> None:
    from diffusers.image_processor import VaeImageProcessor

    from worker.generate import to_pil

    images = torch.rand(3, 3, 24, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    images[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 0.0, 1.0])  # halves round to even, ends stay
    ours = to_pil(images)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    assert [image.mode for image in ours] == ["RGB"] * 3
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(reference))
