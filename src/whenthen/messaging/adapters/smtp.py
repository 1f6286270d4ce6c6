"""SMTP delivery: sessions opened with aiosmtplib (host, port, TLS, auth from settings),
messages handed over by this module's own transaction code on the same connection.

The dispatcher hands over ``Outgoing`` messages (``send_outgoing``): the envelope and the
bytes written by ``whenthen.messaging.email.build_email``. An ``EmailMessage`` (``send``,
``send_many``) is serialised here, not by aiosmtplib: aiosmtplib folds headers at 78
characters, and a header holding one long URL without spaces (``List-Unsubscribe``) can
only be folded by turning it into an RFC 2047 encoded word, which is not allowed in that
header and which mail providers do not decode: one-click unsubscribe would silently break.
Lines may be up to 998 characters (RFC 5322), so such headers are sent as they are.

aiosmtplib connects, says EHLO, starts TLS and logs in; then the session's transport is
handed to :class:`_Replies` and each message is one transaction written here (ADR 0015):
with a server that offers PIPELINING (RFC 2920: Postfix, Exim, the large providers)
``MAIL``, every ``RCPT`` and ``DATA`` go in one write and their replies are read
together, then the content: two round trips a message instead of four. aiosmtplib allows
one command in flight at a time, and its per-command work (a lock, a timeout task, a
regular expression over the whole message) was ~0.3 ms of CPU a message here, about half
the dispatcher's cost per email; this code does the same exchange in ~0.05 ms. Without
PIPELINING the commands go one by one, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.policy
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
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
#: What may not appear in an address on a command line, outside a quoted local part
#: (CR and LF would inject commands, spaces and brackets ESMTP parameters).
_UNSAFE_IN_ADDRESS = re.compile(r"[\s<>\x00-\x1f\x7f]")
_QUOTED_LOCAL_PART = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')
#: A reply longer than this is not an SMTP server talking (RFC 5321 lines are 512 octets).
_MAX_REPLY = 64 * 1024


class SmtpDropped(ConnectionError):
    """The server closed the session (or the connection broke)."""

    #: The message's content had been written: the server may have accepted it.
    content_sent = False


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class _Replies(asyncio.Protocol):
    """The reading side of an open session: the server's replies, parsed as they arrive
    (several at once when commands were pipelined), and the transport's flow control."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._lines: list[str] = []  # a multi-line reply's lines so far
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._lost: BaseException | None = None
        self._paused: asyncio.Future[None] | None = None

    @property
    def open(self) -> bool:
        return self._lost is None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit():
                self._fail(SmtpDropped(f"not an SMTP reply: {line[:80]!r}"))
                return
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                self._replies.append(Reply(int(line[:3]), "\n".join(self._lines)))
                self._lines = []
        del buffer[:start]
        if len(buffer) > _MAX_REPLY:
            self._fail(SmtpDropped("reply too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SmtpDropped("the server closed the session"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(SmtpDropped(f"connection lost: {exc}" if exc else "connection closed"))
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        if not self.transport.is_closing():
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (len(self._replies) >= self._wanted or self._lost):
            waiter.set_result(None)

    def write(self, data: bytes) -> None:
        if not self.open:
            raise self._lost or SmtpDropped("the session is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._paused is not None and not self._paused.done():
            await self._paused

    async def read(self, n: int, seconds: float) -> list[Reply]:
        """The next ``n`` replies, in order; ``TimeoutError`` when they do not all come
        within ``seconds``. (A timer handle of the loop's own rather than
        ``asyncio.timeout``, whose context and task bookkeeping cost more than the wait.)"""
        if len(self._replies) < n:
            if self._lost is not None:
                raise self._lost
            loop = asyncio.get_running_loop()
            self._wanted = n
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(seconds, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if len(self._replies) < n:
                raise self._lost or SmtpDropped("the session is closed")
        return [self._replies.popleft() for _ in range(n)]


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no reply from the SMTP server in time"))


class _Session:
    """An open, logged-in SMTP session and what its server offers."""

    def __init__(self, client: aiosmtplib.SMTP, timeout: float) -> None:
        transport = client.transport
        assert isinstance(transport, asyncio.Transport)
        self.pipelining = client.supports_extension("pipelining")
        self.smtputf8 = client.supports_extension("smtputf8")
        self.size = client.supports_extension("size")
        self.timeout = timeout
        self.replies = _Replies(transport)
        # From here on the connection's bytes come to this session, not to aiosmtplib.
        transport.set_protocol(self.replies)

    @property
    def is_connected(self) -> bool:
        return self.replies.open

    def close(self) -> None:
        if not self.replies.transport.is_closing():
            self.replies.transport.close()

    async def quit(self) -> None:
        self.replies.write(b"QUIT\r\n")
        await self.replies.read(1, self.timeout)

    async def transact(self, item: Outgoing) -> Delivery:
        """One message: its envelope, then its content. A refusal is a ``Delivery``; a
        broken session raises ``SmtpDropped`` (``content_sent`` once the content was
        written) or ``TimeoutError``."""
        sender, recipients, data, utf8 = item
        if utf8 and not self.smtputf8:
            return Delivery(
                accepted=False,
                detail="not supported by the server: SMTPUTF8 (a non-ASCII address)",
                permanent=True,
            )
        data = _as_transmitted(data)
        options = (f" SIZE={len(data)}" if self.size else "") + (" SMTPUTF8" if utf8 else "")
        try:
            envelope = [f"MAIL FROM:<{_address(sender)}>{options}".encode("utf-8" if utf8 else "ascii")]
            envelope += [f"RCPT TO:<{_address(r)}>".encode("utf-8" if utf8 else "ascii") for r in recipients]
        except ValueError as exc:  # UnicodeEncodeError too: a non-ASCII address without SMTPUTF8
            return Delivery(accepted=False, detail=f"cannot send: {exc}", permanent=True)
        envelope.append(b"DATA")
        replies = await self._envelope(envelope)
        mail, answers = replies[0], replies[1 : 1 + len(recipients)]
        data_reply = replies[-1] if len(replies) == len(envelope) else None
        refused = {r: a for r, a in zip(recipients, answers, strict=False) if not a.ok}
        if not mail.ok:
            refusal = Delivery(accepted=False, detail=str(mail), permanent=mail.code >= 500)
        elif len(refused) == len(recipients):
            refusal = Delivery(
                accepted=False,
                detail="recipient refused: " + "; ".join(str(a) for a in refused.values()),
                permanent=all(a.code >= 500 for a in refused.values()),
            )
        elif data_reply is not None and data_reply.code != 354:
            refusal = Delivery(accepted=False, detail=str(data_reply), permanent=data_reply.code >= 500)
        else:
            return await self._content(data, refused)
        await self._close_envelope(mail.ok, data_reply is not None and data_reply.code == 354)
        return refusal

    async def _envelope(self, commands: list[bytes]) -> list[Reply]:
        """MAIL, the RCPTs and DATA: in one write when the server pipelines, else one by
        one, stopping at a refused MAIL or before DATA when every recipient was refused."""
        if self.pipelining:
            self.replies.write(b"".join(c + b"\r\n" for c in commands))
            return await self.replies.read(len(commands), self.timeout)
        replies: list[Reply] = []
        for i, command in enumerate(commands):
            if i == len(commands) - 1 and not any(r.ok for r in replies[1:]):
                break  # no recipient: no DATA
            self.replies.write(command + b"\r\n")
            replies += await self.replies.read(1, self.timeout)
            if i == 0 and not replies[0].ok:
                break
        return replies

    async def _content(self, data: bytes, refused: dict[str, Reply]) -> Delivery:
        try:
            self.replies.write(data + b".\r\n")
            await self.replies.drain()
            [final] = await self.replies.read(1, self.timeout)
        except SmtpDropped as exc:
            exc.content_sent = True
            raise
        if not final.ok:
            return Delivery(accepted=False, detail=str(final), permanent=final.code >= 500)
        if refused:
            # Sent to the others; the refused recipients are final (as aiosmtplib reports).
            return Delivery(accepted=False, detail=f"refused: {refused}", permanent=True)
        return Delivery(accepted=True, detail=final.text)

    async def _close_envelope(self, mail_accepted: bool, content_started: bool) -> None:
        """After a refused envelope: end content the server started anyway (empty), and
        reset an open envelope so the next message starts clean. A session that breaks
        here is closed; the refusal stands."""
        try:
            if content_started:
                self.replies.write(b".\r\n")
                await self.replies.read(1, self.timeout)
            if mail_accepted:
                self.replies.write(b"RSET\r\n")
                await self.replies.read(1, self.timeout)
        except (SmtpDropped, TimeoutError):
            self.close()


def _address(address: str) -> str:
    """The address as it goes between ``<>``; refused when it could smuggle a parameter or
    a command onto the line (as aiosmtplib's own check)."""
    unquoted = _QUOTED_LOCAL_PART.sub("", address, count=1) if address.startswith('"') else address
    if _UNSAFE_IN_ADDRESS.search(unquoted):
        raise ValueError(f"address {address!r} contains characters not permitted in an SMTP mailbox")
    return address


def _as_transmitted(data: bytes) -> bytes:
    """The content as DATA carries it: CRLF line ends (lone CR or LF made CRLF), ending
    with CRLF, lines starting with a dot doubled (RFC 5321 4.5.2)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = re.sub(rb"\r\n|\n|\r", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data


class SmtpSender:
    """Sends messages over SMTP sessions that stay open between messages (a transaction
    per message; no connect, EHLO, STARTTLS, AUTH and QUIT each time), up to
    ``connections`` of them at once, on an event loop owned by this sender (the
    dispatcher calls it from its worker thread).

    ``send_many`` sends a batch concurrently over the sessions; the messages to one
    recipient go over one session, in order. A session that fails is closed; a message
    whose session turns out to have been dropped by the server before it answered
    anything of that message is sent again once over a new one (nothing was accepted)."""

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
        self._idle: list[tuple[_Session, float]] = []

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
        session: _Session | None = None
        try:
            for i in lane:
                results[i], session = await self._one(session, prepared[i])
        finally:
            if session is not None:
                self._idle.append((session, time.monotonic()))

    async def _one(self, session: _Session | None, item: Outgoing) -> tuple[Delivery, _Session | None]:
        for fresh_only in (False, True):
            reused = False
            try:
                if session is None:
                    session, reused = await self._acquire(fresh_only)
                else:
                    reused = True
                return await session.transact(item), session
            except (SmtpDropped, aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                self._discard(session)
                session = None
                if reused and not fresh_only and not getattr(exc, "content_sent", False):
                    # The server had closed the idle session and has nothing of this
                    # message: once more on a new one.
                    continue
                return _refusal(exc), None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                self._discard(session)
                return _refusal(exc), None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self, fresh_only: bool) -> tuple[_Session, bool]:
        """An open session (``True``: reused) or a new one, connected and logged in."""
        while self._idle and not fresh_only:
            session, since = self._idle.pop()
            if session.is_connected and time.monotonic() - since < self.idle_seconds:
                return session, True
            await self._quit(session)
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
            if client.is_ehlo_or_helo_needed:
                # What the server offers (PIPELINING, SMTPUTF8, SIZE) is in its EHLO reply.
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()  # a server without ESMTP
        except BaseException:
            # ``aiosmtplib.send`` leaves the connection open when AUTH fails: close it here.
            client.close()
            raise
        return _Session(client, s.smtp_timeout_seconds), False

    @staticmethod
    def _discard(session: _Session | None) -> None:
        if session is not None:
            session.close()

    async def _quit(self, session: _Session) -> None:
        if session.is_connected:
            with contextlib.suppress(SmtpDropped, ConnectionError, OSError, TimeoutError):
                await session.quit()
        session.close()

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
        for session, _ in idle:
            await self._quit(session)

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._close_idle())
            self._loop.run_until_complete(asyncio.sleep(0.01))  # anything still closing
            self._loop.close()


def _refusal(exc: BaseException) -> Delivery:
    """What a failed session means: permanent (5xx at connect or login, unsupported) or
    temporary (a dropped connection, a timeout, a 4xx)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Delivery(accepted=False, detail=f"{exc.code} {exc.message}", permanent=500 <= exc.code < 600)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
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
