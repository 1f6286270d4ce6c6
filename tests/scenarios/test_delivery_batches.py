"""Timers written in bulk and emails sent in batches over kept-open SMTP sessions: every
enrollment still gets exactly one email, a database error in a bulk write falls back to
one savepoint per enrollment, and a batch never sends a message twice. Both databases."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from tests.support.journey_env import JourneyEnv
from whenthen import messaging
from whenthen.messaging.adapters.smtp import SmtpSender
from whenthen.messaging.smtp_sink import SmtpSink
from whenthen.messaging.tables import messages
from whenthen.settings import EmailSettings

PEOPLE = 30

WAIT_THEN_MAIL: dict[str, Any] = {
    "key": "later",
    "name": "A day later",
    "trigger": {"kind": "event", "event": "Signed Up"},
    "start": "wait",
    "nodes": {
        "wait": {"kind": "delay", "duration": "1d", "next": "mail"},
        "mail": {"kind": "send_email", "email": {"subject": "Hi {{ traits.name }}", "text": "A day later."}},
    },
}


def sign_up(env: JourneyEnv, count: int) -> None:
    env.calls(
        *[
            {"type": "identify", "userId": f"u{i}", "traits": {"email": f"u{i}@example.com", "name": f"U{i}"}}
            for i in range(count)
        ]
    )
    env.calls(*[{"type": "track", "userId": f"u{i}", "event": "Signed Up"} for i in range(count)])


def test_timers_falling_due_together_send_one_email_each(env: JourneyEnv) -> None:
    env.publish(WAIT_THEN_MAIL)
    sign_up(env, PEOPLE)
    assert env.sink.messages() == []
    env.advance(days=1)
    got = sorted(m.recipients[0] for m in env.sink.messages())
    assert got == sorted(f"u{i}@example.com" for i in range(PEOPLE))
    assert {m.subject for m in env.mail_to("u7@example.com")} == {"Hi U7"}
    assert [e["status"] for e in env.enrollments("u3")] == ["completed"]
    env.advance(days=1)
    assert len(env.sink.messages()) == PEOPLE  # nothing fires or sends twice


def test_a_failed_bulk_write_falls_back_to_one_enrollment_at_a_time(
    env: JourneyEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.publish(WAIT_THEN_MAIL)
    sign_up(env, 5)
    calls = {"n": 0}
    real = messaging.enqueue_many

    def failing_once(conn: Any, items: Any, now: Any) -> int:
        if items:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        return real(conn, items, now)

    monkeypatch.setattr(messaging, "enqueue_many", failing_once)
    env.advance(days=1)
    assert calls["n"] == 1  # the careful pass writes enrollment by enrollment (enqueue)
    assert sorted(m.recipients[0] for m in env.sink.messages()) == [f"u{i}@example.com" for i in range(5)]
    assert all(e["status"] == "completed" for i in range(5) for e in env.enrollments(f"u{i}"))


def test_jobs_for_a_message_already_sent_in_one_batch_send_nothing(env: JourneyEnv) -> None:
    env.publish(WAIT_THEN_MAIL)
    sign_up(env, 1)
    env.advance(days=1)
    [message] = env.sink.messages()
    with env.c.db.read() as conn:
        row = conn.execute(
            select(messages).where(messages.c.id == message.message["X-Whenthen-Message-Id"])
        ).one()
    with env.c.db.write() as conn:
        # Two more jobs for the same message, already sent: neither sends it again.
        for _ in range(2):
            messaging.enqueue_job(
                conn, env.ws.id, "email", {"message_id": row.id, "email": {}}, env.clock.now()
            )
    env.advance(minutes=1)
    assert len(env.sink.messages()) == 1


def message(to: str, subject: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "shop@example.com"
    m["To"] = to
    m["Subject"] = subject
    m.set_content("hello")
    return m


def test_the_sender_keeps_its_sessions_open_and_keeps_one_recipients_order() -> None:
    with SmtpSink() as sink:
        sender = SmtpSender(EmailSettings(smtp_host=sink.host, smtp_port=sink.port), connections=3)
        try:
            batch = [message(f"p{i % 4}@example.com", f"m{i}") for i in range(12)]
            assert all(d.accepted for d in sender.send_many(batch))
            sessions = {id(client) for client, _ in sender._idle}
            assert len(sessions) == 3
            assert all(d.accepted for d in sender.send_many(batch[:6]))
            assert {id(client) for client, _ in sender._idle} <= sessions  # reused, not reopened
            assert sender.send(message("p9@example.com", "alone")).accepted
        finally:
            sender.close()
        got = sink.messages()
        assert len(got) == 19
        for person in range(4):
            subjects = [m.subject for m in got[:12] if m.recipients == (f"p{person}@example.com",)]
            assert subjects == [f"m{i}" for i in range(person, 12, 4)]


def test_a_session_the_server_dropped_is_replaced_without_losing_the_message() -> None:
    with SmtpSink() as sink:
        sender = SmtpSender(EmailSettings(smtp_host=sink.host, smtp_port=sink.port), connections=1)
        try:
            assert sender.send(message("a@example.com", "one")).accepted
            [(client, _)] = sender._idle
            client.close()  # as a server closing an idle session looks from here
            assert sender.send(message("a@example.com", "two")).accepted
        finally:
            sender.close()
        assert [m.subject for m in sink.messages()] == ["one", "two"]
