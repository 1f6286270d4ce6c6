"""The pipeline worker: leases partitions and applies pending events, until stopped.

Each partition batch is one unit of work (one transaction). A batch that fails is
retried event by event, each in its own transaction; an event that still fails is
parked (state ``failed``) with the error logged, so one bad event cannot block the
person's partition forever.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from whenthen import pipeline, tracking
from whenthen.kernel.clock import Clock
from whenthen.kernel.ids import new_secret
from whenthen.settings import PipelineSettings
from whenthen.storage import Database
from whenthen.worker.wakeups import NoWakeups, Topic, Wakeups

log = logging.getLogger("whenthen.worker")

TRANSIENT = (OperationalError, IntegrityError)


class Role(enum.StrEnum):
    """What a worker process runs (``whenthen worker --role``)."""

    ALL = "all"
    PIPELINE = "pipeline"  # events, journey and segment timers, rechecks, decay
    DISPATCH = "dispatch"  # the outbox: emails, webhooks, signals, imports


@dataclass
class Stats:
    processed: int = 0
    suppressed: int = 0
    failed: int = 0
    retried_batches: int = 0


@dataclass
class PipelineWorker:
    db: Database
    clock: Clock
    settings: PipelineSettings
    secret: bytes
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{new_secret(4)}")
    stats: Stats = field(default_factory=Stats)
    #: Further work done on every pass after the pipeline (timers, segment timers);
    #: each returns how much it did.
    steps: list[Callable[[], int]] = field(default_factory=list)
    #: Work that runs in a thread of its own while the worker runs (the outbox dispatcher:
    #: delivery must not wait behind pipeline passes), woken when a pass did something;
    #: ``run_once`` and ``drain`` run it inline after the steps.
    background: list[Callable[[], int]] = field(default_factory=list)
    #: Seconds until a step next has work that falls due (a journey timer), ``None`` for
    #: none: an idle worker sleeps no longer than that, so a timer fires when it falls
    #: due, not up to ``poll_interval_seconds`` later.
    next_due: list[Callable[[], float | None]] = field(default_factory=list)
    #: Wake-ups to and from the other processes (an API process, dispatchers): see
    #: :mod:`whenthen.worker.wakeups`; the container closes them.
    wakeups: Wakeups = field(default_factory=NoWakeups)
    #: The pipeline part of a pass stops taking partitions after this long, so the steps
    #: (timers) run at least that often under load; the next pass goes on from there.
    pass_budget_seconds: float = 0.25
    #: While events keep coming, the steps run at most this often (each is a transaction
    #: of a few reads even with nothing due: on every pass of a few events they cost more
    #: than the events); a pass that applied no event runs them at once.
    steps_interval_seconds: float = 0.05
    _steps_at: float | None = None
    #: How many events the next group takes: ``batch_size`` (0: not set yet), or
    #: ``settings.backlog_limit`` while groups come back full.
    _group_limit: int = 0
    _owned: set[int] | None = None
    _renewed_at: datetime | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _background_wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _background_thread: threading.Thread | None = None
    _role: Role = Role.ALL

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_seconds)

    def notify(self) -> None:
        """Wake the loop now (called after an ingest commits), instead of at the next poll,
        and the pipeline workers of other processes (``whenthen worker``)."""
        self._wake.set()
        self.wakeups.ring(Topic.EVENTS)

    def _outbox_ready(self) -> None:
        """Wake the dispatcher: this process's thread and those of other processes."""
        self._background_wake.set()
        self.wakeups.ring(Topic.OUTBOX)

    def run_once(self, *, background: bool = True) -> int:
        """One pass: renew leases, apply the pending events of the owned partitions,
        ``batch_size`` at a time (until none is left or the pass budget is spent), then
        run the steps and, unless ``background`` is false (their thread runs them), the
        background work. Returns how much was done."""
        owned = self._leases()
        with self.db.read() as conn:
            busy = pipeline.pending_partitions(conn, sorted(owned))
        handled = 0
        started = time.monotonic()
        while busy:
            limit = self._group_limit or self.settings.batch_size
            n = self._process_group(busy, limit)
            handled += n
            if n:
                # The group committed its outbox jobs: the dispatcher need not wait for the
                # rest of the pass (up to ``pass_budget_seconds`` under load).
                self._outbox_ready()
            self._group_limit = self.settings.backlog_limit if n >= limit else self.settings.batch_size
            if n < limit or time.monotonic() - started >= self.pass_budget_seconds:
                break
        applied = handled
        if (
            applied == 0
            or self._steps_at is None
            or time.monotonic() - self._steps_at >= self.steps_interval_seconds
        ):
            self._steps_at = time.monotonic()
            for step in self.steps:
                handled += step()
        if handled > applied:
            self._outbox_ready()  # the steps (timers) made outbox jobs, most likely
        if background:
            for work in self.background:
                handled += work()
        return handled

    def _leases(self) -> set[int]:
        """The partitions this worker owns, renewing the leases only when a third of their
        time has passed (renewing 64 rows on every pass made an idle pass cost 8-16 ms)."""
        now = self.clock.now()
        if (
            self._owned is not None
            and self._renewed_at is not None
            and now - self._renewed_at < self.lease / 3
        ):
            return self._owned
        with self.db.write() as conn:
            self._owned = set(
                pipeline.claim(conn, self.owner, range(self.settings.partitions), now=now, lease=self.lease)
            )
        self._renewed_at = now
        return self._owned

    def _process_group(self, partitions: list[int], limit: int) -> int:
        """Up to ``limit`` events of several partitions in one transaction: under light
        load each partition has a few events, and a commit per partition (an fsync each
        on PostgreSQL and SQLite FULL, 3-4 ms here) was most of the cost. ``limit`` is
        ``batch_size``, or ``settings.backlog_limit`` after a group came back full. Returns how
        many events were handled. If the transaction fails, each partition is done again
        on its own (and event by event if need be)."""
        try:
            with self.db.write() as conn:
                outcome = pipeline.process_partitions(
                    conn,
                    self.owner,
                    partitions,
                    limit=limit,
                    secret=self.secret,
                    now=self.clock.now(),
                    partitions=self.settings.partitions,
                )
        except Exception as exc:
            log.warning("batch of partitions %s failed (%r); partition by partition", partitions, exc)
            return sum(self._process(p) for p in partitions)
        self._count(outcome)
        return outcome.processed + outcome.suppressed

    def _process(self, partition: int) -> int:
        try:
            with self.db.write() as conn:
                outcome = pipeline.process_partitions(
                    conn,
                    self.owner,
                    [partition],
                    limit=self.settings.batch_size,
                    secret=self.secret,
                    now=self.clock.now(),
                    partitions=self.settings.partitions,
                )
        except Exception as exc:
            log.warning("partition %s batch failed (%r); retrying event by event", partition, exc)
            self.stats.retried_batches += 1
            return self._process_one_by_one(partition)
        self._count(outcome)
        return outcome.processed + outcome.suppressed

    def _process_one_by_one(self, partition: int) -> int:
        with self.db.read() as conn:
            events = tracking.pending_events(conn, [partition], self.settings.batch_size)
        handled = 0
        for event in events:
            try:
                with self.db.write() as conn:
                    outcome = pipeline.process_events(
                        conn,
                        [event],
                        secret=self.secret,
                        now=self.clock.now(),
                        partitions=self.settings.partitions,
                    )
            except TRANSIENT as exc:
                # A race with another worker (merge, identity claimed): next pass retries.
                log.info("event %s deferred: %s", event.seq, exc)
                return handled
            except Exception:
                log.exception("event %s parked after failing on its own", event.seq)
                with self.db.write() as conn:
                    outcome = pipeline.park(conn, event)
            self._count(outcome)
            handled += 1
        return handled

    def _count(self, outcome: pipeline.BatchOutcome) -> None:
        self.stats.processed += outcome.processed
        self.stats.suppressed += outcome.suppressed
        self.stats.failed += outcome.failed

    def drain(self, max_passes: int = 10_000) -> int:
        """Process until nothing is pending and no step has work left (for tests, the CLI
        and benches). Timers that are not due yet stay waiting."""
        total = 0
        for _ in range(max_passes):
            handled = self.run_once()
            total += handled
            if handled == 0:
                with self.db.read() as conn:
                    if pipeline.count_pending(conn) == 0:
                        break
        return total

    def loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before the pass: a notify() during the pass makes the wait return at once.
            self._wake.clear()
            try:
                handled = self.run_once(background=self._role is Role.ALL and self._background_thread is None)
            except Exception:
                log.exception("pipeline pass failed")
                handled = 0
            if handled == 0:
                self._wake.wait(self._idle_wait())

    def _idle_wait(self) -> float:
        """How long an idle loop sleeps (a notify wakes it earlier): the poll interval, or
        less when a timer falls due sooner."""
        wait = self.settings.poll_interval_seconds
        for due in self.next_due:
            try:
                seconds = due()
            except Exception:
                log.exception("next due time unknown")
                continue
            # Due already, yet the pass just made did not take it (another worker holds
            # it, or it waits for a retry): no sooner than the poll, or the loop would spin.
            if seconds is not None and seconds > 0:
                wait = min(wait, seconds + 0.002)  # a hair late rather than a pass early
        return wait

    def _background_loop(self) -> None:
        while not self._stop.is_set():
            self._background_wake.clear()
            handled = 0
            for work in self.background:
                try:
                    handled += work()
                except Exception:
                    log.exception("background work failed")
            if handled == 0:
                self._background_wake.wait(self.settings.poll_interval_seconds)

    def start(self, role: Role = Role.ALL) -> None:
        """Start the threads of ``role``: the pipeline loop (events, then the steps:
        timers, segment timers, rechecks, decay), the dispatcher loop (the background
        work), or both; each listens for the other processes' wake-ups."""
        self._stop.clear()
        self._role = role
        if self.background and role in (Role.ALL, Role.DISPATCH):
            self.wakeups.listen(Topic.OUTBOX, self._background_wake.set)
            self._background_thread = threading.Thread(
                target=self._background_loop, name="whenthen-dispatch", daemon=True
            )
            self._background_thread.start()
        if role in (Role.ALL, Role.PIPELINE):
            self.wakeups.listen(Topic.EVENTS, self._wake.set)
            self._thread = threading.Thread(target=self.loop, name="whenthen-pipeline", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._background_wake.set()
        pipeline_ran = self._thread is not None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._background_thread is not None:
            self._background_thread.join(timeout=10)
            self._background_thread = None
        self._owned = None
        if not pipeline_ran:
            return
        try:
            with self.db.write() as conn:
                pipeline.release(conn, self.owner)
        except DBAPIError:
            log.warning("could not release leases of %s; they expire on their own", self.owner)
