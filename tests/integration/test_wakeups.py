"""Wake-ups between processes, on both databases: two ``Wakeups`` on one database stand
for two processes (each opens its own sockets or connections, as a process would)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from whenthen.storage import Database
from whenthen.worker import wakeups
from whenthen.worker.wakeups import SocketWakeups, Topic


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.rung = threading.Event()

    def __call__(self) -> None:
        self.n += 1
        self.rung.set()


def until(probe: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def pair(db: Database) -> Iterator[tuple[wakeups.Wakeups, wakeups.Wakeups]]:
    a, b = wakeups.for_database(db), wakeups.for_database(db)
    yield a, b
    a.close()
    b.close()


def _listening(w: wakeups.Wakeups, ringer: wakeups.Wakeups, topic: Topic, heard: Counter) -> None:
    """Wait until ``w`` hears ``topic`` (LISTEN takes effect a moment after the call)."""
    w.listen(topic, heard)

    def rung() -> bool:
        ringer.ring(topic)
        return heard.rung.wait(0.2)

    assert until(rung)
    time.sleep(0.3)
    heard.n = 0
    heard.rung.clear()


def test_a_ring_reaches_the_listeners_of_its_topic_only(
    pair: tuple[wakeups.Wakeups, wakeups.Wakeups],
) -> None:
    listener, ringer = pair
    events, outbox = Counter(), Counter()
    _listening(listener, ringer, Topic.EVENTS, events)
    ringer.ring(Topic.OUTBOX)
    time.sleep(0.3)
    assert events.n == 0
    _listening(listener, ringer, Topic.OUTBOX, outbox)
    ringer.ring(Topic.EVENTS)
    assert events.rung.wait(10)
    assert events.n == 1
    assert outbox.n == 0


def test_rings_in_quick_succession_wake_at_least_once_and_at_most_each(
    pair: tuple[wakeups.Wakeups, wakeups.Wakeups],
) -> None:
    listener, ringer = pair
    heard = Counter()
    _listening(listener, ringer, Topic.EVENTS, heard)
    for _ in range(200):
        ringer.ring(Topic.EVENTS)
    assert heard.rung.wait(10)
    time.sleep(0.3)
    assert 1 <= heard.n <= 200  # merged while the ringer was busy: fewer wake-ups, never none


def test_ringing_with_nobody_listening_and_after_close_is_harmless(db: Database) -> None:
    w = wakeups.for_database(db)
    w.ring(Topic.EVENTS)
    w.ring(Topic.OUTBOX)
    time.sleep(0.2)
    w.close()
    w.ring(Topic.EVENTS)  # after close: ignored


def test_sqlite_sockets_are_private_removed_on_close_and_stale_ones_cleaned(tmp_path: Path) -> None:
    folder = wakeups.socket_folder(str(tmp_path / "whenthen.db"))
    threads = threading.active_count()
    listener, ringer = SocketWakeups(folder), SocketWakeups(folder)
    try:
        # Nobody else listens (the single process of the embedded default): no datagram,
        # not even the ringing thread.
        ringer.ring(Topic.EVENTS)
        assert threading.active_count() == threads
        heard = Counter()
        listener.listen(Topic.EVENTS, heard)
        assert folder.stat().st_mode & 0o777 == 0o700
        mine = sorted(p.name for p in folder.iterdir())
        assert len(mine) == 1
        assert mine[0].startswith("events-")
        # A process that died without cleaning up left its socket behind.
        stale = folder / "events-999999999-0.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dead.bind(str(stale))
        dead.close()
        time.sleep(wakeups.RELIST_SECONDS)  # the ringer looks at the folder again
        ringer.ring(Topic.EVENTS)
        assert heard.rung.wait(10)
        assert until(lambda: not stale.exists())
        # The folder stays while another process's socket is in it.
        other = SocketWakeups(folder)
        other.listen(Topic.OUTBOX, Counter())
        listener.close()
        [left] = [p.name for p in folder.iterdir()]
        assert left.startswith("outbox-")
        other.close()
    finally:
        listener.close()
        ringer.close()
    # Gone with the last socket.
    assert not folder.exists()
    # And made again by the next listener.
    again = SocketWakeups(folder)
    try:
        again.listen(Topic.OUTBOX, Counter())
        assert folder.exists()
    finally:
        again.close()
    assert not folder.exists()


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


def test_postgres_listeners_give_their_connections_back_on_close(pg_db: Database) -> None:
    db = pg_db

    def listening() -> int:
        with db.read() as conn:
            rows = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query LIKE 'LISTEN%%'"
            ).scalar_one()
        return int(rows)

    w, ringer = wakeups.for_database(db), wakeups.for_database(db)
    heard = Counter()
    _listening(w, ringer, Topic.EVENTS, heard)
    assert listening() == 1
    w.close()
    ringer.close()
    assert until(lambda: listening() == 0)


def test_a_postgres_listener_whose_connection_is_killed_listens_again(pg_db: Database) -> None:
    """The server ends the listening session (a restart, an idle timeout, an operator):
    the listener reconnects on its own and hears the next rings."""
    db = pg_db
    w, ringer = wakeups.for_database(db), wakeups.for_database(db)
    try:
        heard = Counter()
        _listening(w, ringer, Topic.EVENTS, heard)
        with db.write() as conn:
            killed = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
            ).scalar_one()
        assert killed == 1

        def rung_again() -> bool:
            ringer.ring(Topic.EVENTS)
            return heard.rung.wait(0.2)

        assert until(rung_again, timeout=20)
    finally:
        w.close()
        ringer.close()
