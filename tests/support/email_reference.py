"""The email builder as it was before messages were written as bytes directly (commit
1080c3e): ``email.message.EmailMessage`` filled header by header, then flattened by the
SMTP adapter with an ``email.policy.SMTP`` clone. Kept as the reference that the
differential tests (tests/unit/test_email_wire.py) and the micro-benchmark
(``python -m bench.email_build``) compare the new builder against."""

from __future__ import annotations

import copy
import email.policy
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, formatdate

from aiosmtplib.email import extract_recipients, extract_sender

from whenthen.messaging.email import Addressing, _domain, rewrite_html, rewrite_text, unsubscribe_url


def reference_build(
    *,
    a: Addressing,
    sender: str,
    recipient: str,
    subject: str,
    html: str | None,
    text: str | None,
    reply_to: str | None,
    marketing: bool,
    now: datetime | None = None,
) -> tuple[EmailMessage, tuple[str, ...]]:
    """The old ``build_email``: the message and its tracked links."""
    links: list[str] = []
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject.replace("\r", " ").replace("\n", " ")
    msg["Date"] = format_datetime(now) if now is not None else formatdate(localtime=False)
    msg["Message-ID"] = f"<{a.message_id}@{_domain(sender)}>"
    msg["X-Whenthen-Message-Id"] = a.message_id
    if reply_to:
        msg["Reply-To"] = reply_to
    if marketing:
        msg["List-Unsubscribe"] = f"<{unsubscribe_url(a)}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    text_body = rewrite_text(text, a, links, footer=marketing) if text else None
    html_body = rewrite_html(html, a, links, footer=marketing) if html else None
    if text_body is not None:
        msg.set_content(text_body)
        if html_body is not None:
            msg.add_alternative(html_body, subtype="html")
    else:
        assert html_body is not None
        msg.set_content(html_body, subtype="html")
    return msg, tuple(dict.fromkeys(links))


def reference_serialise(message: EmailMessage) -> tuple[str, list[str], bytes, bool]:
    """The old ``adapters.smtp.serialise``: envelope sender, recipients, bytes, SMTPUTF8."""
    sender = extract_sender(message)
    recipients = extract_recipients(message)
    if not sender or not recipients:
        raise ValueError("a message needs a From address and at least one recipient")
    utf8 = not (sender + "".join(recipients)).isascii()
    policy = (email.policy.SMTPUTF8 if utf8 else email.policy.SMTP).clone(max_line_length=998)
    flat = copy.copy(message)
    del flat["Bcc"]
    return sender, recipients, flat.as_bytes(policy=policy), utf8
