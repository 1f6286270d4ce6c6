"""SQLite WAL checkpoints on a thread of their own (storage.checkpoint, ADR 0017): the
writers' commits no longer copy the log into the database file; the thread does, soon
after; the log stays bounded; the thread stops with the database."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from sqlalchemy import text

from tests.support.processes import eventually
from whenthen.storage import Database
from whenthen.storage.checkpoint import BACKSTOP_PAGES, WalCheckpointer

ROWS = 3_000  # ~3,000 pages of 4 KiB: three times SQLite's default checkpoint threshold
BLOB = "x" * 3_000


def _fill(db: Database, first: int = 0) -> None:
    with db.write() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS pad (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"))
        conn.execute(
            text("INSERT INTO pad (id, body) VALUES (:id, :body)"),
            [{"id": first + i, "body": BLOB} for i in range(ROWS)],
        )


def _autocheckpoint(db: Database) -> int:
    with db.read() as conn:
        return int(conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())


def test_by_default_a_writer_checkpoints_in_its_commit(tmp_path: Path) -> None:
    path = tmp_path / "plain.db"
    db = Database(f"sqlite:///{path}")
    try:
        assert db.checkpointer is None
        assert _autocheckpoint(db) == 1000
        _fill(db)
        # The commit that took the log past 1,000 pages copied it into the file.
        assert path.stat().st_size > ROWS * 3_000
    finally:
        db.dispose()


def test_with_a_checkpointer_the_thread_copies_the_log_and_stops_with_the_database(tmp_path: Path) -> None:
    path = tmp_path / "background.db"
    db = Database(f"sqlite:///{path}", background_checkpoints=True)
    checkpointer = db.checkpointer
    assert checkpointer is not None
    try:
        assert checkpointer.alive
        assert _autocheckpoint(db) == BACKSTOP_PAGES
        _fill(db)
        eventually(lambda: path.stat().st_size > ROWS * 3_000)

        def copied_all() -> bool:
            last = checkpointer.last
            return last is not None and last[1] >= ROWS and last[1] == last[2]

        eventually(copied_all)
        _fill(db, first=ROWS)
        eventually(lambda: path.stat().st_size > 2 * ROWS * 3_000)
        # The log restarts from its beginning once copied: it does not hold both fills.
        assert os.path.getsize(f"{path}-wal") < 2 * ROWS * 4_096
        with db.read() as conn:
            assert conn.execute(text("SELECT count(*) FROM pad")).scalar_one() == 2 * ROWS
    finally:
        db.dispose()
    assert not checkpointer.alive


def test_the_writers_commits_leave_the_copy_to_the_thread(tmp_path: Path) -> None:
    """The thread held at its first pass (an interval longer than the test): the commit
    left the pages in the log, and the file gets them when the thread runs."""
    path = tmp_path / "held.db"
    db = Database(f"sqlite:///{path}", background_checkpoints=True)
    assert db.checkpointer is not None
    db.checkpointer.stop()  # the database's own, so the test drives one it controls
    try:
        _fill(db)
        size = path.stat().st_size
        assert size < ROWS * 3_000
        checkpointer = WalCheckpointer(str(path), synchronous="FULL", interval=0.01)
        checkpointer.start()
        try:
            eventually(lambda: path.stat().st_size > ROWS * 3_000)
            eventually(lambda: checkpointer.checkpoints >= 1)
        finally:
            checkpointer.stop()
    finally:
        db.dispose()


def test_a_checkpointer_waits_for_its_database_file_and_never_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "later.db"
    checkpointer = WalCheckpointer(str(path), synchronous="NORMAL", interval=0.01)
    checkpointer.start()
    try:
        time.sleep(0.1)
        assert not path.exists()
        assert checkpointer.alive
        assert checkpointer.checkpoints == 0
        db = Database(f"sqlite:///{path}")
        try:
            _fill(db)
        finally:
            db.dispose()
        eventually(lambda: checkpointer.checkpoints > 0)
    finally:
        checkpointer.stop()


def test_several_checkpointers_on_one_database_while_it_is_written(tmp_path: Path) -> None:
    """As several processes on one file: each its own checkpointer, writers from both."""
    path = tmp_path / "shared.db"
    first = Database(f"sqlite:///{path}", background_checkpoints=True)
    second = Database(f"sqlite:///{path}", background_checkpoints=True)
    errors: list[BaseException] = []

    def write(db: Database, base: int) -> None:
        try:
            for round_ in range(5):
                _fill(db, first=base + round_ * ROWS)
        except Exception as error:  # reported by the assertion below
            errors.append(error)

    try:
        threads = [
            threading.Thread(target=write, args=(first, 0)),
            threading.Thread(target=write, args=(second, 1_000_000)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        eventually(lambda: path.stat().st_size > 10 * ROWS * 3_000)
        assert first.checkpointer is not None
        assert second.checkpointer is not None
        assert first.checkpointer.checkpoints > 0
        assert second.checkpointer.checkpoints > 0
        check = sqlite3.connect(path)
        try:
            assert check.execute("SELECT count(*) FROM pad").fetchone() == (10 * ROWS,)
            assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            check.close()
    finally:
        first.dispose()
        second.dispose()
