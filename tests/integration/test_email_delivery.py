"""Email nodes end to end through the outbox dispatcher: a real SMTP server (a local sink),
the local mailbox when no SMTP server is configured, refusals, an unreachable server with
retries, and idempotency (re-running, re-queueing, the crash window), on SQLite and
PostgreSQL."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import pytest
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.support.journey_env import JourneyEnv
from tests.support.workspace import make_workspace
from whenthen import messaging, profiles
from whenthen.api.app import create_app
from whenthen.bootstrap import build
from whenthen.kernel.clock import ManualClock
from whenthen.messaging.links import verify
from whenthen.messaging.smtp_sink import Received, SmtpSink
from whenthen.messaging.tables import messages, outbox
from whenthen.settings import EmailSettings, Settings

PUBLIC = "http://testserver"
MAX_ATTEMPTS = 3

HTML = """<html><body>
<p>Hello {{ traits.first_name }},</p>
<p><a href="https://shop.example.com/cart?id={{ event.properties.cart }}&amp;utm=mail">Your cart</a>
<a href='https://shop.example.com/help'>Help</a>
<a href="mailto:help@example.com">Write to us</a> <a href="#top">Top</a></p>
</body></html>"""

TEXT = """Hello {{ traits.first_name }},
Your cart: https://shop.example.com/cart?id={{ event.properties.cart }}&utm=mail.
Write to help@example.com."""


def journey(email: dict[str, Any], *, marketing: bool = True, key: str = "cart") -> dict[str, Any]:
    return {
        "key": key,
        "name": "Cart",
        "trigger": {"kind": "event", "event": "Cart Saved"},
        "entry": {"frequency": "every_time"},
        "start": "mail",
        "nodes": {"mail": {"kind": "send_email", "marketing": marketing, "email": email}},
    }


DEFAULT_EMAIL = {"subject": "{{ traits.first_name }}, your cart is saved", "html": HTML, "text": TEXT}


@dataclass
class MailEnv(JourneyEnv):
    http: TestClient

    def messages(self) -> list[dict[str, Any]]:
        pid = self.profile("ann").id
        r = self.http.get(f"/api/v1/profiles/{pid}/messages", headers=self.ws.admin_headers)
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data

    def message(self) -> dict[str, Any]:
        [msg] = self.messages()
        return msg

    def row(self, message_id: str) -> Any:
        with self.c.db.read() as conn:
            return conn.execute(select(messages).where(messages.c.id == message_id)).one()

    def jobs(self) -> list[Any]:
        with self.c.db.read() as conn:
            return list(conn.execute(select(outbox).where(outbox.c.kind == "email")))

    def ann_saves_a_cart(self, cart: str = "c-1", **traits: Any) -> None:
        self.identify("ann", **{"email": "ann@example.com", "first_name": "Ann", **traits})
        self.track("ann", "Cart Saved", cart=cart)


@contextmanager
def mail_env(
    db_url: str,
    clock: ManualClock,
    smtp: Literal["sink", "none", "unreachable"] | tuple[str, int] = "sink",
) -> Iterator[MailEnv]:
    host: str | None
    with SmtpSink() as sink:
        if smtp == "sink":
            host, port = sink.host, sink.port
        elif smtp == "unreachable":
            host, port = "127.0.0.1", _free_port()
        elif smtp == "none":
            host, port = None, 25
        else:
            host, port = smtp
        settings = Settings(
            database_url=db_url,
            secret_key="mail-secret",
            sqlite_synchronous="NORMAL",
            demo_workspace=False,
            public_url=PUBLIC,
            email=EmailSettings(
                smtp_host=host,
                smtp_port=port,
                smtp_timeout_seconds=5,
                from_address="Shop <shop@example.com>",
                max_attempts=MAX_ATTEMPTS,
            ),
        )
        c = build(settings, clock=clock)
        try:
            with TestClient(create_app(c, run_worker=False)) as http:
                yield MailEnv(c=c, clock=clock, ws=make_workspace(c), sink=sink, http=http)
        finally:
            c.close()


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def env(db_url: str, clock: ManualClock) -> Iterator[MailEnv]:
    with mail_env(db_url, clock) as e:
        yield e


def hrefs(html: str) -> list[str]:
    return re.findall(r"""href=["']([^"']+)["']""", html)


def token_of(url: str, kind: str, secret: bytes = b"mail-secret") -> dict[str, Any]:
    prefix = f"{PUBLIC}/t/{kind}/"
    assert url.startswith(prefix), url
    return verify(secret, url.removeprefix(prefix).replace("&amp;", "&"))


def test_headers_parts_tracked_links_and_pixel(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    [mail] = env.mail_to("ann@example.com")
    msg = env.message()
    m = mail.message
    assert mail.sender == "shop@example.com"
    assert mail.recipients == ("ann@example.com",)
    assert m["From"] == "Shop <shop@example.com>"
    assert m["To"] == "ann@example.com"
    assert mail.subject == "Ann, your cart is saved"
    # Message-ID is derived from the message id: the same on a retry or a duplicate.
    assert m["Message-ID"] == f"<{msg['id']}@example.com>"
    assert m["X-Whenthen-Message-Id"] == msg["id"]
    assert parsedate_to_datetime(str(m["Date"])) == env.clock.now()
    # One-click unsubscribe (RFC 8058).
    unsubscribe = str(m["List-Unsubscribe"])
    assert unsubscribe.startswith(f"<{PUBLIC}/t/u/")
    assert unsubscribe.endswith(">")
    assert token_of(unsubscribe.strip("<>"), "u") == {
        "k": "unsubscribe",
        "w": env.ws.id,
        "p": env.profile("ann").id,
        "m": msg["id"],
    }
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # On the wire the header is the bare URL, not an RFC 2047 encoded word (which mail
    # providers do not decode in List-Unsubscribe: one-click would silently break).
    raw = {name: value for name, value in m.raw_items()}
    assert raw["List-Unsubscribe"] == unsubscribe
    # multipart/alternative: text first, then HTML.
    assert m.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in m.iter_parts()] == ["text/plain", "text/html"]

    html = mail.body("html")
    links = hrefs(html)
    cart_url = "https://shop.example.com/cart?id=c-1&utm=mail"
    assert "https://shop.example.com" not in " ".join(links)  # every web link is tracked
    tracked = [u for u in links if u.startswith(f"{PUBLIC}/t/c/")]
    assert [token_of(u, "c")["u"] for u in tracked] == [cart_url, "https://shop.example.com/help"]
    assert "mailto:help@example.com" in links
    assert "#top" in links
    # A visible unsubscribe link (a footer: the template has none) and the open pixel,
    # inside the body.
    assert unsubscribe.strip("<>") in [u.replace("&amp;", "&") for u in links]
    pixel = re.search(r'<img src="([^"]+)" width="1" height="1"', html)
    assert pixel is not None
    assert token_of(pixel.group(1), "o")["k"] == "open"
    assert html.index(pixel.group(0)) < html.index("</body>")

    text = mail.body("plain")
    assert "https://shop.example.com" not in text
    # The sentence's full stop stays outside the link.
    [text_link] = re.findall(rf"Your cart: ({PUBLIC}/t/c/\S+)\.\r?\n", text)
    assert token_of(text_link, "c")["u"] == cart_url
    assert "help@example.com" in text
    assert f"Unsubscribe: {unsubscribe.strip('<>')}" in text

    # The message log keeps what was sent.
    assert msg["status"] == "sent"
    assert msg["delivered"] is True
    assert msg["attempts"] == 1
    assert msg["recipient"] == "ann@example.com"
    assert msg["subject"] == "Ann, your cart is saved"
    assert msg["links"] == [cart_url, "https://shop.example.com/help"]
    # (SMTP carries CRLF line ends; the log keeps the message as built.)
    assert msg["body_html"] == html.replace("\r\n", "\n")
    assert msg["body_text"] == text.replace("\r\n", "\n")
    assert msg["node"] == "mail"


def test_the_template_unsubscribe_url_replaces_the_footer(env: MailEnv) -> None:
    env.publish(
        journey(
            {
                "subject": "News",
                "html": '<p>News</p><p><a href="{{ unsubscribe_url }}">Stop these emails</a></p>',
                "text": "News\nStop: {{ unsubscribe_url }}",
            }
        )
    )
    env.ann_saves_a_cart()
    [mail] = env.mail_to("ann@example.com")
    url = str(mail.message["List-Unsubscribe"]).strip("<>")
    html, text = mail.body("html"), mail.body("plain")
    assert hrefs(html) == [url]  # the template's own link, untouched, and no footer
    assert "Stop these emails" in html
    assert ">Unsubscribe<" not in html
    assert text.count(url) == 1
    assert "Unsubscribe:" not in text
    assert env.message()["links"] == []


def test_traits_are_escaped_in_html_but_not_in_text(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart(first_name='<b>Tom & "Jerry"</b>')
    [mail] = env.mail_to("ann@example.com")
    assert mail.subject == '<b>Tom & "Jerry"</b>, your cart is saved'
    html, text = mail.body("html"), mail.body("plain")
    assert "Hello &lt;b&gt;Tom &amp; &#34;Jerry&#34;&lt;/b&gt;," in html
    assert "<b>Tom" not in html
    assert 'Hello <b>Tom & "Jerry"</b>,' in text


def test_transactional_mail_has_no_unsubscribe_and_ignores_it(env: MailEnv) -> None:
    env.publish(
        journey({"subject": "Receipt", "text": "Thanks: https://shop.example.com/o/1"}, marketing=False)
    )
    env.identify("ann", email="ann@example.com")
    with env.c.db.write() as conn:
        profiles.set_consent(
            conn, env.ws.id, env.profile("ann").id, "email", "unsubscribed", source="t", now=env.clock.now()
        )
    env.track("ann", "Cart Saved", cart="c-1")
    [mail] = env.mail_to("ann@example.com")
    assert mail.message["List-Unsubscribe"] is None
    assert mail.message["List-Unsubscribe-Post"] is None
    assert "Unsubscribe" not in mail.body("plain")
    assert f"{PUBLIC}/t/c/" in mail.body("plain")  # links are still tracked
    assert env.message()["status"] == "sent"


def test_marketing_mail_to_an_unsubscribed_person_is_skipped(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.identify("ann", email="ann@example.com")
    with env.c.db.write() as conn:
        profiles.set_consent(
            conn, env.ws.id, env.profile("ann").id, "email", "unsubscribed", source="t", now=env.clock.now()
        )
    env.track("ann", "Cart Saved", cart="c-1")
    assert env.sink.messages() == []
    msg = env.message()
    assert (msg["status"], msg["reason"], msg["delivered"]) == ("skipped", "unsubscribed", False)


def test_a_person_without_an_address_is_skipped(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.identify("ann", first_name="Ann")
    env.track("ann", "Cart Saved", cart="c-1")
    assert env.sink.messages() == []
    assert (env.message()["status"], env.message()["reason"]) == ("skipped", "no email address")


def test_a_template_failing_at_render_time_fails_the_message(env: MailEnv) -> None:
    env.publish(journey({"subject": "Loop", "text": "{% for i in (1..20000) %}x{% endfor %}"}))
    env.ann_saves_a_cart()
    env.advance(hours=2)
    assert env.sink.messages() == []
    msg = env.message()
    assert msg["status"] == "failed"
    assert msg["reason"] == "template: loop iteration limit reached"
    assert [j.done_at is not None for j in env.jobs()] == [True]


def test_without_smtp_mail_is_captured_in_the_mailbox(db_url: str, clock: ManualClock) -> None:
    with mail_env(db_url, clock, smtp="none") as env:
        env.publish(journey(DEFAULT_EMAIL))
        env.ann_saves_a_cart()
        env.advance(hours=1)
        assert env.sink.messages() == []
        msg = env.message()
        assert msg["status"] == "captured"
        assert msg["delivered"] is False
        assert msg["reason"] == "no SMTP server configured: not delivered"
        r = env.http.get("/api/v1/mailbox", headers=env.ws.admin_headers)
        assert r.status_code == 200
        box = r.json()
        assert box["delivered"] is False
        [item] = box["data"]
        assert item == msg
        assert item["subject"] == "Ann, your cart is saved"
        assert item["recipient"] == "ann@example.com"
        assert "Hello Ann," in item["body_text"]
        assert f"{PUBLIC}/t/o/" in item["body_html"]
        # The mailbox is the workspace's own.
        other = make_workspace(env.c, "Other")
        r = env.http.get("/api/v1/mailbox", headers=other.admin_headers)
        assert r.json()["data"] == []
        assert env.http.get("/api/v1/mailbox").status_code == 401


def test_a_permanent_refusal_fails_without_retry(env: MailEnv) -> None:
    env.sink.refuse_with = "550 no such user"
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    env.advance(hours=2)
    env.advance(hours=2)
    msg = env.message()
    assert msg["status"] == "failed"
    assert msg["attempts"] == 1
    assert "550" in msg["reason"]
    assert "no such user" in msg["reason"]
    assert env.sink.messages() == []
    [job] = env.jobs()
    assert job.done_at is not None
    assert job.attempts == 1


def test_a_temporary_refusal_is_retried(env: MailEnv) -> None:
    env.sink.refuse_with = "451 try again later"
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    msg = env.message()
    assert (msg["status"], msg["attempts"]) == ("retrying", 1)
    assert "451" in msg["reason"]
    env.sink.refuse_with = None
    env.advance(seconds=15)
    assert len(env.mail_to("ann@example.com")) == 1
    msg = env.message()
    assert (msg["status"], msg["attempts"], msg["reason"]) == ("sent", 2, None)


class RcptScript:
    """An SMTP server (aiosmtpd) that answers RCPT TO from a script, then accepts."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.delivered: list[bytes] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=_free_port())

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self.answers:
            return self.answers.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.delivered.append(bytes(envelope.content))
        return "250 Message accepted"

    def __enter__(self) -> tuple[str, int]:
        self.controller.start()
        return "127.0.0.1", int(self.controller.port)

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def test_a_greylisted_recipient_is_retried(db_url: str, clock: ManualClock) -> None:
    """4xx at RCPT TO (greylisting) is temporary, not a refusal."""
    script = RcptScript("451 4.7.1 Greylisted, try again later")
    with script as address, mail_env(db_url, clock, smtp=address) as env:
        env.publish(journey(DEFAULT_EMAIL))
        env.ann_saves_a_cart()
        msg = env.message()
        assert (msg["status"], msg["attempts"]) == ("retrying", 1)
        assert "451" in msg["reason"]
        env.advance(seconds=15)
        assert (env.message()["status"], env.message()["attempts"]) == ("sent", 2)
    assert len(script.delivered) == 1


