"""`darkroom submit`: send one job through the HTTP API, optionally wait with a progress bar and save it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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


def submit(args: argparse.Namespace) -> None:
    """Submit (with an idempotency key, so the client's retries never make a second job), optionally wait."""
    url = args.url or os.environ.get("DARKROOM_API_URL", "http://127.0.0.1:8000")
    fields = {
        k: getattr(args, k)
        for k in (
            "model",
            "negative_prompt",
            "width",
            "height",
            "steps",
            "guidance_scale",
            "seed",
            "num_images",
        )
    }
    with Client(url, _api_key(args.api_key)) as client:
        try:
            job = client.submit(args.prompt, **fields)
            if args.wait:
                job = _wait(client, job)
        except DarkroomAPIError as exc:
            sys.exit(f"error: {exc}")
        if args.wait and args.out and job["status"] == "succeeded":
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for index, output in enumerate(job["outputs"]):
                path = out / f"{job['id']}-{index}.png"
                path.write_bytes(client.download(output["url"]))
                print(path, file=sys.stderr)
    print(json.dumps(job, indent=2))
    if args.wait and job["status"] != "succeeded":
        sys.exit(1)


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
