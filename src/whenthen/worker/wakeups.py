"""Wake-ups across processes: an API process tells the pipeline workers that events were
stored, a pipeline worker tells the dispatchers that outbox jobs were committed.

Within one process the worker's events do this (``PipelineWorker.notify``); between
processes (``whenthen serve --no-worker`` beside ``whenthen worker``, or a worker per
role) the waiting side would otherwise find the work at its next poll, up to
``pipeline.poll_interval_seconds`` later (200 ms by default: most of an email's latency at
a low rate). A wake-up is only ever a hint: nobody relies on it for correctness, a lost
or spurious one costs at most one poll interval or one empty pass.

* PostgreSQL: ``NOTIFY`` on a channel per topic, ``LISTEN`` on a connection of its own;
  works across machines.
* SQLite (one machine by nature): a Unix datagram socket per listening process in a
  private folder named after the database file; a ring is one datagram to each.

``ring`` never blocks the caller: it flags the topic, and a thread of its own sends the
flagged topics (rings in the meantime are merged into one).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from whenthen.storage import Database
from whenthen.storage.database import Dialect

log = logging.getLogger("whenthen.wakeups")


class Topic(enum.StrEnum):
    EVENTS = "events"  # events were stored: pipeline workers have work
    OUTBOX = "outbox"  # outbox jobs were committed: dispatchers have work


class Wakeups(Protocol):
    def ring(self, topic: Topic) -> None:
        """Tell the other processes listening to ``topic`` (never blocks)."""

    def listen(self, topic: Topic, on_ring: Callable[[], None]) -> None:
        """Call ``on_ring`` (from a thread of this object) when another process rings."""

    def close(self) -> None:
        """Stop listening and ringing."""


class NoWakeups:
    """Wake-ups that go nowhere: a single process (tests, ``whenthen drain``)."""

    def ring(self, topic: Topic) -> None:
        return None

    def listen(self, topic: Topic, on_ring: Callable[[], None]) -> None:
        return None

    def close(self) -> None:
        return None


class _Ringer:
    """The thread that sends the flagged topics; ``send`` does the sending."""

    def __init__(self, send: Callable[[set[Topic]], None], name: str) -> None:
        self._send = send
        self._flagged: set[Topic] = set()
        self._lock = threading.Lock()
        self._bell = threading.Event()
        self._closed = False
        self._name = name
        self._thread: threading.Thread | None = None  # started by the first ring

    def ring(self, topic: Topic) -> None:
        with self._lock:
            if self._closed:
                return
            self._flagged.add(topic)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._bell.set()

    def _run(self) -> None:
        while True:
            self._bell.wait()
            self._bell.clear()
            with self._lock:
                topics, self._flagged = self._flagged, set()
            if self._closed:
                return
            if topics:
                try:
                    self._send(topics)
                except Exception:
                    log.exception("could not send wake-ups %s", sorted(topics))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._bell.set()
        if thread is not None:
            thread.join(timeout=5)


# ---- SQLite: Unix datagram sockets ---------------------------------------------------------


#: How often a ringer looks again for other processes' sockets (seconds).
RELIST_SECONDS = 1.0


_TOPICS = {t.value for t in Topic}


def _topic_of(name: str) -> Topic | None:
    """The topic of a listener's socket file (``<topic>-<pid>-<n>.sock``), else ``None``."""
    prefix = name.partition("-")[0]
    return Topic(prefix) if name.endswith(".sock") and prefix in _TOPICS else None


def socket_folder(database_file: str) -> Path:
    """The folder of the listeners' sockets for a SQLite database file: in the temporary
    folder (a socket path is limited to ~100 bytes), named after the file's absolute path,
    readable by this user only."""
    digest = hashlib.sha256(os.path.abspath(database_file).encode("utf-8")).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"whenthen-wake-{os.getuid()}-{digest}"


