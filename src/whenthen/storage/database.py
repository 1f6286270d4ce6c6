"""Engine creation and the unit of work.

Only edges (HTTP handlers, CLI commands, worker tasks) open transactions: ``db.write()``
for a unit of work that changes data, ``db.read()`` for a consistent read. Services take
the open ``Connection`` and never commit.

SQLite allows one writer at a time. Write transactions start with ``BEGIN IMMEDIATE`` so
two writers never deadlock on a lock upgrade, and a process-wide lock queues writers of
this process before they reach SQLite's busy handler.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, event


class Dialect(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode("utf-8")


def _normalise_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Database:
    """Owns the engine; hands out transactions."""

    def __init__(self, url: str, *, pool_size: int = 10, sqlite_synchronous: str = "FULL") -> None:
        self.url = _normalise_url(url)
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
            kwargs["pool_pre_ping"] = True
        else:
            raise ValueError(f"unsupported database url scheme: {self.url.split(':', 1)[0]}")
        self.engine: Engine = create_engine(self.url, **kwargs)
        self._write_lock = threading.Lock() if self.dialect is Dialect.SQLITE else None
        if self.dialect is Dialect.SQLITE:
            _configure_sqlite(self.engine, sqlite_synchronous)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One unit of work that commits on success and rolls back on error."""
        if self._write_lock is not None:
            with self._write_lock, self.engine.connect() as conn:
                conn.execution_options(whenthen_write=True)
                with conn.begin():
                    yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot on both dialects)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
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
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("whenthen_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
