"""A local SMTP server that records what it receives: the stand-in for a real mail
provider in tests and demos (``whenthen smtp-sink``)."""

from __future__ import annotations

import email
import email.policy
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def body(self, subtype: str = "plain") -> str:
        part = self.message.get_body((subtype,))
        return "" if part is None else str(part.get_content())


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.refuse_with:
            return self.sink.refuse_with
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        with self.sink.lock:
            self.sink.received.append(
                Received(sender=envelope.mail_from, recipients=tuple(envelope.rcpt_tos), message=parsed)
            )
        return "250 Message accepted for delivery"


class SmtpSink:
    """``with SmtpSink() as sink:`` listens on 127.0.0.1 and a free port (``sink.port``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.refuse_with: str | None = None
        self.controller = Controller(_Handler(self), hostname=host, port=port or _free_port(host))

    @property
    def host(self) -> str:
        return str(self.controller.hostname)

    @property
    def port(self) -> int:
        return int(self.controller.port)

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    def messages(self) -> list[Received]:
        with self.lock:
            return list(self.received)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
