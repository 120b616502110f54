"""`darkroom api`: uvicorn, with a listening socket of its own for each worker process on Linux.

uvicorn's multi-process mode binds one socket in the parent and hands that same socket to every worker. They
then share one accept queue, and the kernel wakes the worker that waited last, which takes every connection
ready at the time: clients that open keep-alive connections together land on one process. In
`python -m bench.api` (2 workers, 32 connections opened at once) one API process ran at 94% of a core and
the other at 0.2%, and accepted jobs/s swung from 880 to 1,460 between runs with the machine 40% idle.

On Linux each worker here binds its own socket into one SO_REUSEPORT group instead, and the kernel spreads
new connections over the group by their addresses' hash (what uvicorn's open pull request #2472 proposes).
uvicorn's supervisor still runs the workers: health checks, restarts, SIGHUP, SIGTTIN/SIGTTOU. It starts
every worker with the sockets it was given, pickled; the socket given here pickles as its address, and
unpickles, in each worker, as a new socket bound to it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import socket
import sys
from typing import Any

log = logging.getLogger("uvicorn.error")

APP = "api.app:create_app"
STARTUP_FAILURE = 3  # uvicorn's exit status for a server that could not start


def serve(host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    # log_config None: uvicorn's loggers go through the root handler, so its lines are JSON like ours. Its
    # access log is off: api.context writes one line per request, with the request id, tenant and duration
    # besides what uvicorn's says; with both, every request was logged twice.
    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "log_level": log_level,
        "log_config": None,
        "access_log": False,
    }
    if workers <= 1 or not balances_connections() or port == 0:  # port 0: each worker would pick its own port
        uvicorn.run(APP, workers=workers, **options)
        return
    config = uvicorn.Config(APP, workers=workers, **options)
    try:
        listener = Listener(host, port)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", host, port, exc)
        sys.exit(STARTUP_FAILURE)
    log.info("darkroom API on http://%s:%d, %d worker processes, a socket each", host, port, workers)
    # uvicorn 0.46 and before: the supervisor also takes what each worker runs (0.54 builds that itself).
    target = {"target": uvicorn.Server(config).run} if "target" in inspect.signature(Multiprocess).parameters else {}
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: the workers got the Ctrl-C too
        Multiprocess(config, sockets=[listener], **target).run()


def balances_connections() -> bool:
    """Whether the kernel spreads connections over an SO_REUSEPORT group: Linux does; macOS and the BSDs
    accept the option but give every connection to one socket."""
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


class Listener(socket.socket):
    """The parent's placeholder for the workers' sockets: it holds the address (bound, never listening, so
    the kernel gives it no connections), and pickles as that address."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # A bind without SO_REUSEPORT first: it fails if anything at all listens there (SO_REUSEADDR lets it
        # past connections of an earlier run still closing, as uvicorn's own bind does).
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        _join_group(self, host, port)

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        # pickle looks up multiprocessing's socket reducer by exact type, so this subclass pickles this way.
        host, port = self.getsockname()[:2]
        return (worker_socket, (host, port))


def worker_socket(host: str, port: int) -> socket.socket:
    """A worker's own socket in the group (uvicorn's server listens on it)."""
    # IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on for accepted sockets only when their protocol says TCP.
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    _join_group(sock, host, port)
    return sock


def _join_group(sock: socket.socket, host: str, port: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
