"""SQLite's WAL checkpoints on a thread of their own, off the writers' path (ADR 0017).

In WAL mode a commit appends the changed pages to ``<database>-wal``; a checkpoint copies
them into the database file so the log can start over. By default the connection whose
commit takes the log past 1,000 pages runs that checkpoint itself, inside its commit,
while every other writer queues behind it: with 1,000 journey timers a batch touching
~3,000 scattered pages, each commit checkpointed and the checkpoint was ~70 % of the
commit's time (0.45 s of each 10,000 wake-ups at a million waiting).

A ``WalCheckpointer`` runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its own connection every
``interval`` seconds. A passive checkpoint takes no writer's lock: it copies the frames
that no reader still needs and returns, so it runs beside the writers, on the other core
(the sqlite3 module lets go of the GIL while SQLite works). The engine's connections keep
an automatic checkpoint only as a backstop, at ``BACKSTOP_PAGES``: should this thread
fall behind or stop, the log is still bounded. With nothing to copy a checkpoint reads
the WAL index header and returns (tens of microseconds).

Several processes on one database each run one; two checkpoints at once are harmless
(one finds the checkpoint lock taken and tries again at its next interval).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from urllib.parse import quote

log = logging.getLogger(__name__)

#: The engine connections' ``wal_autocheckpoint`` while a checkpointer runs (pages;
#: SQLite's default is 1,000): a writer checkpoints only when the log grew this far.
BACKSTOP_PAGES = 20_000
#: Seconds between two checkpoints.
INTERVAL_SECONDS = 0.05


class WalCheckpointer:
    """A daemon thread checkpointing the SQLite database at ``path`` until ``stop``."""

    def __init__(self, path: str, *, synchronous: str, interval: float = INTERVAL_SECONDS) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.interval = interval
        self.checkpoints = 0  # passes that ran (for tests and diagnosis)
        #: The last pass's answer: (busy, frames in the log, frames copied).
        self.last: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="whenthen-wal-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        while not self._stop.wait(self.interval):
            try:
                if conn is None:
                    conn = self._connect()
                busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.last = (busy, frames, copied)
                self.checkpoints += 1
            except sqlite3.Error as error:
                # A busy checkpoint lock, a database not created yet, a file removed:
                # the next pass tries again, on a new connection.
                log.debug("wal checkpoint of %s: %s", self.path, error)
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        # The synchronous mode of the connection that checkpoints decides the syncs
        # (the log before copying, the database file after): the engine's own.
        # mode=rw: never creates the file (the engine does, in WAL mode).
        uri = f"file:{quote(self.path)}?mode=rw"
        conn = sqlite3.connect(uri, uri=True, timeout=0.0, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn
