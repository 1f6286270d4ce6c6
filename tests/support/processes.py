"""Helpers for the tests that run whenthen as a user does, in processes of its own, over
real HTTP and SMTP."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

from whenthen.messaging.smtp_sink import Received, SmtpSink

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_env(db_url: str, *, port: int, secret: str, sink: SmtpSink, poll: str) -> dict[str, str]:
    """The environment of a whenthen process serving on ``port`` of 127.0.0.1, sending
    email to ``sink``, polling every ``poll`` seconds when idle."""
    return {
        **os.environ,
        "WHENTHEN_DATABASE_URL": db_url,
        "WHENTHEN_SECRET_KEY": secret,
        "WHENTHEN_SERVER__PORT": str(port),
        "WHENTHEN_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "WHENTHEN_EMAIL__SMTP_HOST": sink.host,
        "WHENTHEN_EMAIL__SMTP_PORT": str(sink.port),
        "WHENTHEN_PIPELINE__POLL_INTERVAL_SECONDS": poll,
        "COLUMNS": "200",
    }


def eventually(probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def up(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def mail_to(sink: SmtpSink, address: str, count: int) -> list[Received] | None:
    """The sink's messages to ``address`` once there are at least ``count`` of them."""
    found = [m for m in sink.messages() if address in m.recipients]
    return found if len(found) >= count else None


def publish_example(http: httpx.Client, admin: dict[str, str], file: str, key: str) -> None:
    """Push ``examples/journeys/<file>`` over the admin API and publish it as ``key``."""
    r = http.post(
        "/api/v1/journeys",
        content=(EXAMPLES / file).read_bytes(),
        headers={**admin, "Content-Type": "application/yaml"},
    )
    assert r.status_code == 201, r.text
    assert http.post(f"/api/v1/journeys/{key}/publish", headers=admin).status_code == 200
