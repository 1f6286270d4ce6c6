"""SMTP delivery with aiosmtplib (host, port, TLS, auth from settings).

The message is serialised here, not by aiosmtplib: aiosmtplib folds headers at 78
characters, and a header holding one long URL without spaces (``List-Unsubscribe``) can
only be folded by turning it into an RFC 2047 encoded word, which is not allowed in that
header and which mail providers do not decode: one-click unsubscribe would silently break.
Lines may be up to 998 characters (RFC 5322), so such headers are sent as they are.
"""

from __future__ import annotations

import asyncio
import copy
import email.policy
from collections.abc import Coroutine
from email.message import EmailMessage
from typing import Any, TypeVar

import aiosmtplib
from aiosmtplib.email import extract_recipients, extract_sender

from whenthen.messaging.ports import Delivery
from whenthen.settings import EmailSettings

T = TypeVar("T")


class SmtpSender:
    """Sends each message over its own SMTP session, on an event loop owned by this sender
    (the dispatcher calls it from its worker thread)."""

    def __init__(self, settings: EmailSettings) -> None:
        if not settings.smtp_host:
            raise ValueError("SmtpSender needs email.smtp_host")
        self.settings = settings
        self._loop = asyncio.new_event_loop()

    def send(self, message: EmailMessage) -> Delivery:
        s = self.settings
        security = s.smtp_security.lower()
        try:
            sender, recipients, data, utf8 = serialise(message)
        except ValueError as exc:
            return Delivery(accepted=False, detail=f"cannot send: {exc}", permanent=True)
        try:
            errors, response = self._run(self._session(sender, recipients, data, utf8, security))
        except aiosmtplib.SMTPRecipientsRefused as exc:
            # 4xx at RCPT (greylisting, mailbox busy) is temporary: only 5xx is final.
            permanent = all(500 <= r.code < 600 for r in exc.recipients)
            answers = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            return Delivery(accepted=False, detail=f"recipient refused: {answers}", permanent=permanent)
        except aiosmtplib.SMTPResponseException as exc:
            return Delivery(
                accepted=False, detail=f"{exc.code} {exc.message}", permanent=500 <= exc.code < 600
            )
        except aiosmtplib.SMTPNotSupported as exc:  # e.g. SMTPUTF8 needed, not offered
            return Delivery(accepted=False, detail=f"not supported by the server: {exc}", permanent=True)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return Delivery(accepted=False, detail=f"{type(exc).__name__}: {exc}")
        if errors:
            return Delivery(accepted=False, detail=f"refused: {errors}", permanent=True)
        return Delivery(accepted=True, detail=response)

    def _run(self, session: Coroutine[Any, Any, T]) -> T:
        try:
            result = self._loop.run_until_complete(session)
        except BaseException:
            # A failed session leaves transport close callbacks scheduled (after STARTTLS the
            # socket is only released on the next loop iterations): let them run. Only on
            # failure: a 10 ms pause after every email capped delivery at ~65 a second.
            self._loop.run_until_complete(asyncio.sleep(0.01))
            raise
        # One loop iteration runs the close callbacks QUIT scheduled, so the socket is
        # released now rather than at garbage collection.
        self._loop.run_until_complete(asyncio.sleep(0))
        return result

    async def _session(
        self, sender: str, recipients: list[str], data: bytes, utf8: bool, security: str
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """One SMTP session; the connection is closed whatever happens (``aiosmtplib.send``
        leaves it open when AUTH fails)."""
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            use_tls=security == "tls",
            start_tls=security == "starttls",
            timeout=s.smtp_timeout_seconds,
            cert_bundle=s.smtp_ca_file,
        )
        async with client:
            if s.smtp_username:
                password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                await client.login(s.smtp_username, password)
            return await client.sendmail(
                sender, recipients, data, mail_options=["SMTPUTF8"] if utf8 else None
            )

    def close(self) -> None:
        self._loop.run_until_complete(asyncio.sleep(0.01))  # anything still closing
        self._loop.close()


def serialise(message: EmailMessage) -> tuple[str, list[str], bytes, bool]:
    """Envelope sender, recipients, the bytes to send (Bcc removed, CRLF line ends, lines
    up to 998 characters) and whether SMTPUTF8 is needed (non-ASCII addresses)."""
    sender = extract_sender(message)
    recipients = extract_recipients(message)
    if not sender or not recipients:
        raise ValueError("a message needs a From address and at least one recipient")
    utf8 = not (sender + "".join(recipients)).isascii()
    policy = (email.policy.SMTPUTF8 if utf8 else email.policy.SMTP).clone(max_line_length=998)
    flat = copy.copy(message)
    del flat["Bcc"]
    return sender, recipients, flat.as_bytes(policy=policy), utf8
