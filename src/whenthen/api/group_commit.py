"""Group commit for tracking requests: single calls (``/v1/track``, ...) and batches.

A client sending one call a request (analytics.js, a server SDK without batching) pays a
transaction a call: its begin, the key look-up, the insert and the commit, which on
SQLite FULL and on PostgreSQL waits for the disk. Here the requests in flight share
transactions: each hands its validated calls to one writer thread and waits for the
outcome; the thread takes every request waiting (up to ``max_group`` requests and about
``max_events`` calls), and in one transaction checks each request's key (once per key),
applies the rate limit, and appends them all; after the commit each request gets its
answer. A 200 still means the calls are durably stored. When the shared transaction
fails, each request of the group is written in a transaction of its own, so one cannot
cost the others (docs/adr/0005-pipeline-batches-and-group-commit.md).

Batches (``/v1/batch``) go through the same writer since ADR 0006: on SQLite the writers'
lock is held through the commit's ``fsync``, so batch requests that each committed alone
queued behind each other's disk waits; sharing commits, they pay one wait per group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.responses import Response

from whenthen.api.auth import authenticate_write_key_in
from whenthen.bootstrap import Container
from whenthen.kernel.errors import Unauthorized
from whenthen.storage import Dialect
from whenthen.tracking import AcceptedEvent, service
from whenthen.workspaces import Principal

log = logging.getLogger(__name__)

#: ``rate_limited(container, principal, calls, now)``: the 429 to answer, or ``None``.
RateLimit = Callable[[Container, Principal, int, datetime], Response | None]


#: What a request is answered: the refusal (429), the error (401, or a failure), or the
#: number of its calls newly stored (the rest were duplicates).
Outcome = Response | BaseException | int


@dataclass
class _Call:
    """One request's validated calls; ``batch`` requests get their stored count."""

    key: str
    events: list[AcceptedEvent]
    received_at: datetime
    settle: Callable[[Outcome], None]
    batch: bool


@dataclass
class TrackingWriter:
    """Writes the calls of concurrent tracking requests in shared transactions."""

    c: Container
    rate_limited: RateLimit
    max_group: int = 500
    max_events: int = 2_000
    _queue: queue.SimpleQueue[_Call | None] = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def write(self, key: str, event: AcceptedEvent, received_at: datetime) -> Response | None:
        """Store one validated call; returns the refusal to answer (429) or ``None`` once
        the call is committed. Raises ``Unauthorized`` for a wrong or revoked key."""
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response | None] = loop.create_future()
        self._queue.put(_Call(key, [event], received_at, _settle_async(loop, future), batch=False))
        return await future

    def write_batch(self, key: str, events: list[AcceptedEvent], received_at: datetime) -> Response | int:
        """Store the validated calls of one batch request, from a thread that may block
        (the request's thread-pool thread): the refusal to answer (429), or how many of
        the calls were new once they are committed. Raises ``Unauthorized`` for a wrong or
        revoked key, and what storing raised when it failed.

        On SQLite the batch joins the writer's shared transactions; on PostgreSQL it is
        written here, in a transaction of its own: PostgreSQL commits concurrent
        transactions in parallel, and one writer thread would serialize them (measured:
        8,900 against 18,100 events/s)."""
        future: concurrent.futures.Future[Response | int] = concurrent.futures.Future()

        def settle(outcome: Outcome) -> None:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        call = _Call(key, events, received_at, settle, batch=True)
        if self.c.db.dialect is Dialect.SQLITE:
            self._start()
            self._queue.put(call)
        else:
            # No transaction block: the key's read and the append are one statement
            # each, and the append commits the batch by itself (Database.autocommit).
            [outcome] = self._write([call])
            settle(outcome)
            if isinstance(outcome, int) and outcome:
                self.c.worker.notify()
        return future.result()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="whenthen-group-commit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            size = len(first.events)
            while len(group) < self.max_group and size < self.max_events:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop once this group is written
                    break
                group.append(more)
                size += len(more.events)
            try:
                outcomes = self._write(group)
            except Exception as exc:
                log.warning("group of %d calls failed (%r); call by call", len(group), exc)
                outcomes = [self._write_alone(call) for call in group]
            stored = False
            for call, outcome in zip(group, outcomes, strict=True):
                stored = stored or isinstance(outcome, int)
                call.settle(outcome)
            if stored:
                self.c.worker.notify()

    def _write(self, group: list[_Call]) -> list[Outcome]:
        """The group's writes: each request's answer (an int: stored).

        Single calls of one workspace are appended together (their answer does not say
        whether the call was a duplicate); a batch is appended on its own, for its count.
        On SQLite that is one transaction; on PostgreSQL each append is one statement that
        commits by itself (``Database.autocommit``, ADR 0007): no ``BEGIN`` and ``COMMIT``
        round trips, and every answer waits for all of the group's statements. A group
        that fails part-way is written again call by call; what was stored already is
        then a duplicate (deduplicated on ``messageId``), so nothing is stored twice.
        """
        outcomes: list[Outcome] = []
        principals: dict[str, Principal | Unauthorized] = {}
        by_workspace: dict[str, list[AcceptedEvent]] = {}
        partitions = self.c.settings.pipeline.partitions
        with self.c.db.autocommit() as conn:
            for call in group:
                principal = principals.get(call.key)
                if principal is None:
                    try:
                        principal = authenticate_write_key_in(conn, call.key)
                    except Unauthorized as exc:
                        principal = exc
                    principals[call.key] = principal
                if isinstance(principal, Unauthorized):
                    outcomes.append(principal)
                    continue
                refusal = self.rate_limited(self.c, principal, max(1, len(call.events)), call.received_at)
                if refusal is not None:
                    outcomes.append(refusal)
                    continue
                if call.batch:
                    outcomes.append(
                        service.append(conn, principal.workspace_id, call.events, partitions=partitions)[0]
                    )
                    continue
                by_workspace.setdefault(principal.workspace_id, []).extend(call.events)
                outcomes.append(len(call.events))
            for ws, events in by_workspace.items():
                service.append(conn, ws, events, partitions=partitions)
        return outcomes

    def _write_alone(self, call: _Call) -> Outcome:
        try:
            return self._write([call])[0]
        except Exception as exc:
            log.exception("calls from %s could not be stored", call.events[0].message_id)
            return exc


def _settle_async(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Response | None]
) -> Callable[[Outcome], None]:
    """Settles a single call's future on its event loop (``None``: stored)."""

    def answer(outcome: Outcome) -> None:
        def settle() -> None:
            if future.done():  # the request went away
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(None if isinstance(outcome, int) else outcome)

        with contextlib.suppress(RuntimeError):  # the request's event loop is closed
            loop.call_soon_threadsafe(settle)

    return answer


def writer(app_state: Any) -> TrackingWriter:
    found = app_state.tracking_writer
    assert isinstance(found, TrackingWriter)
    return found
