"""Messages written as bytes by ``build_email`` go to the SMTP server as they are
(``SmtpSender.send_outgoing``); a sender that only offers the port's
``send(EmailMessage)`` still gets the message, parsed from those bytes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from tests.support.journey_env import JourneyEnv
from tests.support.workspace import make_workspace
from whenthen.bootstrap import build
from whenthen.kernel.clock import ManualClock
from whenthen.messaging.adapters.smtp import SmtpSender
from whenthen.messaging.dispatch import OutgoingSender
from whenthen.messaging.email import Addressing, Outgoing, build_email
from whenthen.messaging.ports import Delivery, EmailBatchSender
from whenthen.messaging.smtp_sink import SmtpSink
from whenthen.settings import EmailSettings, Settings

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def built(message_id: str, recipient: str, subject: str) -> Outgoing:
    a = Addressing("https://mail.example.com", b"k", "ws_1", "prf_1", message_id)
    return build_email(
        a=a,
        sender="Zoë <shop@example.com>",
        recipient=recipient,
        subject=subject,
        html="<p>Grüße <a href='https://x.com/a'>x</a></p>",
        text="Grüße\n.\nhttps://x.com/a",
        reply_to=None,
        marketing=True,
        now=NOW,
    ).outgoing


def test_outgoing_messages_arrive_as_built() -> None:
    sent = [built(f"msg_{i}", f"p{i % 3}@example.com", f"Grüße {i} ☕") for i in range(7)]
    with SmtpSink() as sink:
        sender = SmtpSender(EmailSettings(smtp_host=sink.host, smtp_port=sink.port), connections=2)
        try:
            assert all(d.accepted for d in sender.send_outgoing(sent))
        finally:
            sender.close()
        got = {str(m.message["X-Whenthen-Message-Id"]): m for m in sink.messages()}
    assert sorted(got) == sorted(f"msg_{i}" for i in range(7))
    for i, outgoing in enumerate(sent):
        m = got[f"msg_{i}"]
        assert m.sender == "shop@example.com"
        assert m.recipients == outgoing.recipients
        assert m.subject == f"Grüße {i} ☕"
        assert str(m.message["From"]) == "Zoë <shop@example.com>"
        assert m.body("plain").replace("\r\n", "\n").startswith("Grüße\n.\nhttps://mail.example.com/t/c/")
        assert "Grüße" in m.body("html")


def test_a_message_without_an_envelope_is_refused_without_a_session() -> None:
    empty = built("msg_1", "ann@example.com", "x")._replace(sender="")
    with SmtpSink() as sink:
        sender = SmtpSender(EmailSettings(smtp_host=sink.host, smtp_port=sink.port))
        try:
            [refused, accepted] = sender.send_outgoing([empty, built("msg_2", "bob@example.com", "y")])
        finally:
            sender.close()
        assert not refused.accepted
        assert refused.permanent
        assert refused.detail.startswith("cannot send: a message needs a From address")
        assert accepted.accepted
        assert [m.recipients for m in sink.messages()] == [("bob@example.com",)]


def test_the_number_of_sessions_comes_from_the_settings(
    monkeypatch: pytest.MonkeyPatch, db_url: str, clock: ManualClock
) -> None:
    monkeypatch.setenv("WHENTHEN_EMAIL__SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("WHENTHEN_EMAIL__SMTP_CONNECTIONS", "3")
    settings = Settings(database_url=db_url, secret_key="s", demo_workspace=False)
    c = build(settings, clock=clock)
    try:
        sender = c.dispatcher.handlers["email"].sender  # type: ignore[attr-defined]
        assert isinstance(sender, SmtpSender)
        assert sender.connections == 3
    finally:
        c.close()
    monkeypatch.setenv("WHENTHEN_EMAIL__SMTP_CONNECTIONS", "0")
    with pytest.raises(ValueError, match="smtp_connections"):
        Settings(database_url=db_url, secret_key="s")


class PortOnlySender:
    """A sender offering only the port (``send(EmailMessage)``), as a test double or
    another provider would."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    def send(self, message: EmailMessage) -> Delivery:
        self.messages.append(message)
        return Delivery(accepted=True, detail="250 ok")


class BatchPortSender(PortOnlySender):
    def send_many(self, messages: Sequence[EmailMessage]) -> list[Delivery]:
        return [self.send(m) for m in messages]


def test_the_port_senders_are_told_apart() -> None:
    smtp = SmtpSender(EmailSettings(smtp_host="127.0.0.1"))
    try:
        assert isinstance(smtp, OutgoingSender)
    finally:
        smtp.close()
    assert not isinstance(PortOnlySender(), OutgoingSender)
    assert not isinstance(PortOnlySender(), EmailBatchSender)
    assert isinstance(BatchPortSender(), EmailBatchSender)


HELLO = {
    "key": "hello",
    "name": "Hello",
    "trigger": {"kind": "event", "event": "Signed Up"},
    "start": "mail",
    "nodes": {
        "mail": {
            "kind": "send_email",
            "email": {"subject": "Hi {{ traits.name }}", "text": "Welcome, {{ traits.name }}."},
        }
    },
}


@pytest.mark.parametrize("kind", [PortOnlySender, BatchPortSender])
def test_senders_without_send_outgoing_get_the_parsed_message(
    db_url: str, clock: ManualClock, kind: type[PortOnlySender]
) -> None:
    fake = kind()
    settings = Settings(
        database_url=db_url,
        secret_key="wire-secret",
        sqlite_synchronous="NORMAL",
        demo_workspace=False,
        public_url="http://testserver",
        email=EmailSettings(from_address="Shop <shop@example.com>"),
    )
    c = build(settings, clock=clock, email_sender=fake)
    try:
        with SmtpSink() as sink:
            env = JourneyEnv(c=c, clock=clock, ws=make_workspace(c), sink=sink)
            env.publish(HELLO)
            env.identify("u1", email="u1@example.com", name="Zoë")
            env.track("u1", "Signed Up")
    finally:
        c.close()
    [m] = fake.messages
    assert str(m["Subject"]) == "Hi Zoë"
    assert str(m["To"]) == "u1@example.com"
    body = m.get_body(("plain",))
    assert body is not None
    assert "Welcome, Zoë." in body.get_content()