def test_an_unknown_recipient_fails_at_once(db_url: str, clock: ManualClock) -> None:
    script = RcptScript("550 5.1.1 No such user", "550 5.1.1 No such user")
    with script as address, mail_env(db_url, clock, smtp=address) as env:
        env.publish(journey(DEFAULT_EMAIL))
        env.ann_saves_a_cart()
        env.advance(hours=1)
        msg = env.message()
        assert (msg["status"], msg["attempts"]) == ("failed", 1)
        assert "550" in msg["reason"]
        assert "No such user" in msg["reason"]
    assert script.delivered == []


def test_an_unreachable_server_is_retried_with_backoff_then_fails(db_url: str, clock: ManualClock) -> None:
    with mail_env(db_url, clock, smtp="unreachable") as env:
        env.publish(journey(DEFAULT_EMAIL))
        env.ann_saves_a_cart()
        msg = env.message()
        assert (msg["status"], msg["attempts"]) == ("retrying", 1)
        assert "Connect" in msg["reason"]
        [job] = env.jobs()
        assert job.done_at is None
        assert job.available_at == clock.now() + timedelta(seconds=15)
        env.advance(seconds=14)
        assert env.message()["attempts"] == 1  # not due yet
        env.advance(seconds=1)
        assert env.message()["attempts"] == 2
        [job] = env.jobs()
        assert job.available_at == clock.now() + timedelta(seconds=30)
        env.advance(seconds=30)
        msg = env.message()
        assert (msg["status"], msg["attempts"]) == ("failed", MAX_ATTEMPTS)
        assert msg["delivered"] is False
        [job] = env.jobs()
        assert job.done_at is not None
        env.advance(days=1)
        assert env.message()["attempts"] == MAX_ATTEMPTS


