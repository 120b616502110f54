"""The database engine and the unit of work: one transaction per request or task, committed at the end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from shared.settings import get_settings

log = logging.getLogger("darkroom.db")
T = TypeVar("T")


class Base(DeclarativeBase):
    pass


def make_engine(url: str, *, connect_timeout: int = 3, pool_timeout: float = 3.0, pool_size: int = 20) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while a worker writes; the busy timeout turns lock contention
            # between processes into a short wait instead of "database is locked".
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # Short connect and pool timeouts: while the database is down a request must get its 503 in seconds,
    # not hang.
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=10,
        pool_timeout=pool_timeout,
        connect_args={"connect_timeout": connect_timeout},
    )
    _ping_when_idle(engine)
    return engine


# A connection that answered this recently is not pinged before its next use: under load that ping was one
# round trip in every four of a request. One idle longer (across a database restart, say) is pinged first.
PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's pool_pre_ping, for connections idle more than PING_AFTER_IDLE_S.

    A connection that died within that second fails its request (a 503) and, being a disconnect, makes the
    pool drop every connection it had opened until then, so the next requests reconnect.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("checked_in", 0.0) < PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception:
            alive = False
        if not alive:
            # The pool discards this connection and checks out another (a new one if need be).
            raise DisconnectionError("connection found dead before use")


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(
        settings.database_url,
        connect_timeout=settings.db_connect_timeout,
        pool_timeout=settings.db_pool_timeout,
        pool_size=settings.db_pool_size,
    )


@lru_cache
def _sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """Commit on success, roll back on error. Code below this flushes; it never commits."""
    session = _sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def read_scope() -> Iterator[Session]:
    """A session for one read statement, on an autocommit connection: no BEGIN and COMMIT round trips.

    For hot single-statement reads (the API key of every request); anything that writes, or needs two reads
    to agree with each other, uses `session_scope`.
    """
    with get_engine().connect() as conn, Session(bind=conn.execution_options(isolation_level="AUTOCOMMIT")) as s:
        yield s


DB_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def retry_unit_of_work(work: Callable[[Session], T], *, seconds: float, what: str) -> T:
    """Run `work` in its own unit of work, retrying through a database outage for up to `seconds`.

    For writes that must not be lost when the database blinks (a worker's finished job): the work has to be
    idempotent, which the state machine's conditional UPDATEs are.
    """
    deadline = time.monotonic() + seconds
    delay = 0.2
    while True:
        try:
            with session_scope() as session:
                return work(session)
        except DB_UNAVAILABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable during %s (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
            # Capped low: once the database is back, the write should land well within a lease period.
            delay = min(delay * 2, 1.0)


def reset_connections() -> None:
    """Forget the engine after a fork; the child opens its own connections."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    _sessionmaker.cache_clear()
