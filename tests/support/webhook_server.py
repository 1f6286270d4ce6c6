"""A local HTTP endpoint for webhook tests: records every request and answers from a script.

``with WebhookServer([Reply(503), Reply(503), Reply(200, {"ok": True})]) as hook:`` listens
on 127.0.0.1 and a free port (``hook.url``) in a background thread. Each request takes the
next scripted reply; once the script is used up, the last reply is repeated (an empty
script answers ``200 {}``). A reply may ``delay`` its answer (to make the caller time out);
the delay is bounded and cut short when the server closes, so closing never hangs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

#: A delay longer than this is a mistake in the test, not a slow server.
MAX_DELAY = 5.0


@dataclass(frozen=True)
class Reply:
    status: int = 200
    #: A JSON document, or raw bytes sent as they are.
    body: Any = field(default_factory=dict)
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.delay <= MAX_DELAY:
            raise ValueError(f"delay must be between 0 and {MAX_DELAY} s")

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        return orjson.dumps(self.body), "application/json"


@dataclass(frozen=True)
class Seen:
    """One request as the server received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        owner = self.server.owner
        reply = owner._take(
            Seen(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
        )
        if reply.delay and owner._closing.wait(reply.delay):
            return  # closing: drop the connection unanswered
        data, content_type = reply.encoded()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the caller gave up (timeout)
            pass

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    owner: WebhookServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a caller hanging up mid-request is expected in timeout tests


class WebhookServer:
    def __init__(self, script: Sequence[Reply] = ()) -> None:
        self._lock = threading.Lock()
        self._script: list[Reply] = list(script)
        self._last = Reply()
        self._seen: list[Seen] = []
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},  # how long shutdown() may wait for the loop
            name="webhook-server",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def script(self, *replies: Reply) -> None:
        """Replace what the next requests are answered with."""
        with self._lock:
            self._script = list(replies)

    def _take(self, seen: Seen) -> Reply:
        with self._lock:
            self._seen.append(seen)
            if self._script:
                self._last = self._script.pop(0)
            return self._last

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()
