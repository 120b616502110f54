"""`darkroom submit`: send one job through the HTTP API, optionally wait with a progress bar and save it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from client import Client, DarkroomAPIError


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


def _wait(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=None, transient=True) as bar:
        task = bar.add_task(f"{job['id'][:8]} queued", total=job["request"]["steps"])

        def update(current: dict[str, Any]) -> None:
            progress = current.get("progress") or {}
            bar.update(
                task,
                description=f"{current['id'][:8]} {current['status']}",
                completed=progress.get("step", 0),
            )

        return client.wait(job["id"], on_update=update, interval=0.25)
