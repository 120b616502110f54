"""The sidecar: one process beside the generating one for the database work of its calls (each call's
progress writes, the claim of the next batch), reached through a pipe from the generating thread itself.

On a thread of the generating process, that work held the GIL in many short pieces while the call ran:
a pipeline call is thousands of short kernel launches from Python (all of it, for a small model), and
each launch waited for the GIL behind the claim's SQLAlchemy. `strace` of the generating thread in
bench.e2e showed the last step's progress write and the claim taking turns with the call for 15 ms. In
a process of its own, that Python runs beside the call instead of between its launches.

A bare pipe rather than a ProcessPoolExecutor: the executor keeps two threads in the calling process (a
manager and a queue feeder) that take the GIL for every task, the very cost being removed. Here the
generating thread pickles a call onto the pipe and goes on; replies are read when it asks for one.

Calls must be picklable (module-level functions and their arguments) and must not need torch: the
sidecar loads no pipeline code (worker/claims.py, worker/progress.py). With no helper processes
(`DARKROOM_ENCODE_PROCESSES=0`), or when the sidecar dies, calls run on a thread of the worker instead,
as they did before; a call the sidecar took but never answered runs again in the worker (a progress
write is harmless twice; a claim lost with it is taken back when its lease expires).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Protocol

from worker import status, store

log = logging.getLogger("darkroom.worker")


class SidecarGone(Exception):
    """The sidecar process ended with calls unanswered."""


class Later(Protocol):
    """What `submit` returns, on the sidecar or on a thread: a Future's `done()`, `result()` and `cancel()`."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...

    def cancel(self) -> bool: ...


class Pending:
    """A call sent to the sidecar: `done()` without waiting, `result()` waiting (as a Future's)."""

    def __init__(self, sidecar: Sidecar, ticket: int, fn: Callable[..., Any], args: tuple[Any, ...]):
        self._sidecar, self._ticket, self._fn, self._args = sidecar, ticket, fn, args

    def done(self) -> bool:
        try:
            return self._sidecar.answered(self._ticket, wait=False)
        except SidecarGone:
            return True  # result() runs it here

    def result(self) -> Any:
        try:
            self._sidecar.answered(self._ticket, wait=True)
        except SidecarGone:
            log.warning("the sidecar process ended; %s runs in the worker", getattr(self._fn, "__name__", "a call"))
            return self._fn(*self._args)
        ok, value = self._sidecar.take(self._ticket)
        if not ok:
            raise value
        return value

    def cancel(self) -> bool:
        """Nobody will ask for the result: the call still runs there, but its reply is not kept."""
        self._sidecar.forget(self._ticket)
        return False  # as a Future already running: it was sent


class Sidecar:
    """The sidecar process and its pipe. Used from one thread only (the generating one)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # torch's threads are started: see worker/store.py
        self._conn, child = context.Pipe()
        parent = (os.getpid(), status.worker_id())
        self.process = context.Process(target=_serve, args=(child, *parent), name="darkroom-sidecar", daemon=True)
        self.process.start()
        child.close()  # so that the sidecar's end closing reads as EOF here
        self.pid = os.getpid()
        self._next = 0
        self._replies: dict[int, tuple[bool, Any]] = {}
        self._forgotten: set[int] = set()  # tickets whose replies are thrown away when they come
        self.gone = False

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Pending:
        ticket, self._next = self._next, self._next + 1
        try:
            self._conn.send((ticket, fn, args))
        except OSError:
            self.gone = True
        except BaseException:
            self._abandon()  # cut off mid-message (a time limit's exception): the stream is no longer whole
            raise
        return Pending(self, ticket, fn, args)

    def answered(self, ticket: int, *, wait: bool) -> bool:
        """Whether the call `ticket` has its reply, reading what has arrived (and waiting for it, if `wait`).
        Raises SidecarGone if it never will."""
        while ticket not in self._replies:
            if self.gone:
                raise SidecarGone
            try:
                if not self._conn.poll(None if wait else 0):
                    return False
            except OSError:
                self.gone = True
                continue
            try:
                answer, ok, value = self._conn.recv()
            except (EOFError, OSError):
                self.gone = True
                continue
            except BaseException:
                self._abandon()  # cut off mid-message: the rest of it would be read as the next reply
                raise
            if answer in self._forgotten:
                self._forgotten.discard(answer)
            else:
                self._replies[answer] = (ok, value)
        return True

    def _abandon(self) -> None:
        """Give up on this sidecar: closing our end ends it, and the next `get()` starts another."""
        self.gone = True
        self._conn.close()

    def take(self, ticket: int) -> tuple[bool, Any]:
        return self._replies.pop(ticket)

    def forget(self, ticket: int) -> None:
        if self._replies.pop(ticket, None) is None:
            self._forgotten.add(ticket)

    @property
    def unread(self) -> int:
        """Replies kept for calls nobody has asked about yet."""
        return len(self._replies)

    def close(self, timeout: float = 5) -> None:
        if not self._conn.closed:
            self._conn.close()
        self.process.join(timeout=timeout)


_sidecar: Sidecar | None = None


def get() -> Sidecar | None:
    """This process's sidecar, started if need be; None without helper processes."""
    global _sidecar
    if store.processes() == 0:  # the same switch as the encoders': no helper processes at all
        return None
    if _sidecar is not None and _sidecar.gone and _sidecar.pid == os.getpid():
        _sidecar.close(timeout=1)
    if _sidecar is None or _sidecar.gone or _sidecar.pid != os.getpid():
        _sidecar = Sidecar()
    return _sidecar


def start() -> None:
    """Start the sidecar now (it imports SQLAlchemy and the models for about a second), not on first use."""
    get()


def shutdown() -> None:
    global _sidecar
    if _sidecar is not None and _sidecar.pid == os.getpid():
        _sidecar.close()
    _sidecar = None


@contextlib.contextmanager
def beside() -> Iterator[Executor | Sidecar]:
    """Where a run of batches sends the work beside its calls: the sidecar, or else a thread of its own."""
    sidecar = get()
    if sidecar is not None:
        yield sidecar
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="beside") as thread:
        yield thread


def _serve(conn: Connection, parent: int, worker: str) -> None:
    """In the sidecar: run each call received, in order, and send back (ticket, ok, result or exception)."""
    store.start_helper(parent, worker)  # logging as the worker's, and exit with it
    while True:
        try:
            ticket, fn, args = conn.recv()
        except (EOFError, OSError):
            return  # the worker closed its end, or is gone
        try:
            reply: tuple[int, bool, Any] = (ticket, True, fn(*args))
        except Exception as exc:
            reply = (ticket, False, exc)
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # An exception (or result) that does not pickle still has to say what went wrong.
            conn.send((ticket, False, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]}; unpicklable: {exc}")))
