"""`make run` (darkroom dev) on the embedded defaults: SQLite, local storage, tiny-sd built on first use."""

from __future__ import annotations

import io
import json
import re
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support import Process, delete_redis_prefix, free_port, run_cli, wait_for

pytestmark = pytest.mark.e2e


def dev_env(data: Path, prefix: str, redis_url: str = "redis://127.0.0.1:6379/0") -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(data),
        "HF_HUB_OFFLINE": "1",
        "DARKROOM_ENV_FILE": "",
        "DARKROOM_DATA_DIR": str(data),
        "DARKROOM_REDIS_URL": redis_url,
        "DARKROOM_REDIS_PREFIX": prefix,
    }


def test_the_printed_curl_gets_a_job_that_succeeds(tmp_path: Path) -> None:
    prefix = f"darkroom-dev:{uuid.uuid4().hex[:8]}:"
    port = free_port()
    dev = Process(["dev", "--port", str(port)], dev_env(tmp_path / "data", prefix), tmp_path / "dev.log")
    try:
        wait_for(lambda: "Ctrl-C" in dev.output() or not dev.alive(), timeout=120, what="dev ready")
        out = dev.output()
        assert dev.alive(), out
        assert f"http://127.0.0.1:{port}" in out
        key = re.search(r"dev API key: (\S+)", out)
        assert key and (tmp_path / "data" / "dev-api-key").read_text().strip() == key.group(1)
        submit_cmd = re.search(r"(curl -s \S+/v1/jobs .*?\\\n.*?'\n)", out, re.S)
        assert submit_cmd, out
        job = json.loads(
            subprocess.run(
                ["bash", "-c", submit_cmd.group(1).replace("\\\n", " ")], capture_output=True, text=True, check=True
            ).stdout
        )
        assert job["status"] == "queued"
        poll_cmd = re.search(r"(curl -s \S+/v1/jobs/JOB_ID .*)\n", out)
        assert poll_cmd

        def poll() -> dict | None:
            cmd = poll_cmd.group(1).replace("JOB_ID", job["id"])
            current = json.loads(subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout)
            return current if current["status"] in ("succeeded", "failed", "canceled") else None

        done = wait_for(poll, timeout=120, what="job finished")
        assert done["status"] == "succeeded", done
        image = Image.open(io.BytesIO(httpx.get(done["outputs"][0]["url"]).content))
        assert image.format == "PNG" and image.size == (64, 64)
        # The built-in model was built on first use, under the data directory.
        assert (tmp_path / "data" / "models" / "tiny-sd" / "model_index.json").exists()
    finally:
        dev.stop()
        delete_redis_prefix(prefix)


def test_dev_without_redis_says_so_in_one_line(tmp_path: Path) -> None:
    result = run_cli(
        ["dev", "--port", str(free_port())], dev_env(tmp_path, "x:", redis_url="redis://127.0.0.1:1/0"), timeout=60
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("darkroom: Redis is not reachable at redis://127.0.0.1:1/0")
    assert "redis-server" in lines[-1]


def test_keys_are_printed_once_and_stored_as_hashes(tmp_path: Path) -> None:
    env = dev_env(tmp_path, "x:")
    assert run_cli(["migrate"], env).returncode == 0
    result = run_cli(["keys", "create", "--tenant", "shop"], env)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("dr_") and len(key) > 40
    database = (tmp_path / "darkroom.db").read_bytes()
    assert key.encode() not in database
    revoked = run_cli(["keys", "revoke", key], env)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout


def test_make_tiny_builds_a_loadable_pipeline(tmp_path: Path) -> None:
    result = run_cli(["models", "make-tiny", str(tmp_path / "tiny")], {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "tiny" / "tokenizer" / "tokenizer.json").exists()
