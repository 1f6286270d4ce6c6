"""PostgreSQL connections: pooled connections are checked after they sat idle (not at
every checkout), and ``Database.autocommit`` commits each statement by itself."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc, text

from whenthen.storage import Database, database


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _backend_pid(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(_dsn(url), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # Wait until the backend is gone, so the pooled connection is truly dead.
        for _ in range(100):
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            if row == (0,):
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} did not end")


def _counting_pings(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    answers: list[bool] = []
    real = database.ping

    def counted(engine: Any, dbapi_conn: Any) -> bool:
        answer = real(engine, dbapi_conn)
        answers.append(answer)
        return answer

    monkeypatch.setattr(database, "ping", counted)
    return answers


@contextmanager
def _one_connection_pool(
    url: str, monkeypatch: pytest.MonkeyPatch, idle_ping_seconds: float
) -> Iterator[Database]:
    """A ``Database`` whose pool holds one connection, pinged after ``idle_ping_seconds``."""
    monkeypatch.setattr(database, "IDLE_PING_SECONDS", idle_ping_seconds)
    db = Database(url, pool_size=1)
    try:
        yield db
    finally:
        db.dispose()


def test_an_idle_connection_the_server_closed_is_replaced_before_use(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _counting_pings(monkeypatch)
    with _one_connection_pool(pg_url, monkeypatch, 0.05) as db:
        first = _backend_pid(db)
        _terminate(pg_url, first)
        time.sleep(0.1)
        with db.write() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert pings == [False]  # the dead one was found out, and a new one used
        assert _backend_pid(db) != first


def test_a_connection_back_in_the_pool_a_moment_ago_is_not_pinged(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _counting_pings(monkeypatch)
    with _one_connection_pool(pg_url, monkeypatch, 60.0) as db:
        pids = {_backend_pid(db) for _ in range(20)}
        assert len(pids) == 1  # one pooled connection, reused
        assert pings == []


def test_an_idle_connection_that_still_answers_is_pinged_once_and_kept(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _counting_pings(monkeypatch)
    with _one_connection_pool(pg_url, monkeypatch, 0.05) as db:
        first = _backend_pid(db)
        time.sleep(0.1)
        assert _backend_pid(db) == first
        assert pings == [True]
        with db.read() as conn:  # the ping left no transaction open: this one reads fine
            assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_a_connection_closed_by_the_server_between_two_quick_uses_fails_one_unit_of_work(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented cost of pinging only idle connections: the unit of work that meets
    the dead connection fails (as any in flight at a restart would); the pool then opens
    a new one."""
    with _one_connection_pool(pg_url, monkeypatch, 60.0) as db:
        first = _backend_pid(db)
        _terminate(pg_url, first)
        with pytest.raises(exc.OperationalError) as failure, db.read() as conn:
            conn.execute(text("SELECT 1"))
        assert failure.value.connection_invalidated
        assert _backend_pid(db) != first


def test_autocommit_commits_each_statement_by_itself(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        with db.write() as conn:
            conn.execute(text("CREATE TABLE t_autocommit (n int)"))
        with psycopg.connect(_dsn(pg_url), autocommit=True) as other, db.autocommit() as conn:
            conn.execute(text("INSERT INTO t_autocommit VALUES (1)"))
            # Seen by another session before the block ends: no transaction holds it.
            row = other.execute("SELECT count(*) FROM t_autocommit").fetchone()
            assert row == (1,)
            with pytest.raises(exc.DataError):  # a failed statement leaves the connection usable
                conn.execute(text("INSERT INTO t_autocommit VALUES (1 / 0)"))
            conn.execute(text("INSERT INTO t_autocommit VALUES (2)"))
        with db.read() as conn:
            assert conn.execute(text("SELECT count(*) FROM t_autocommit")).scalar_one() == 2
        with db.write() as conn:  # the pooled connection is back in transaction mode
            assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]
            conn.execute(text("INSERT INTO t_autocommit VALUES (3)"))
    finally:
        with db.write() as conn:
            conn.execute(text("DROP TABLE IF EXISTS t_autocommit"))
        db.dispose()
