"""SMTP delivery with aiosmtplib (host, port, TLS, auth from settings).

The dispatcher hands over ``Outgoing`` messages (``send_outgoing``): the envelope and the
bytes written by ``whenthen.messaging.email.build_email``. An ``EmailMessage`` (``send``,
``send_many``) is serialised here, not by aiosmtplib: aiosmtplib folds headers at 78
characters, and a header holding one long URL without spaces (``List-Unsubscribe``) can
only be folded by turning it into an RFC 2047 encoded word, which is not allowed in that
header and which mail providers do not decode: one-click unsubscribe would silently break.
Lines may be up to 998 characters (RFC 5322), so such headers are sent as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.policy
import threading
import time
import zlib
from collections.abc import Coroutine, Sequence
from email.message import EmailMessage
from typing import Any, TypeVar

import aiosmtplib
from aiosmtplib.email import extract_recipients, extract_sender

from whenthen.messaging.email import Outgoing
from whenthen.messaging.ports import Delivery
from whenthen.settings import EmailSettings

T = TypeVar("T")


#: Sessions kept open to the SMTP server, each sending its share of a batch in turn.
CONNECTIONS = 8
#: A session unused for longer than this is closed rather than reused (servers drop idle
#: sessions after a while; RFC 5321 asks them to wait at least 5 minutes).
IDLE_SECONDS = 30.0

_NO_ENVELOPE = "a message needs a From address and at least one recipient"


class SmtpSender:
    """Sends messages over SMTP sessions that stay open between messages (MAIL, RCPT,
    DATA per message; no connect, EHLO, STARTTLS, AUTH and QUIT each time), up to
    ``connections`` of them at once, on an event loop owned by this sender (the
    dispatcher calls it from its worker thread).

    ``send_many`` sends a batch concurrently over the sessions; the messages to one
    recipient go over one session, in order. A session that fails is closed; a message
    that fails on a reused session which the server had dropped is sent again once over a
    new one (nothing was accepted)."""

    def __init__(
        self, settings: EmailSettings, *, connections: int = CONNECTIONS, idle_seconds: float = IDLE_SECONDS
    ) -> None:
        if not settings.smtp_host:
            raise ValueError("SmtpSender needs email.smtp_host")
        self.settings = settings
        self.connections = max(1, connections)
        self.idle_seconds = idle_seconds
        self._loop = asyncio.new_event_loop()
        #: One caller at a time drives the loop (the dispatcher thread; tests' drain()).
        self._lock = threading.Lock()
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []

    def send(self, message: EmailMessage) -> Delivery:
        return self.send_many([message])[0]

    def send_many(self, messages: Sequence[EmailMessage]) -> list[Delivery]:
        """Hand the messages to the server; one answer per message, in their order."""
        results: list[Delivery | None] = [None] * len(messages)
        prepared: dict[int, Outgoing] = {}
        for i, message in enumerate(messages):
            try:
                prepared[i] = serialise(message)
            except ValueError as exc:
                results[i] = Delivery(accepted=False, detail=f"cannot send: {exc}", permanent=True)
        return self._send(prepared, results)

    def send_outgoing(self, messages: Sequence[Outgoing]) -> list[Delivery]:
        """Hand messages already written as bytes to the server (as ``send_many``)."""
        results: list[Delivery | None] = [None] * len(messages)
        prepared: dict[int, Outgoing] = {}
        for i, message in enumerate(messages):
            if message.sender and message.recipients:
                prepared[i] = message
            else:
                results[i] = Delivery(accepted=False, detail=f"cannot send: {_NO_ENVELOPE}", permanent=True)
        return self._send(prepared, results)

    def _send(self, prepared: dict[int, Outgoing], results: list[Delivery | None]) -> list[Delivery]:
        if prepared:
            with self._lock:
                self._run(self._send_all(prepared, results))
        return [r if r is not None else Delivery(accepted=False, detail="not sent") for r in results]

    async def _send_all(self, prepared: dict[int, Outgoing], results: list[Delivery | None]) -> None:
        lanes: list[list[int]] = [[] for _ in range(min(self.connections, len(prepared)))]
        for i, (_, recipients, _, _) in prepared.items():
            lanes[zlib.crc32(",".join(recipients).encode()) % len(lanes)].append(i)
        await asyncio.gather(*(self._lane(lane, prepared, results) for lane in lanes if lane))

    async def _lane(
        self, lane: list[int], prepared: dict[int, Outgoing], results: list[Delivery | None]
    ) -> None:
        client: aiosmtplib.SMTP | None = None
        try:
            for i in lane:
                results[i], client = await self._one(client, prepared[i])
        finally:
            if client is not None:
                self._idle.append((client, time.monotonic()))

    async def _one(
        self, client: aiosmtplib.SMTP | None, item: Outgoing
    ) -> tuple[Delivery, aiosmtplib.SMTP | None]:
        sender, recipients, data, utf8 = item
        for fresh_only in (False, True):
            reused = False
            try:
                if client is None:
                    client, reused = await self._acquire(fresh_only)
                else:
                    reused = True
                errors, response = await client.sendmail(
                    sender, list(recipients), data, mail_options=["SMTPUTF8"] if utf8 else None
                )
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                await self._discard(client)
                client = None
                if reused and not fresh_only:
                    continue  # the server had closed the idle session: once more on a new one
                return _refusal(exc), None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                await self._discard(client)
                return _refusal(exc), None
            if errors:
                return Delivery(accepted=False, detail=f"refused: {errors}", permanent=True), client
            return Delivery(accepted=True, detail=response), client
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self, fresh_only: bool) -> tuple[aiosmtplib.SMTP, bool]:
        """An open session (``True``: reused) or a new one, connected and logged in."""
        while self._idle and not fresh_only:
            client, since = self._idle.pop()
            if client.is_connected and time.monotonic() - since < self.idle_seconds:
                return client, True
            await self._discard(client, quit=client.is_connected)
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            use_tls=s.smtp_security.lower() == "tls",
            start_tls=s.smtp_security.lower() == "starttls",
            timeout=s.smtp_timeout_seconds,
            cert_bundle=s.smtp_ca_file,
        )
        try:
            await client.connect()
            if s.smtp_username:
                password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                await client.login(s.smtp_username, password)
        except BaseException:
            # ``aiosmtplib.send`` leaves the connection open when AUTH fails: close it here.
            await self._discard(client)
            raise
        return client, False

    async def _discard(self, client: aiosmtplib.SMTP | None, *, quit: bool = False) -> None:
        if client is None:
            return
        if quit:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit()
        client.close()

    def _run(self, session: Coroutine[Any, Any, T]) -> T:
        try:
            result = self._loop.run_until_complete(session)
        except BaseException:
            # A failed session leaves transport close callbacks scheduled (after STARTTLS the
            # socket is only released on the next loop iterations): let them run. Only on
            # failure: a 10 ms pause after every email capped delivery at ~65 a second.
            self._loop.run_until_complete(asyncio.sleep(0.01))
            raise
        # One loop iteration runs the close callbacks of sessions closed meanwhile, so
        # their sockets are released now rather than at garbage collection.
        self._loop.run_until_complete(asyncio.sleep(0))
        return result

    async def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            await self._discard(client, quit=client.is_connected)

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._close_idle())
            self._loop.run_until_complete(asyncio.sleep(0.01))  # anything still closing
            self._loop.close()


def _refusal(exc: BaseException) -> Delivery:
    """What a failed SMTP exchange means: permanent (5xx, unsupported) or temporary."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # 4xx at RCPT (greylisting, mailbox busy) is temporary: only 5xx is final.
        permanent = all(500 <= r.code < 600 for r in exc.recipients)
        answers = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        return Delivery(accepted=False, detail=f"recipient refused: {answers}", permanent=permanent)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Delivery(accepted=False, detail=f"{exc.code} {exc.message}", permanent=500 <= exc.code < 600)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):  # e.g. SMTPUTF8 needed, not offered
        return Delivery(accepted=False, detail=f"not supported by the server: {exc}", permanent=True)
    return Delivery(accepted=False, detail=f"{type(exc).__name__}: {exc}")


def serialise(message: EmailMessage) -> Outgoing:
    """Envelope sender, recipients, the bytes to send (Bcc removed, CRLF line ends, lines
    up to 998 characters) and whether SMTPUTF8 is needed (non-ASCII addresses)."""
    sender = extract_sender(message)
    recipients = extract_recipients(message)
    if not sender or not recipients:
        raise ValueError(_NO_ENVELOPE)
    utf8 = not (sender + "".join(recipients)).isascii()
    policy = _POLICIES[utf8]
    flat = copy.copy(message)
    del flat["Bcc"]
    return Outgoing(sender, tuple(recipients), flat.as_bytes(policy=policy), utf8)


_POLICIES = {
    False: email.policy.SMTP.clone(max_line_length=998),
    True: email.policy.SMTPUTF8.clone(max_line_length=998),
}
