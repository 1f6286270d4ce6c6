"""The real app in a real HTTP server, for clients that must talk HTTP over a socket
(the official Segment libraries, a browser's request shape, other processes).

``live_server`` serves ``create_app(container, run_worker=True)`` with uvicorn in a
background thread on a free 127.0.0.1 port, so the embedded pipeline worker runs as in
production. The container uses the system clock (SDKs stamp events with the real time,
and the tracking API refuses timestamps far from its clock). It runs on each database of
``db_url``. Every HTTP request the server answered is recorded (method, path, headers,
status) so tests can check how a client called it.

Use it by importing the fixture into a test module or a conftest::

    from tests.support.live_server import live_server  # noqa: F401
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.conftest import make_settings
from whenthen import pipeline
from whenthen.api.app import create_app
from whenthen.bootstrap import Container, build
from whenthen.tracking import tables as tracking_tables
from whenthen.tracking.repository import FAILED

STARTUP_TIMEOUT = 15.0
SHUTDOWN_TIMEOUT = 15.0
#: How long to wait for the embedded worker to apply what was ingested.
PROCESSING_TIMEOUT = 30.0
POLL_INTERVAL = 0.02


@dataclass
class SeenRequest:
    """One HTTP request the live server answered."""

    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None


class RequestRecorder:
    """ASGI wrapper that records each HTTP request and the status it was answered with."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._seen: list[SeenRequest] = []

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = SeenRequest(
            method=scope["method"],
            path=scope["path"],
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
        )
        with self._lock:
            self._seen.append(seen)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen.status = int(message["status"])
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class LiveServer:
    url: str
    container: Container
    recorder: RequestRecorder

    @property
    def requests(self) -> list[SeenRequest]:
        return self.recorder.requests

    def pending_events(self) -> int:
        with self.container.db.read() as conn:
            return pipeline.count_pending(conn)

    def stored_events(self) -> int:
        """Every event in the log, whatever its workspace or state."""
        with self.container.db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(tracking_tables.events)).scalar_one())

    def failed_events(self) -> int:
        events = tracking_tables.events
        with self.container.db.read() as conn:
            query = select(func.count()).select_from(events).where(events.c.state == FAILED)
            return int(conn.execute(query).scalar_one())

    def wait_until_processed(self, timeout: float = PROCESSING_TIMEOUT) -> None:
        """Poll (bounded) until the embedded worker has applied every ingested event."""
        deadline = time.monotonic() + timeout
        while (pending := self.pending_events()) > 0:
            if time.monotonic() > deadline:
                pytest.fail(f"the pipeline worker left {pending} event(s) pending after {timeout}s")
            time.sleep(POLL_INTERVAL)


def _serve(container: Container) -> Iterator[LiveServer]:
    recorder = RequestRecorder(create_app(container, run_worker=True))
    config = uvicorn.Config(
        recorder,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        ws="none",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            pytest.fail("the live server stopped during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail(f"the live server did not start within {STARTUP_TIMEOUT}s")
        time.sleep(POLL_INTERVAL)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", container=container, recorder=recorder)
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT)
        if thread.is_alive():  # pragma: no cover - a hung shutdown is a bug worth failing on
            pytest.fail(f"the live server did not stop within {SHUTDOWN_TIMEOUT}s")


@pytest.fixture
def live_server(db_url: str) -> Iterator[LiveServer]:
    """The app with its embedded worker, over HTTP on a free 127.0.0.1 port."""
    container = build(make_settings(db_url))  # no clock given: the system clock
    try:
        yield from _serve(container)
    finally:
        container.close()
