"""bench/gpu-host.sh, the one command a lent GPU host runs (docs/gpu-bench.md), on shrunk models on this CPU:
a device session has minutes, and a script that breaks there spends them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def run_host_script(
    tmp_path: Path, redis_server: str, args: list[str], timeout: int
) -> subprocess.CompletedProcess[str]:
    """bench/gpu-host.sh as a device run calls it, with nothing to install: this interpreter has every package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")} | {
        "CARRY": str(tmp_path / "no-carry"),
        "PYTHON": sys.executable,
        "REDIS_SERVER": redis_server,
        "OUT": str(tmp_path / "out"),
        "WORKDIR": str(tmp_path / "work"),
    }
    return subprocess.run(
        ["bash", "bench/gpu-host.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_host_script_leaves_figures_and_logs_under_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is needed: the GPU host runs its own, as this does"
    args = ["--device", "cpu", "--tiny", "--arch", "sd15", "--jobs", "8", "--idle", "2", "--direct-images", "2"]
    done = run_host_script(tmp_path, redis_server, args, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    figures = json.loads((out / "bench.log").read_text().splitlines()[-1])
    assert figures["device"] == "cpu"
    assert figures["sd15_service_img_per_s"] > 0
    assert figures["sd15_direct_img_per_s"] > 0
    assert figures["sd15_direct_batch_img_per_s"] > 0  # plain diffusers at the service's batch size
    host = (out / "host.txt").read_text()
    assert f"{torch.__version__} {diffusers.__version__}" in host
    # The worker's log is what tells a slow call from a slow service around it. How the burst's 8 jobs
    # split into calls depends on when they arrive, so any size of call will do.
    assert re.search(r"call of \d+ images \(padded to \d+\) took \d+ ms", (out / "sd15-worker.log").read_text())
    assert (out / "sd15-api.log").exists()
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "host.txt", "sd15-api.log", "sd15-worker.log"]


def test_host_script_fails_when_the_benchmark_does(tmp_path: Path) -> None:
    """A run that breaks must say so to the device tool (its exit status), not hide behind `tee`."""
    missing = str(tmp_path / "no-such-redis-server")
    done = run_host_script(tmp_path, missing, ["--device", "cpu", "--tiny", "--arch", "sd15"], timeout=120)
    assert done.returncode != 0
    assert "no-such-redis-server" in (tmp_path / "out" / "bench.log").read_text()
