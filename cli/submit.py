"""`darkroom submit`: send one job through the HTTP API, optionally wait with a progress bar and save it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from client import Client, DarkroomAPIError, Event, Job


def _api_key(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("DARKROOM_API_KEY"):
        return os.environ["DARKROOM_API_KEY"]
    dev_key = Path(os.environ.get("DARKROOM_DATA_DIR", "data")) / "dev-api-key"
    if dev_key.exists():
        return dev_key.read_text().strip()
    sys.exit("no API key: pass --api-key or set DARKROOM_API_KEY")


# Values of --image and --mask that are not local files: the API fetches or looks them up itself.
REMOTE_PREFIXES = ("https://", "http://", "data:", "uploads/")
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
FIELDS = (
    "model",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "num_images",
    "task",
    "strength",
    "scale",
    "noise_level",
    "pad",
    "scheduler",
    "output_format",
    "quality",
    "priority",
)


def submit(args: argparse.Namespace) -> None:
    """Submit (with an idempotency key, so the client's retries never make a second job), optionally wait."""
    url = args.url or os.environ.get("DARKROOM_API_URL", "http://127.0.0.1:8000")
    fields: dict[str, Any] = {k: getattr(args, k) for k in FIELDS}
    if args.lora:
        fields["loras"] = [_lora(spec) for spec in args.lora]
    with Client(url, _api_key(args.api_key)) as client:
        try:
            for name in ("image", "mask"):
                fields[name] = _input_image(client, name, getattr(args, name))
            job = client.submit(args.prompt, **fields)
            if args.wait:
                job = _wait(client, job)
        except DarkroomAPIError as exc:
            sys.exit(f"error: {exc}")
        if args.wait and args.out and job["status"] == "succeeded":
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for index, output in enumerate(job["outputs"]):
                path = out / f"{job['id']}-{index}.{EXTENSIONS.get(output['content_type'], 'bin')}"
                path.write_bytes(client.download(output["url"]))
                print(path, file=sys.stderr)
    print(json.dumps(job, indent=2))
    if args.wait and job["status"] != "succeeded":
        sys.exit(1)


def _lora(spec: str) -> dict[str, Any]:
    """`NAME` or `NAME:SCALE` as a job's LoRA reference."""
    name, _, scale = spec.partition(":")
    if not scale:
        return {"name": name}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        sys.exit(f"error: --lora {spec}: the scale after ':' must be a number")


def _input_image(client: Client, option: str, value: str | None) -> str | None:
    """A URL, data URI or uploads key as given; a local file uploaded first, as its uploads key."""
    if value is None or value.startswith(REMOTE_PREFIXES):
        return value
    path = Path(value)
    if not path.is_file():
        sys.exit(f"error: --{option} {value}: no such file (or give an https:// URL or an uploads key)")
    return client.upload(path)["key"]


def _wait(client: Client, job: Job) -> Job:
    """Wait on the job's live events (SSE, or polls if unavailable), drawing a progress bar from them."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    short = job["id"][:8]
    with Progress(*columns, console=None, transient=True) as bar:
        task = bar.add_task(f"{short} queued", total=job["request"]["steps"])

        def show(event: Event) -> None:
            if event.type == "queued":
                position = event.data.get("queue_position")
                where = f" ({position} ahead)" if position else ""
                bar.update(task, description=f"{short} queued{where}", completed=0)
            elif event.type == "started":
                bar.update(task, description=f"{short} running", completed=0)
            elif event.type == "progress":
                bar.update(
                    task, description=f"{short} running", completed=event.data["step"], total=event.data["total"]
                )
            else:
                bar.update(task, description=f"{short} {event.type}")

        return client.wait(job["id"], on_event=show)
