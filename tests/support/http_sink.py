"""A tiny local HTTP server that records the requests it receives and answers with a
canned JSON response: the stand-in for a CRM or any other webhook receiver in tests."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        sink = self.server.sink
        with sink.lock:
            sink.received.append(
                Request(
                    method="POST",
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
            )
            reply = sink.reply
        payload = json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``sink.requests()`` instead of a log."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sink: HttpSink, host: str) -> None:
        self.sink = sink
        super().__init__((host, 0), _Handler)


class HttpSink:
    """``with HttpSink() as sink:`` listens on 127.0.0.1 and a free port; ``sink.url(path)``
    is an address to post to, ``sink.reply`` what every request gets back."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.received: list[Request] = []
        self.lock = threading.Lock()
        self.reply = Reply()
        self._server = _Server(self, host)
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-sink", daemon=True)

    def url(self, path: str = "/") -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def __enter__(self) -> HttpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def requests(self) -> list[Request]:
        with self.lock:
            return list(self.received)