class SocketWakeups:
    """Wake-ups between the processes of one machine sharing a SQLite file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._out: socket.socket | None = None  # made by the first send
        self._listeners: list[tuple[socket.socket, Path, threading.Thread]] = []
        self._stop = threading.Event()
        self._ringer = _Ringer(self._send, "whenthen-wake-ring")
        self._others: set[Topic] = set()
        self._listed_at = -RELIST_SECONDS

    def ring(self, topic: Topic) -> None:
        # The single process of the embedded default has no one to tell: without another
        # listener of the topic in the folder (looked at again at most once a second, so a
        # process that starts listening is told within a second), no datagram, no thread.
        if time.monotonic() - self._listed_at >= RELIST_SECONDS:
            self._relist()
        if topic in self._others:
            self._ringer.ring(topic)

    def _relist(self) -> dict[str, Topic]:
        """The sockets of other processes' listeners in the folder, by file name; notes
        the topics they listen to and when."""
        own = {path.name for _, path, _ in self._listeners}
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            names = []
        others = {n: t for n in names if n not in own and (t := _topic_of(n)) is not None}
        self._others, self._listed_at = set(others.values()), time.monotonic()
        return others

    def _send(self, topics: set[Topic]) -> None:
        for name, topic in self._relist().items():
            if topic not in topics:
                continue
            path = self.folder / name
            try:
                if self._out is None:
                    self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._out.setblocking(False)
                self._out.sendto(b"!", str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                # Its process is gone (a crash leaves the file): clean up after it.
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):  # its queue is full: awake
                    raise

    def listen(self, topic: Topic, on_ring: Callable[[], None]) -> None:
        path = self.folder / f"{topic.value}-{os.getpid()}-{len(self._listeners)}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for attempt in range(3):
            self.folder.mkdir(mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale file of a reused pid
            try:
                sock.bind(str(path))
                break
            except FileNotFoundError:
                # The last listener of another process removed the empty folder between
                # our mkdir and bind (``close``): make it again.
                if attempt == 2:
                    sock.close()
                    raise
        sock.settimeout(0.5)
        thread = threading.Thread(
            target=self._receive, args=(sock, on_ring), name=f"whenthen-wake-{topic.value}", daemon=True
        )
        self._listeners.append((sock, path, thread))
        thread.start()

    def _receive(self, sock: socket.socket, on_ring: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                sock.recv(64)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            if not self._stop.is_set():
                on_ring()

    def close(self) -> None:
        self._stop.set()
        self._ringer.close()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as poke:  # wake the receivers now
            for _, path, _ in self._listeners:
                with contextlib.suppress(OSError):
                    poke.sendto(b"", str(path))
        for sock, path, thread in self._listeners:
            thread.join(timeout=2)
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._listeners.clear()
        if self._out is not None:
            self._out.close()
            self._out = None
        # The folder goes with its last socket (a test run or a bench makes one per
        # database file); one that still holds another process's socket stays.
        with contextlib.suppress(OSError):
            self.folder.rmdir()


# ---- PostgreSQL: LISTEN / NOTIFY ---------------------------------------------------------


def channel(topic: Topic) -> str:
    return f"whenthen_{topic.value}"


class PostgresWakeups:
    """Wake-ups through ``NOTIFY``, between processes on any machines sharing the database.

    Both directions use a connection of their own, taken from the engine once and kept
    (so it has the same settings as the pool's), in autocommit mode. A listener whose
    connection fails reconnects after a second; meanwhile its process polls as usual."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._stop = threading.Event()
        self._out: Any = None
        self._ringer = _Ringer(self._send, "whenthen-wake-notify")
        self._threads: list[threading.Thread] = []
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        raw = self._db.engine.raw_connection()
        conn = raw.driver_connection
        assert conn is not None
        raw.detach()  # ours for good: it never goes back to the pool
        conn.autocommit = True
        return conn

    def ring(self, topic: Topic) -> None:
        self._ringer.ring(topic)

    def _send(self, topics: set[Topic]) -> None:
        for attempt in (1, 2):
            try:
                if self._out is None or self._out.closed:
                    self._out = self._connect()
                for topic in sorted(topics):
                    self._out.execute(f"NOTIFY {channel(topic)}")
                return
            except Exception:
                self._discard_out()
                if attempt == 2:
                    raise

    def _discard_out(self) -> None:
        if self._out is not None:
            with contextlib.suppress(Exception):
                self._out.close()
        self._out = None

    def listen(self, topic: Topic, on_ring: Callable[[], None]) -> None:
        thread = threading.Thread(
            target=self._receive, args=(topic, on_ring), name=f"whenthen-listen-{topic.value}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _receive(self, topic: Topic, on_ring: Callable[[], None]) -> None:
        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = self._connect()
                with self._lock:
                    self._connections.append(conn)
                conn.execute(f"LISTEN {channel(topic)}")
                while not self._stop.is_set():
                    # A short wait (the socket only), so a close is noticed soon.
                    for _ in conn.notifies(timeout=0.1, stop_after=1):
                        on_ring()
            except Exception:
                if self._stop.is_set():
                    return
                log.warning("listening for %s wake-ups failed; again in 1 s", topic.value, exc_info=True)
                self._stop.wait(1.0)
            finally:
                if conn is not None:
                    with self._lock:
                        if conn in self._connections:
                            self._connections.remove(conn)
                    with contextlib.suppress(Exception):
                        conn.close()

    def close(self) -> None:
        self._stop.set()
        self._ringer.close()
        for thread in self._threads:
            thread.join(timeout=3)
        self._threads.clear()
        self._discard_out()


def for_database(db: Database) -> Wakeups:
    """The wake-ups that reach the other processes of this database."""
    if db.dialect is Dialect.POSTGRESQL:
        return PostgresWakeups(db)
    return SocketWakeups(socket_folder(db.engine.url.database or ""))
