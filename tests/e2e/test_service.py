"""The whole path with real processes: HTTP -> Redis/Celery -> worker -> S3 -> database -> HTTP."""

from __future__ import annotations

import base64
import io
import json
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from tests.e2e.conftest import Service
from tests.support import run_cli

pytestmark = pytest.mark.e2e


def download(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return image


def test_submit_poll_download(service: Service) -> None:
    auth = service.key("acme")
    job = service.submit(
        auth, prompt="a lighthouse", width=96, height=64, steps=3, num_images=2, seed=5, metadata={"order": 17}
    )
    done = service.wait(auth, job["id"])
    assert done["status"] == "succeeded", done
    assert done["metadata"] == {"order": 17}
    assert done["started_at"] and done["finished_at"]
    assert [(o["width"], o["height"], o["seed"]) for o in done["outputs"]] == [(96, 64, 5), (96, 64, 6)]
    for output in done["outputs"]:
        assert download(output["url"]).size == (96, 64)


def _loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_only_the_pool_process_loads_torch(service: Service) -> None:
    """Celery's main process forks the process that runs jobs. Had the main process loaded torch, which
    counts CUDA devices on import, every forked pool process on a GPU host would fail its first CUDA call
    ("Cannot re-initialize CUDA in forked subprocess")."""
    auth = service.key("fork")
    assert service.wait(auth, service.submit(auth, steps=2, width=64, height=64)["id"])["status"] == "succeeded"
    assert service.worker is not None
    main = service.worker.proc.pid
    pool = [int(pid) for pid in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
    assert pool, "the worker has no pool process"
    assert not _loads_torch(main)
    assert all(_loads_torch(pid) for pid in pool)


def test_same_request_and_seed_give_the_same_pixels(service: Service) -> None:
    auth = service.key("acme")
    body = {"prompt": "a red fox", "steps": 3, "seed": 1234}
    first, second = service.submit(auth, **body), service.submit(auth, **body)
    other = service.submit(auth, **{**body, "seed": 1235})
    images = [np.asarray(download(service.wait(auth, j["id"])["outputs"][0]["url"])) for j in (first, second, other)]
    # The two may run in different batches, and batched float maths differs from unbatched at ~1e-6: one step
    # of uint8 rounding here and there, which the watermark's embedding can spread over a few neighbours.
    # Alike on average to a tenth of a level; another seed is another picture.
    same = np.abs(images[0].astype(int) - images[1].astype(int))
    other = np.abs(images[0].astype(int) - images[2].astype(int))
    assert same.mean() < 0.5 and other.mean() > 5, (same.mean(), other.mean())


def test_cancel_running_and_queued_jobs(service: Service) -> None:
    auth = service.key("acme")
    # A slow job keeps the single worker busy, so the next one stays queued behind it.
    slow = service.submit(auth, width=256, height=256, steps=50)
    behind = service.submit(auth, steps=2)
    service.wait(auth, slow["id"], until=("running",), timeout=60)

    queued = httpx.post(f"{service.url}/v1/jobs/{behind['id']}/cancel", headers=auth, timeout=30)
    assert queued.status_code == 200 and queued.json()["status"] == "canceled"

    running = httpx.post(f"{service.url}/v1/jobs/{slow['id']}/cancel", headers=auth, timeout=30)
    assert running.status_code == 200 and running.json()["status"] == "canceled"

    # The worker stops the running job at its next step and is free again well before 50 steps would end.
    after = service.submit(auth, steps=2)
    assert service.wait(auth, after["id"], timeout=60)["status"] == "succeeded"
    slow_final = service.get(auth, slow["id"])
    assert slow_final["status"] == "canceled" and slow_final["outputs"] == []
    assert (slow_final["progress"] is None) and slow_final["error"] is None
    behind_final = service.get(auth, behind["id"])
    assert behind_final["status"] == "canceled" and behind_final["started_at"] is None

    finished = httpx.post(f"{service.url}/v1/jobs/{after['id']}/cancel", headers=auth, timeout=30)
    assert finished.status_code == 409


def test_tenant_isolation(service: Service) -> None:
    alice, bob = service.key("alice"), service.key("bob")
    job = service.submit(alice, steps=2)
    assert httpx.get(f"{service.url}/v1/jobs/{job['id']}", headers=bob).status_code == 404
    assert httpx.post(f"{service.url}/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    bob_jobs = httpx.get(f"{service.url}/v1/jobs", headers=bob).json()["data"]
    assert job["id"] not in [j["id"] for j in bob_jobs]
    assert service.wait(alice, job["id"])["status"] == "succeeded"


def test_a_restarted_worker_picks_up_what_was_queued_while_it_was_down(service: Service) -> None:
    auth = service.key("acme")
    assert service.worker is not None
    service.worker.stop(signal.SIGTERM)
    job = service.submit(auth, steps=2)
    assert service.get(auth, job["id"])["status"] == "queued"
    service.start_worker()
    assert service.wait(auth, job["id"])["status"] == "succeeded"


def test_a_message_lost_by_redis_is_republished(service: Service) -> None:
    auth = service.key("acme")
    assert service.worker is not None
    service.worker.stop(signal.SIGTERM)
    job = service.submit(auth, steps=2)
    # Redis loses everything darkroom had in it (a flush or a restart without persistence).
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = service.env["DARKROOM_REDIS_PREFIX"]
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    assert client.llen(f"{prefix}model.tiny-sd") == 0
    service.start_worker()
    assert service.wait(auth, job["id"], timeout=60)["status"] == "succeeded"


def test_a_job_whose_worker_is_killed_is_taken_over(service: Service) -> None:
    auth = service.key("acme")
    job = service.submit(auth, width=256, height=256, steps=12)
    service.wait(auth, job["id"], until=("running",), timeout=60)
    assert service.worker is not None
    service.worker.kill()  # kill -9: no cleanup, no heartbeat
    service.start_worker()
    done = service.wait(auth, job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert len(done["outputs"]) == 1
    download(done["outputs"][0]["url"])


def test_cli_submit_waits_and_saves_the_images(service: Service, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = service.key("cli")["Authorization"].removeprefix("Bearer ")
    out = tmp_path / "out"
    result = run_cli(
        [
            "submit",
            "a quiet harbour",
            "--steps",
            "2",
            "--num-images",
            "2",
            "--seed",
            "3",
            "--wait",
            "--out",
            str(out),
            "--url",
            service.url,
            "--api-key",
            key,
        ],
        service.env,
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded"
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    assert Image.open(files[0]).size == (64, 64)


def test_upload_then_img2img_and_upscale_as_jpeg(service: Service) -> None:
    auth = service.key("acme")
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    upload = httpx.post(
        f"{service.url}/v1/uploads", files={"file": ("in.png", buffer.getvalue(), "image/png")}, headers=auth
    )
    assert upload.status_code == 201, upload.text
    key = upload.json()["key"]
    img = service.submit(auth, task="img2img", image=key, steps=4, strength=0.5, output_format="jpeg", seed=1)
    up = service.submit(auth, task="upscale", image=key, scale=2, steps=4, scheduler="euler_a")
    done = [service.wait(auth, j["id"]) for j in (img, up)]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"], done
    jpeg = httpx.get(done[0]["outputs"][0]["url"], timeout=30)
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (64, 64)
    assert download(done[1]["outputs"][0]["url"]).size == (128, 128)
    # Another tenant cannot use this upload.
    other = httpx.post(
        f"{service.url}/v1/jobs", json={"prompt": "x", "task": "img2img", "image": key}, headers=service.key("other")
    )
    assert other.status_code == 422 and other.json()["error"]["message"].startswith("image:")


def test_upscale_on_a_model_with_an_upscaler_runs_the_x4_upscaler(service: Service) -> None:
    auth = service.key("acme")
    rng = np.random.default_rng(4)
    small = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((40, 32), Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    upload = httpx.post(f"{service.url}/v1/uploads", files={"file": ("in.png", buffer.getvalue())}, headers=auth)
    assert upload.status_code == 201, upload.text
    body = {"model": "tiny-sd2", "task": "upscale", "image": upload.json()["key"], "steps": 3, "seed": 9}
    jobs = [service.submit(auth, **body, scale=4), service.submit(auth, **body, scale=4), service.submit(auth, **body)]
    done = [service.wait(auth, j["id"]) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 3, done
    assert done[0]["request"]["upscaler"] == "tiny-x4-upscaler" and "strength" not in done[0]["request"]
    images = [download(d["outputs"][0]["url"]) for d in done]
    assert [i.size for i in images] == [(160, 128), (160, 128), (80, 64)]  # exactly scale x 40x32
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert "Upscaler: tiny-x4-upscaler" in images[0].info["parameters"]
    assert all(d["outputs"][0]["watermarked"] for d in done)


def test_outpainting_through_the_service(service: Service) -> None:
    auth = service.key("acme")
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 120, dtype=np.uint8)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    job = service.submit(auth, task="inpaint", image=image, pad={"left": 16, "top": 8, "bottom": 8}, steps=3)
    assert job["request"]["pad"] == {"left": 16, "right": 0, "top": 8, "bottom": 8}
    done = service.wait(auth, job["id"])
    assert done["status"] == "succeeded", done
    assert download(done["outputs"][0]["url"]).size == (80, 64)
    refused = httpx.post(
        f"{service.url}/v1/jobs", json={"prompt": "x", "task": "inpaint", "image": image, "pad": 3}, headers=auth
    )
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("pad:")
