"""`darkroom`: run the API, a worker, migrations, key management, and a thin client of the HTTP API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _api(args: argparse.Namespace) -> None:
    from cli.serve import serve

    serve(args.host, args.port, args.workers, args.log_level)


def _worker(args: argparse.Namespace) -> None:
    from shared.broker import queue_for_model
    from shared.registry import get_registry
    from shared.webhooks import QUEUE as WEBHOOKS_QUEUE

    queues = args.queues or ",".join([*(queue_for_model(name) for name in get_registry().names), WEBHOOKS_QUEUE])
    from worker.app import app

    # A webhooks-only worker waits on the network, not a GPU: threads, several at once.
    webhooks_only = set(queues.split(",")) == {WEBHOOKS_QUEUE}
    concurrency = args.concurrency or (8 if webhooks_only else 1)
    argv = [
        "worker",
        "-Q",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        "threads" if webhooks_only else "prefork",
        "--loglevel",
        args.log_level.upper(),
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)


def _migrate(args: argparse.Namespace) -> None:
    from shared.migrate import downgrade, upgrade

    (downgrade if args.downgrade else upgrade)(revision=args.revision)


def _keys_create(args: argparse.Namespace) -> None:
    from shared.db import session_scope
    from shared.tenants import create_key

    with session_scope() as session:
        key = create_key(session, args.tenant, admin=args.admin)
    print(key)
    role = "admin tenant" if args.admin else "tenant"
    print(f"API key for {role} {args.tenant!r}; it is shown only once.", file=sys.stderr)


def _keys_revoke(args: argparse.Namespace) -> None:
    from shared.db import session_scope
    from shared.tenants import revoke_key

    with session_scope() as session:
        revoked = revoke_key(session, args.key)
    print("revoked" if revoked else "no such live key")
    if not revoked:
        sys.exit(1)


def _make_tiny(args: argparse.Namespace) -> None:
    from worker.tiny import make_tiny

    print(make_tiny(Path(args.dir)))


def _models_list(_: argparse.Namespace) -> None:
    from shared.registry import get_registry

    for spec in get_registry().models.values():
        print(f"{spec.name}\t{spec.family}\t{spec.source}")


def _submit(args: argparse.Namespace) -> None:
    from cli.submit import submit

    submit(args)


def _dev(args: argparse.Namespace) -> None:
    from cli.dev import run_dev

    run_dev(host=args.host, port=args.port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="darkroom", description="Stable Diffusion job-queue service.")
    sub = p.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="API processes")
    api.add_argument("--log-level", default="info")
    api.set_defaults(func=_api)

    worker = sub.add_parser("worker", help="run a GPU worker")
    worker.add_argument(
        "--queues",
        help="comma-separated queues (default: every model in the registry, plus `webhooks`); "
        "`--queues webhooks` runs a GPU-free webhook sender on threads",
    )
    worker.add_argument(
        "--concurrency", type=int, default=None, help="jobs at once; one per GPU (default 1, or 8 for webhooks only)"
    )
    worker.add_argument("--hostname", help="Celery node name")
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=_worker)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to REVISION (default base)")
    migrate.set_defaults(func=_migrate)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key for a tenant (created if new); prints it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--admin", action="store_true", help="make the tenant an admin (operator routes /v1/admin)")
    create.set_defaults(func=_keys_create)
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key")
    revoke.set_defaults(func=_keys_revoke)

    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True)
    tiny = models.add_parser("make-tiny", help="build the tiny random test pipeline into DIR")
    tiny.add_argument("dir")
    tiny.set_defaults(func=_make_tiny)
    models.add_parser("list", help="list registry models").set_defaults(func=_models_list)

    submit = sub.add_parser("submit", help="submit a job over HTTP (a thin client of the API)")
    submit.add_argument("prompt")
    submit.add_argument("--model")
    submit.add_argument("--negative-prompt")
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--steps", type=int)
    submit.add_argument("--guidance-scale", type=float)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--num-images", type=int)
    submit.add_argument("--task", choices=["txt2img", "img2img", "inpaint", "upscale"])
    submit.add_argument("--image", help="input image: a local file (uploaded first), an https:// URL or an uploads key")
    submit.add_argument("--mask", help="inpaint mask, as --image")
    submit.add_argument("--strength", type=float)
    submit.add_argument("--scale", type=int, help="upscale: 2 or 4")
    submit.add_argument("--noise-level", type=int)
    submit.add_argument("--pad", type=int, help="inpaint: pixels added on every side (outpainting)")
    submit.add_argument("--scheduler", help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, unipc or lcm")
    submit.add_argument(
        "--lora", action="append", metavar="NAME[:SCALE]", help="a LoRA named in GET /v1/models; repeatable"
    )
    submit.add_argument("--output-format", choices=["png", "jpeg", "webp"])
    submit.add_argument("--quality", type=int, help="jpeg/webp quality, 1-100")
    submit.add_argument("--priority", choices=["low", "normal", "high"])
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish, with a progress bar")
    submit.add_argument("--out", help="with --wait: save the images into this directory")
    submit.add_argument("--url", default=None, help="API URL (default $DARKROOM_API_URL or http://127.0.0.1:8000)")
    submit.add_argument("--api-key", default=None, help="API key (default $DARKROOM_API_KEY or data/dev-api-key)")
    submit.set_defaults(func=_submit)

    dev = sub.add_parser("dev", help="migrate, then run the API and one worker in the foreground (make run)")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(func=_dev)
    return p


def main(argv: list[str] | None = None) -> None:
    from shared.logs import configure

    configure(os.environ.get("DARKROOM_LOG_FORMAT", "json"))
    for noisy in ("httpx", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    args.func(args)
