"""SMTP delivery with aiosmtplib (host, port, TLS, auth from settings)."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage

import aiosmtplib

from whenthen.messaging.ports import Delivery
from whenthen.settings import EmailSettings


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
            errors, response = self._loop.run_until_complete(
                aiosmtplib.send(
                    message,
                    hostname=s.smtp_host,
                    port=s.smtp_port,
                    username=s.smtp_username,
                    password=s.smtp_password.get_secret_value() if s.smtp_password else None,
                    use_tls=security == "tls",
                    start_tls=security == "starttls",
                    timeout=s.smtp_timeout_seconds,
                )
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return Delivery(accepted=False, detail=f"recipient refused: {exc}", permanent=True)
        except aiosmtplib.SMTPResponseException as exc:
            return Delivery(
                accepted=False, detail=f"{exc.code} {exc.message}", permanent=500 <= exc.code < 600
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return Delivery(accepted=False, detail=f"{type(exc).__name__}: {exc}")
        if errors:
            return Delivery(accepted=False, detail=f"refused: {errors}", permanent=True)
        return Delivery(accepted=True, detail=response)

    def close(self) -> None:
        self._loop.close()
