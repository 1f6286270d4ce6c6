"""A local SMTP server that records what it receives: the stand-in for a real mail
provider in tests and demos (``whenthen smtp-sink``)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


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

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.sink.pipelining:
            # aiosmtpd reads one command at a time from its stream, so pipelined commands
            # are answered in order: offer it, as mail servers do.
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.refuse_with:
            return self.sink.refuse_with
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        received = Received(sender=envelope.mail_from, recipients=tuple(envelope.rcpt_tos), message=parsed)
        with self.sink.lock:
            self.sink.received.append(received)
        if self.sink.on_receive is not None:
            # Before the reply: the sender still waits for "250" (the message is in flight).
            await asyncio.to_thread(self.sink.on_receive, received)
        return "250 Message accepted for delivery"


class SmtpSink:
    """``with SmtpSink() as sink:`` listens on 127.0.0.1 and a free port (``sink.port``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        starttls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        pipelining: bool = True,
    ) -> None:
        """``starttls``/``implicit_tls``: serve TLS with this context (STARTTLS required, or
        TLS from the first byte); ``credentials``: require AUTH with this user and password;
        ``pipelining``: offer PIPELINING (RFC 2920) in the EHLO reply."""
        self.pipelining = pipelining
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.refuse_with: str | None = None
        #: Called with each message before the server answers its DATA (a link scanner
        #: fetching links on delivery does this), in a thread of its own.
        self.on_receive: Callable[[Received], None] | None = None
        self.credentials = credentials
        options: dict[str, Any] = {}
        if starttls is not None:
            options.update(tls_context=starttls, require_starttls=True)
        if implicit_tls is not None:
            options.update(ssl_context=implicit_tls)
        if credentials is not None:
            # With implicit TLS aiosmtpd cannot tell the transport is encrypted (it is), and it
            # warns on every connection if AUTH is required without TLS: there, AUTH is
            # offered and checked but not enforced.
            implicit = starttls is None
            options.update(
                authenticator=self._authenticate, auth_required=not implicit, auth_require_tls=not implicit
            )
        self.controller = Controller(
            _Handler(self), hostname=host, port=port or _free_port(host), server_hostname=host, **options
        )

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.credentials is not None
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == self.credentials[0]
            and data.password.decode() == self.credentials[1]
        )
        return AuthResult(success=ok, handled=False)

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
