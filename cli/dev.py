"""`darkroom dev` (what `make run` starts): migrate, make a dev API key, run the API and one worker."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import redis

from shared.settings import get_settings


def _check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.RedisError:
        sys.exit(
            f"darkroom: Redis is not reachable at {url}. Start it with `redis-server --daemonize yes` "
            "(or set DARKROOM_REDIS_URL)."
        )


def _dev_key() -> str:
    """The dev key lives in data/dev-api-key; only its hash is in the database."""
    from shared.db import session_scope
    from shared.tenants import authenticate, create_key

    settings = get_settings()
    path = settings.data_dir / "dev-api-key"
    with session_scope() as session:
        if path.exists() and authenticate(session, path.read_text().strip()):
            return path.read_text().strip()
        key = create_key(session, "dev")
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def run_dev(host: str, port: int) -> None:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _check_redis(settings.redis_url)
    from shared.migrate import upgrade

    logging.getLogger("alembic").setLevel(logging.WARNING)
    upgrade()
    key = _dev_key()
    url = f"http://{host}:{port}"
    env = {
        **os.environ,
        "DARKROOM_PUBLIC_URL": os.environ.get("DARKROOM_PUBLIC_URL", url),
        # A person reads these logs in the terminal; deployments keep the JSON default.
        "DARKROOM_LOG_FORMAT": os.environ.get("DARKROOM_LOG_FORMAT", "text"),
    }
    exe = [sys.executable, "-m", "cli"]
    procs = [
        subprocess.Popen([*exe, "api", "--host", host, "--port", str(port), "--log-level", "warning"], env=env),
        subprocess.Popen([*exe, "worker", "--log-level", "warning"], env=env),
    ]
    try:
        _wait_ready(url, procs)
        print(
            f"\ndarkroom is running at {url}  (API docs: {url}/docs)\n"
            f"dev API key: {key}   (kept in {settings.data_dir / 'dev-api-key'})\n\n"
            "Submit a job:\n"
            f"  curl -s {url}/v1/jobs -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
            '       -d \'{"prompt": "a lighthouse at dusk", "seed": 42}\'\n'
            "Poll it (put the returned id in place of JOB_ID):\n"
            f"  curl -s {url}/v1/jobs/JOB_ID -H 'Authorization: Bearer {key}'\n\n"
            "Ctrl-C stops both processes.\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("darkroom: a process exited during start-up; see its output above")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"darkroom: the API at {url} did not become ready within 60 s")
