"""Engine creation and the unit of work.

Only edges (HTTP handlers, CLI commands, worker tasks) open transactions: ``db.write()``
for a unit of work that changes data, ``db.read()`` for a consistent read. Services take
the open ``Connection`` and never commit.

SQLite allows one writer at a time. Write transactions start with ``BEGIN IMMEDIATE`` so
two writers never deadlock on a lock upgrade, and writers queue before they reach SQLite's
busy handler: a process-wide first-come-first-served lock queues the threads of this
process, and an exclusive
``flock`` on ``<database>.writer-lock`` queues the processes (several ``serve --workers``,
a separate ``worker``). SQLite's busy handler polls with sleeps of 1 to 100 ms, so two
processes that met there lost most of their time asleep; a waiter on ``flock`` wakes as the
lock is released. A writer that does not take the ``flock`` (the ``sqlite3`` shell, say)
still meets the others in the busy handler, as before
(docs/adr/0006-sqlite-writers-and-driver-level-append.md). In the long-running processes
WAL checkpoints run on a thread of their own, not inside a writer's commit (ADR 0017).
"""

from __future__ import annotations

import enum
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, exc

from whenthen.storage.checkpoint import BACKSTOP_PAGES, WalCheckpointer


class Dialect(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode("utf-8")


def _normalise_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class WriterQueue:
    """A lock that serves its waiters in the order they came (a ticket lock).

    The writers of one process (the pipeline, the outbox dispatcher, the tracking
    writer, request threads) take turns at SQLite. With a plain ``threading.Lock`` the
    thread that releases it usually takes it again before a woken waiter runs, so a
    worker looping over pipeline batches kept the dispatcher and the tracking writer
    waiting for whole passes; here each waits for the writers ahead of it only.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            try:
                while ticket != self._serving:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: give the turn up
                self._abandoned.add(ticket)
                self._advance(0)
                raise

    def __exit__(self, *_exc: object) -> None:
        with self._cond:
            self._advance(1)

    def _advance(self, by: int) -> None:
        """Called with the condition held: the next turn, past abandoned tickets."""
        self._serving += by
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def waiting(self) -> int:
        """Writers holding or waiting for the lock."""
        with self._cond:
            return self._next - self._serving


class Database:
    """Owns the engine; hands out transactions."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        sqlite_synchronous: str = "FULL",
        background_checkpoints: bool = False,
    ) -> None:
        """``background_checkpoints`` (SQLite): WAL checkpoints run on a thread of this
        object's, not in the commits of its writers (``storage.checkpoint``, ADR 0017);
        the long-running processes ask for it (``bootstrap.build``)."""
        self.url = _normalise_url(url)
        self._checkpointer: WalCheckpointer | None = None
        kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
        if self.url.startswith("sqlite"):
            self.dialect = Dialect.SQLITE
            if self.url in ("sqlite://", "sqlite:///:memory:"):
                raise ValueError("in-memory SQLite is not supported: use a file path")
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        elif self.url.startswith("postgresql"):
            self.dialect = Dialect.POSTGRESQL
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
        else:
            raise ValueError(f"unsupported database url scheme: {self.url.split(':', 1)[0]}")
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.dialect is Dialect.POSTGRESQL:
            _ping_when_idle(self.engine, IDLE_PING_SECONDS)
        self._write_lock = WriterQueue() if self.dialect is Dialect.SQLITE else None
        self._lock_fd: int | None = None
        self._lock_pid = 0
        if self.dialect is Dialect.SQLITE:
            database = os.path.abspath(self.engine.url.database or "")
            _configure_sqlite(
                self.engine,
                sqlite_synchronous,
                autocheckpoint=BACKSTOP_PAGES if background_checkpoints else None,
            )
            self._lock_path = database + ".writer-lock"
            if background_checkpoints:
                self._checkpointer = WalCheckpointer(database, synchronous=sqlite_synchronous)
                self._checkpointer.start()

    @contextmanager
    def _writer_file(self) -> Iterator[None]:
        """The processes' queue of SQLite writers (called under ``_write_lock``)."""
        if self._lock_fd is None or self._lock_pid != os.getpid():
            # Opened lazily, and again in a forked child: a descriptor inherited through
            # fork shares its flock with the parent's.
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lock_pid = os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One unit of work that commits on success and rolls back on error."""
        if self._write_lock is not None:
            with self._write_lock, self._writer_file(), self.engine.connect() as conn:
                conn.execution_options(whenthen_write=True)
                with conn.begin():
                    yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """PostgreSQL: a connection on which each statement commits on its own, for work
        whose every write is one statement (the tracking API's batch append): without a
        transaction block, psycopg sends no ``BEGIN`` and no ``COMMIT``, two of the four
        round trips such a request made. SQLite has no use for it (its writers queue and
        share transactions): there it is ``write()``."""
        if self._write_lock is not None:
            with self.write() as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot on both dialects)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        """The thread running this database's WAL checkpoints, if it has one."""
        return self._checkpointer

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = None


#: A pooled PostgreSQL connection idle for longer than this is checked before it is used.
IDLE_PING_SECONDS = 1.0


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Check a pooled connection before use when it has sat idle, as ``pool_pre_ping``
    does for every checkout: a connection the server closed (a restart, an idle timeout,
    ``pg_terminate_backend``) is then replaced before a unit of work meets it. A
    connection back in the pool for less than ``idle_seconds`` is handed out unchecked:
    under load each is reused within milliseconds, and the ping was a round trip and
    about 0.15 ms of CPU for each tracking request (docs/adr/0007). A connection that
    breaks while in use fails its unit of work, with or without a ping; SQLAlchemy then
    replaces every connection of the pool opened before the failure."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        record.info["whenthen_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("whenthen_idle_since")
        if since is None or time.monotonic() - since <= idle_seconds:
            return  # new, or back in the pool a moment ago
        if not ping(engine, dbapi_conn):
            # The pool closes this one and checks out another (a new connection).
            raise exc.DisconnectionError("the pooled connection no longer answers")


def ping(engine: Engine, dbapi_conn: Any) -> bool:
    """Whether a pooled connection still answers: the dialect's own ping (the one
    ``pool_pre_ping`` sends), which leaves the connection as it found it."""
    try:
        return bool(engine.dialect.do_ping(dbapi_conn))
    except engine.dialect.loaded_dbapi.Error:
        return False


def _configure_sqlite(engine: Engine, synchronous: str, *, autocheckpoint: int | None) -> None:
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"invalid sqlite synchronous mode: {synchronous}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if autocheckpoint is not None:
            cur.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("whenthen_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