def test_erasure_before_a_retry_sends_nothing(env: MailEnv) -> None:
    env.sink.refuse_with = "451 try again later"
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    assert env.message()["status"] == "retrying"
    env.sink.refuse_with = None
    pid = env.profile("ann").id
    assert env.http.delete(f"/api/v1/profiles/{pid}", headers=env.ws.admin_headers).status_code == 200
    env.advance(hours=1)
    assert env.sink.messages() == []
    # Done (nothing to send; the erasure removed the message row): the job left the outbox.
    assert env.jobs() == []


def test_running_the_dispatcher_again_never_sends_twice(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    for _ in range(3):
        assert env.c.dispatcher.run_once() == 0
        env.advance(hours=1)
    assert len(env.sink.messages()) == 1


def requeue(env: MailEnv, message_id: str) -> bool:
    """Queue the message's idempotency key again, as a replayed journey step would."""
    row = env.row(message_id)
    with env.c.db.write() as conn:
        return messaging.enqueue(
            conn,
            messaging.Queued(
                ws=env.ws.id,
                channel="email",
                message_id="msg_another_id",
                idempotency_key=row.idempotency_key,
                profile_id=row.profile_id,
                journey_id=row.journey_id,
                enrollment_id=row.enrollment_id,
                node=row.node,
                payload={"email": DEFAULT_EMAIL, "marketing": True, "context": {}},
            ),
            env.clock.now(),
        )


def test_requeueing_the_same_idempotency_key_never_sends_twice(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    msg = env.message()
    requeue(env, msg["id"])
    env.advance(hours=1)
    assert len(env.sink.messages()) == 1
    assert [m["id"] for m in env.messages()] == [msg["id"]]
    assert env.message()["status"] == "sent"


def test_requeueing_reports_the_duplicate_and_queues_no_job(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    msg = env.message()
    assert env.jobs() == []  # sent: its job left the outbox
    assert requeue(env, msg["id"]) is False
    assert env.jobs() == []


def test_a_job_rerun_after_the_send_was_recorded_sends_nothing(env: MailEnv) -> None:
    """The crash window: the provider accepted the mail and the message row says so, but
    the job was not closed (the worker died): it runs again after its lease. Running it
    again must not resend."""
    info = env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart()
    assert env.jobs() == []  # sent and closed: the job left the outbox
    msg = env.message()
    # The job as it was before its close (which the crash lost), due again.
    payload = {
        "message_id": msg["id"],
        "template": {"journey": info.id, "version": 1, "node": "mail"},
        "marketing": True,
        "context": {},
    }
    with env.c.db.write() as conn:
        messaging.enqueue_job(conn, env.ws.id, "email", payload, env.clock.now())
    env.c.worker.drain()
    assert len(env.sink.messages()) == 1
    assert env.jobs() == []  # it ran again, and closed
    msg = env.message()
    assert (msg["status"], msg["attempts"]) == ("sent", 1)


def test_each_enrollment_gets_its_own_email(env: MailEnv) -> None:
    env.publish(journey(DEFAULT_EMAIL))
    env.ann_saves_a_cart("c-1")
    env.track("ann", "Cart Saved", cart="c-2")
    mails: list[Received] = env.mail_to("ann@example.com")
    assert len(mails) == 2
    assert len({str(m.message["Message-ID"]) for m in mails}) == 2
    assert sorted(m["status"] for m in env.messages()) == ["sent", "sent"]


def _queue(env: MailEnv, payload: dict[str, Any], key: str) -> str:
    """Queue an email job for Ann by hand, with ``payload``; returns its message id."""
    with env.c.db.write() as conn:
        assert messaging.enqueue(
            conn,
            messaging.Queued(
                ws=env.ws.id,
                channel="email",
                message_id=f"msg_{key}",
                idempotency_key=key,
                profile_id=env.profile("ann").id,
                journey_id=None,
                enrollment_id=None,
                node="mail",
                payload={**payload, "marketing": True, "context": {"event": {"properties": {"cart": "c-9"}}}},
            ),
            env.clock.now(),
        )
    env.c.worker.drain()
    return f"msg_{key}"


def test_a_journey_email_job_names_its_template_rather_than_carrying_it(
    db_url: str, clock: ManualClock
) -> None:
    with mail_env(db_url, clock, smtp="unreachable") as env:  # the job stays, to be read
        info = env.publish(journey(DEFAULT_EMAIL))
        env.ann_saves_a_cart()
        [job] = env.jobs()
        assert "email" not in job.payload
        assert job.payload["template"] == {"journey": info.id, "version": 1, "node": "mail"}
        assert env.message()["status"] == "retrying"  # built from it: only the connection failed


def test_a_job_queued_with_its_template_inline_is_still_sent(env: MailEnv) -> None:
    # As jobs were queued before ADR 0022 (still in the outbox during an upgrade).
    env.identify("ann", email="ann@example.com", first_name="Ann")
    mid = _queue(env, {"email": DEFAULT_EMAIL}, "inline-1")
    [mail] = env.mail_to("ann@example.com")
    assert mail.subject == "Ann, your cart is saved"
    row = env.row(mid)
    assert row.status == "sent"
    assert row.links[0] == "https://shop.example.com/cart?id=c-9&utm=mail"


def test_a_job_naming_no_email_template_fails_with_the_reason(env: MailEnv) -> None:
    info = env.publish(journey(DEFAULT_EMAIL))
    env.identify("ann", email="ann@example.com", first_name="Ann")
    missing = _queue(env, {"template": {"journey": info.id, "version": 1, "node": "nope"}}, "ref-1")
    draft = _queue(env, {"template": {"journey": info.id, "version": 7, "node": "mail"}}, "ref-2")
    assert env.sink.messages() == []
    for mid, version, node in ((missing, 1, "nope"), (draft, 7, "mail")):
        row = env.row(mid)
        assert row.status == "failed"
        assert row.reason == f"template: no email node {node!r} in version {version} of journey {info.id}"
    # Failed for good: the jobs are closed with the reason, not retried.
    assert {j.last_error for j in env.jobs()} == {
        f"template: no email node 'nope' in version 1 of journey {info.id}",
        f"template: no email node 'mail' in version 7 of journey {info.id}",
    }
    assert all(j.done_at is not None for j in env.jobs())
