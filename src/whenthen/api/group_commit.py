"""Group commit for single tracking calls (``/v1/track``, ``/v1/identify``, ...).

A client sending one call a request (analytics.js, a server SDK without batching) pays a
transaction a call: its begin, the key look-up, the insert and the commit, which on
SQLite FULL and on PostgreSQL waits for the disk. Here the calls of concurrent requests
share transactions: each request hands its validated call to one writer thread and
awaits the outcome; the thread takes every call waiting (up to ``max_group``), and in one
transaction checks each call's key (once per key), applies the rate limit, and appends
them all; after the commit each request gets its answer. A 200 still means the call is
durably stored. When the shared transaction fails, each call of the group is written in
a transaction of its own, so one call cannot cost the others
(docs/adr/0005-pipeline-batches-and-group-commit.md).
"""

from __future__ import annotations

import asyncio
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
from whenthen.tracking import AcceptedEvent, service
from whenthen.workspaces import Principal

log = logging.getLogger(__name__)

#: ``rate_limited(container, principal, calls, now)``: the 429 to answer, or ``None``.
RateLimit = Callable[[Container, Principal, int, datetime], Response | None]


@dataclass
class _Call:
    key: str
    event: AcceptedEvent
    received_at: datetime
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Response | None]


@dataclass
class SingleCallWriter:
    """Writes single calls of concurrent requests in shared transactions."""

    c: Container
    rate_limited: RateLimit
    max_group: int = 500
    _queue: queue.SimpleQueue[_Call | None] = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def write(self, key: str, event: AcceptedEvent, received_at: datetime) -> Response | None:
        """Store one validated call; returns the refusal to answer (429) or ``None`` once
        the call is committed. Raises ``Unauthorized`` for a wrong or revoked key."""
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response | None] = loop.create_future()
        self._queue.put(_Call(key, event, received_at, loop, future))
        return await future

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
            while len(group) < self.max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop once this group is written
                    break
                group.append(more)
            try:
                outcomes = self._write(group)
            except Exception as exc:
                log.warning("group of %d calls failed (%r); call by call", len(group), exc)
                outcomes = [self._write_alone(call) for call in group]
            stored = False
            for call, outcome in zip(group, outcomes, strict=True):
                stored = stored or outcome is None
                _answer(call, outcome)
            if stored:
                self.c.worker.notify()

    def _write(self, group: list[_Call]) -> list[Response | BaseException | None]:
        """One transaction for the group: each call's answer (``None``: stored)."""
        outcomes: list[Response | BaseException | None] = []
        principals: dict[str, Principal | Unauthorized] = {}
        by_workspace: dict[str, list[AcceptedEvent]] = {}
        with self.c.db.write() as conn:
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
                refusal = self.rate_limited(self.c, principal, 1, call.received_at)
                if refusal is not None:
                    outcomes.append(refusal)
                    continue
                by_workspace.setdefault(principal.workspace_id, []).append(call.event)
                outcomes.append(None)
            partitions = self.c.settings.pipeline.partitions
            for ws, events in by_workspace.items():
                service.append(conn, ws, events, partitions=partitions)
        return outcomes

    def _write_alone(self, call: _Call) -> Response | BaseException | None:
        try:
            return self._write([call])[0]
        except Exception as exc:
            log.exception("single call %s could not be stored", call.event.message_id)
            return exc


def _answer(call: _Call, outcome: Response | BaseException | None) -> None:
    def settle() -> None:
        if call.future.done():  # the request went away
            return
        if isinstance(outcome, BaseException):
            call.future.set_exception(outcome)
        else:
            call.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the request's event loop is closed
        call.loop.call_soon_threadsafe(settle)


def writer(app_state: Any) -> SingleCallWriter:
    found = app_state.single_call_writer
    assert isinstance(found, SingleCallWriter)
    return found
