"""Background work of journeys: timers, date triggers, and signal fan-out jobs."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from whenthen.journeys import repository, runtime
from whenthen.kernel.clock import Clock
from whenthen.messaging import service as outbox
from whenthen.messaging.dispatch import Outcome
from whenthen.storage import Database

SIGNAL_PAGE = 500
log = logging.getLogger("whenthen.journeys")


def fire_timers(db: Database, clock: Clock, *, partitions: int, limit: int = 1000) -> int:
    """One batch of due timers and date triggers, in one transaction. The batch is written
    with one statement per table; when anything in it fails (the database refuses a row),
    it is done again with a savepoint per enrollment, so the faulty one is retried later
    (and dead-lettered in the end) while the others go on.

    1,000 a batch: a batch's fixed costs (its commit, the due read, a statement a table)
    then weigh half what they did at 500, and a batch still takes well under 0.2 s on
    SQLite; the worker fires again at once while it finds work."""
    try:
        with db.write() as conn:
            now = clock.now()
            return runtime.fire_due(conn, now, limit=limit, partitions=partitions) + runtime.fire_due_dates(
                conn, now, limit=limit, partitions=partitions
            )
    except Exception as exc:
        log.warning("timer batch failed (%r); again with a savepoint per enrollment", exc)
    with db.write() as conn:
        now = clock.now()
        return runtime.fire_due(
            conn, now, limit=limit, partitions=partitions, careful=True
        ) + runtime.fire_due_dates(conn, now, limit=limit, partitions=partitions)


@dataclass
class TimerStep:
    """The worker's journey timer step: one batch of due timers (:func:`fire_timers`) and,
    when that batch came back full (more are due, e.g. 10,000 falling due in the same
    second), further batches in ``threads`` threads at once for up to ``budget_seconds``.

    On PostgreSQL a batch spends most of its time waiting for the server (its statements
    and commit), and that wait releases the interpreter: two threads keep the database
    and this process busy at the same time, as two worker processes would
    (``FOR UPDATE SKIP LOCKED`` gives each batch its own enrollments). The budget keeps
    the worker's pass short, so the events behind it wait no longer than with one batch
    a pass. SQLite has one writer: its threads would only queue, so it runs one (the
    container passes ``threads=1``)."""

    db: Database
    clock: Clock
    partitions: int
    threads: int = 1
    limit: int = 1000
    budget_seconds: float = 0.25

    #: The last call ended with timers still due: the next starts in threads at once.
    _behind: bool = False

    def __call__(self) -> int:
        fired = 0
        if not self._behind:
            fired = self._batch()
            if fired < self.limit or self.threads < 2:
                return fired
        deadline = time.monotonic() + self.budget_seconds
        with ThreadPoolExecutor(self.threads, thread_name_prefix="whenthen-timers") as pool:
            runs = [pool.submit(self._until_short, deadline) for _ in range(self.threads)]
            results = [run.result() for run in runs]
        # Every thread stopped on a full batch: more are due, most likely.
        self._behind = all(full for _, full in results)
        return fired + sum(n for n, _ in results)

    def _batch(self) -> int:
        return fire_timers(self.db, self.clock, partitions=self.partitions, limit=self.limit)

    def _until_short(self, deadline: float) -> tuple[int, bool]:
        """Batches until one comes back short (none left) or the budget is spent; returns
        how many fired and whether the last batch was full."""
        fired = 0
        while True:
            n = self._batch()
            fired += n
            if n < self.limit:
                return fired, False
            if time.monotonic() >= deadline:
                return fired, True


def seconds_to_next_timer(db: Database, clock: Clock) -> float | None:
    """How long until the earliest journey timer falls due (0 when one is due already);
    ``None`` when none waits. The worker sleeps no longer than that, so a timer fires when
    it falls due rather than up to a poll interval later."""
    with db.read() as conn:
        at = repository.next_wake(conn)
    return None if at is None else max(0.0, (at - clock.now()).total_seconds())


class SignalJob:
    """Fans a signal out over the workspace's profiles a page at a time, each page in its
    own transaction, so a signal to a million people never blocks the request that sent
    it nor holds one long transaction. The cursor is kept in the job between pages."""

    def __init__(self, db: Database, clock: Clock, *, partitions: int) -> None:
        self.db = db
        self.clock = clock
        self.partitions = partitions

    def __call__(self, job: Any) -> Outcome:
        p = dict(job.payload)
        with self.db.write() as conn:
            now = self.clock.now()
            entered, cursor = runtime.signal_page(
                conn,
                job.workspace_id,
                p["name"],
                p.get("properties") or {},
                now,
                after=p.get("cursor"),
                limit=SIGNAL_PAGE,
                partitions=self.partitions,
            )
            p["entered"] = int(p.get("entered", 0)) + entered
            if cursor is None:
                p["cursor"] = None
                p["finished_at"] = now.isoformat()
                outbox.replace_payload(conn, job.id, p, now)
                return Outcome()
            p["cursor"] = cursor
            outbox.replace_payload(conn, job.id, p, now)
        # More pages: run again at once (the dispatcher picks the job up on its next pass).
        return Outcome(done=False, retry_at=now, error=None)


class BackfillDatesJob:
    """Schedules a newly published date-triggered journey for existing profiles, by pages."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def __call__(self, job: Any) -> Outcome:
        p = dict(job.payload)
        with self.db.write() as conn:
            now = self.clock.now()
            cursor = runtime.backfill_dates(
                conn, job.workspace_id, p["journey"], now, after=p.get("cursor"), limit=SIGNAL_PAGE
            )
            p["cursor"] = cursor
            outbox.replace_payload(conn, job.id, p, now)
        return Outcome() if cursor is None else Outcome(done=False, retry_at=now)
