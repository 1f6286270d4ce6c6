"""Tracking links over HTTP: click redirects (never an open redirect), the open pixel,
unsubscribe (GET shows a page, POST unsubscribes: RFC 8058 one-click), and the events they
become in the person's log, on SQLite and PostgreSQL. Mail goes through a real SMTP sink;
the app is called in process with the worker drained explicitly."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.support.journey_env import JourneyEnv
from tests.support.journey_env import env as env  # the fixture
from whenthen import journeys, profiles
from whenthen.api.app import create_app
from whenthen.api.links import PIXEL
from whenthen.messaging.email import Addressing
from whenthen.messaging.links import sign
from whenthen.messaging.smtp_sink import Received
from whenthen.messaging.tables import messages
from whenthen.profiles.tables import consents
from whenthen.tracking.tables import events

SECRET = b"scenario-secret"  # tests/support/journey_env.py
CART = "https://shop.example.com/cart?id=c-1&utm=mail"
HELP = "https://shop.example.com/help"

JOURNEY = {
    "key": "cart",
    "name": "Cart",
    "trigger": {"kind": "event", "event": "Cart Saved"},
    "entry": {"frequency": "every_time"},
    "start": "mail",
    "nodes": {
        "mail": {
            "kind": "send_email",
            "email": {
                "subject": "Your cart",
                "html": (
                    '<p><a href="https://shop.example.com/cart?id={{ event.properties.cart }}&amp;utm=mail">'
                    f'Cart</a> <a href="{HELP}">Help</a></p>'
                ),
            },
        }
    },
}


@dataclass
class Mail:
    """One email as received, with its tracking links."""

    received: Received
    message_id: str
    clicks: dict[str, str]  # original URL -> tracked URL
    open: str
    unsubscribe: str


def mail_of(received: Received) -> Mail:
    html = received.body("html")
    tracked = re.findall(r'href="(http://testserver/t/c/[^"]+)"', html)
    clicks = {_payload(u)["u"]: u for u in tracked}
    [pixel] = re.findall(r'<img src="(http://testserver/t/o/[^"]+)"', html)
    return Mail(
        received=received,
        message_id=str(received.message["X-Whenthen-Message-Id"]),
        clicks=clicks,
        open=pixel,
        unsubscribe=str(received.message["List-Unsubscribe"]).strip("<>"),
    )


def _payload(url: str) -> dict[str, Any]:
    body = url.rsplit("/", 1)[1].split(".")[0]
    data: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return data


@dataclass
class Links:
    env: JourneyEnv
    http: TestClient

    def send_cart_mail(self, user: str = "ann") -> Mail:
        self.env.identify(user, email=f"{user}@example.com")
        self.env.track(user, "Cart Saved", cart="c-1")
        return mail_of(self.env.mail_to(f"{user}@example.com")[-1])

    def get(self, url: str) -> Any:
        return self.http.get(url, follow_redirects=False)

    def one_click(self, url: str) -> Any:
        return self.http.post(
            url,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )

    def events_of(self, user: str, name: str) -> list[dict[str, Any]]:
        """The person's events called ``name``, through the admin API, after the pipeline."""
        self.env.c.worker.drain()
        pid = self.env.profile(user).id
        r = self.http.get(f"/api/v1/profiles/{pid}/events", headers=self.env.ws.admin_headers)
        assert r.status_code == 200, r.text
        return [e for e in r.json()["data"] if e["event"] == name]

    def stored(self, name: str) -> int:
        """Events called ``name`` in the whole log, pending or applied."""
        with self.env.c.db.read() as conn:
            return int(conn.execute(select(func.count()).where(events.c.event == name)).scalar_one())

    def consent(self, user: str) -> str | None:
        with self.env.c.db.read() as conn:
            p = profiles.lookup(conn, self.env.ws.id, user_id=user)
            return profiles.consent_status(conn, self.env.ws.id, p.id, "email")

    def journey_id(self) -> str:
        with self.env.c.db.read() as conn:
            return journeys.info(conn, self.env.ws.id, "cart").id

    def forged(self, mail: Mail, kind: str, url: str | None = None, secret: bytes = SECRET) -> str:
        p = _payload(mail.open)
        a = Addressing(
            public_url="http://testserver",
            secret=secret,
            workspace_id=p["w"],
            profile_id=p["p"],
            message_id=p["m"],
        )
        return a.link(kind, url)


@pytest.fixture
def links(env: JourneyEnv) -> Iterator[Links]:
    env.publish(JOURNEY)
    with TestClient(create_app(env.c, run_worker=False)) as http:
        yield Links(env=env, http=http)


def test_a_click_redirects_to_the_url_in_the_message_and_is_recorded(links: Links) -> None:
    mail = links.send_cart_mail()
    assert set(mail.clicks) == {CART, HELP}  # "&amp;" in the HTML is "&" in the link
    r = links.get(mail.clicks[CART])
    assert r.status_code == 302
    assert r.headers["location"] == CART
    assert "no-store" in r.headers["cache-control"]
    assert links.get(mail.clicks[HELP]).headers["location"] == HELP
    clicked = links.events_of("ann", "Email Link Clicked")
    assert [e["payload"]["properties"]["url"] for e in clicked] == [CART, HELP]
    props = clicked[0]["payload"]["properties"]
    assert props["message_id"] == mail.message_id
    assert props["journey_id"] == links.journey_id()
    assert props["node"] == "mail"
    assert props["channel"] == "email"
    assert clicked[0]["user_id"] == "ann"
    assert datetime.fromisoformat(clicked[0]["timestamp"].replace("Z", "+00:00")) == links.env.clock.now()


def test_a_link_followed_while_the_email_is_being_delivered_redirects(links: Links) -> None:
    # A link scanner at the receiving server fetches links before the SMTP server has
    # answered, so before the message's outcome (and its links) is recorded.
    seen: list[tuple[str, int, str | None]] = []

    def scanner(received: Received) -> None:
        mail = mail_of(received)
        with links.env.c.db.read() as conn:
            status = _status(conn, mail.message_id)
        r = links.get(mail.clicks[CART])
        seen.append((status, r.status_code, r.headers.get("location")))

    links.env.sink.on_receive = scanner
    try:
        mail = links.send_cart_mail()
    finally:
        links.env.sink.on_receive = None
    assert seen == [("queued", 302, CART)]
    clicked = links.events_of("ann", "Email Link Clicked")
    assert [e["payload"]["properties"]["url"] for e in clicked] == [CART]
    assert clicked[0]["payload"]["properties"]["message_id"] == mail.message_id
    # Once recorded, only the message's own links redirect.
    with links.env.c.db.read() as conn:
        assert _status(conn, mail.message_id) == "sent"
    assert links.get(mail.clicks[HELP]).status_code == 302
    assert links.get(links.forged(mail, "click", "https://evil.example.com/phish")).status_code == 404


def _status(conn: Any, message_id: str) -> str:
    row = conn.execute(select(messages.c.status).where(messages.c.id == message_id)).one()
    return str(row.status)


def _tamper(token: str, where: int) -> str:
    chars = list(token)
    chars[where] = "A" if chars[where] != "A" else "B"
    return "".join(chars)


def test_no_open_redirect_from_any_bad_token(links: Links) -> None:
    mail = links.send_cart_mail()
    good = mail.clicks[CART]
    base, token = good.rsplit("/", 1)
    body, mac = token.split(".")
    bad = {
        "garbage": f"{base}/not-a-token",
        "empty-mac": f"{base}/{body}.",
        "two-dots": f"{base}/{token}.x",
        "tampered-body": f"{base}/{_tamper(body, 10)}.{mac}",
        "tampered-mac": f"{base}/{body}.{_tamper(mac, 3)}",
        "non-ascii-mac": f"{base}/{body}.%C3%A9%C3%A9",
        "non-ascii-body": f"{base}/%C3%A9.{mac}",
        "other-secret": links.forged(mail, "click", "https://evil.example.com", secret=b"guess"),
        "open-token": mail.open.replace("/t/o/", "/t/c/"),
        "unsubscribe-token": mail.unsubscribe.replace("/t/u/", "/t/c/"),
        # Signed with the real secret, but the URL was never in the message.
        "url-not-in-message": links.forged(mail, "click", "https://evil.example.com/phish"),
        "no-url": links.forged(mail, "click"),
        "unknown-message": "http://testserver/t/c/"
        + sign(
            SECRET,
            {**_payload(good), "m": "msg_000000000000000000000000"},
        ),
        "huge": f"{base}/{'A' * 9000}.{mac}",
    }
    for case, url in bad.items():
        r = links.get(url)
        assert r.status_code == 404, case
        assert "location" not in r.headers, case
        assert "evil" not in r.text, case
    assert links.stored("Email Link Clicked") == 0
    assert links.get(good).status_code == 302  # the real link still works


def test_the_open_pixel_always_answers_a_gif(links: Links) -> None:
    mail = links.send_cart_mail()
    for url in (
        mail.open,
        mail.open + "x",
        "http://testserver/t/o/garbage",
        "http://testserver/t/o/%C3%A9.%C3%A9",
        mail.clicks[CART].replace("/t/c/", "/t/o/"),  # a click token is not an open
    ):
        r = links.get(url)
        assert r.status_code == 200, url
        assert r.headers["content-type"] == "image/gif"
        assert r.content == PIXEL
        assert r.content.startswith(b"GIF89a")
        assert "no-store" in r.headers["cache-control"]
    opened = links.events_of("ann", "Email Opened")
    assert len(opened) == 1  # only the real token counted
    props = opened[0]["payload"]["properties"]
    assert props["message_id"] == mail.message_id
    assert props["journey_id"] == links.journey_id()
    assert props["node"] == "mail"


def test_get_on_the_unsubscribe_link_changes_nothing(links: Links) -> None:
    mail = links.send_cart_mail()
    r = links.get(mail.unsubscribe)
    assert r.status_code == 200
    assert "<form method='post'" in r.text
    assert "List-Unsubscribe" in r.text
    assert "One-Click" in r.text
    assert links.consent("ann") is None
    assert links.events_of("ann", "Email Unsubscribed") == []


def test_one_click_unsubscribes_once(links: Links) -> None:
    mail = links.send_cart_mail()
    for _ in range(2):
        r = links.one_click(mail.unsubscribe)
        assert r.status_code == 200
        assert "unsubscribed" in r.text
    assert links.consent("ann") == "unsubscribed"
    with links.env.c.db.read() as conn:
        [row] = conn.execute(select(consents)).all()
    assert (row.channel, row.status, row.source) == ("email", "unsubscribed", "one-click")
    [event] = links.events_of("ann", "Email Unsubscribed")
    props = event["payload"]["properties"]
    assert props["message_id"] == mail.message_id
    assert props["journey_id"] == links.journey_id()
    assert props["node"] == "mail"
    assert props["source"] == "one-click"
    # No more marketing email to Ann.
    links.env.track("ann", "Cart Saved", cart="c-2")
    assert len(links.env.mail_to("ann@example.com")) == 1


def test_the_unsubscribe_page_button_unsubscribes(links: Links) -> None:
    mail = links.send_cart_mail()
    r = links.http.post(
        mail.unsubscribe,
        data={"List-Unsubscribe": "One-Click"},
    )
    assert r.status_code == 200
    assert links.consent("ann") == "unsubscribed"


def test_bad_unsubscribe_tokens_are_404_and_change_nothing(links: Links) -> None:
    mail = links.send_cart_mail()
    base, token = mail.unsubscribe.rsplit("/", 1)
    for url in (
        f"{base}/{_tamper(token, 12)}",
        f"{base}/garbage",
        f"{base}/%C3%A9.%C3%A9",
        mail.clicks[CART].replace("/t/c/", "/t/u/"),
        mail.open.replace("/t/o/", "/t/u/"),
        links.forged(mail, "unsubscribe", secret=b"guess"),
    ):
        assert links.get(url).status_code == 404, url
        assert links.one_click(url).status_code == 404, url
    assert links.consent("ann") is None
    assert links.stored("Email Unsubscribed") == 0


def test_a_large_unsubscribe_body_is_fine(links: Links) -> None:
    mail = links.send_cart_mail()
    r = links.http.post(mail.unsubscribe, content=b"List-Unsubscribe=One-Click&" + b"x" * 2_000_000)
    assert r.status_code == 200
    assert links.consent("ann") == "unsubscribed"


def test_unsubscribing_after_a_merge_reaches_the_survivor(links: Links) -> None:
    """The email went to a profile that was merged away since: the unsubscribe must land on
    the surviving profile, whose consent the next email checks."""
    env = links.env
    mail = links.send_cart_mail("old-id")
    env.identify("new-id", plan="pro")
    env.calls({"type": "alias", "userId": "new-id", "previousId": "old-id"})
    survivor = env.profile("new-id")
    assert env.profile("old-id").id == survivor.id
    assert _payload(mail.unsubscribe)["p"] != survivor.id  # the link names the old profile
    assert links.one_click(mail.unsubscribe).status_code == 200
    assert links.consent("new-id") == "unsubscribed"
    env.track("new-id", "Cart Saved", cart="c-9")
    assert len(env.mail_to("old-id@example.com")) == 1  # nothing more
    assert len(links.events_of("new-id", "Email Unsubscribed")) == 1


def test_links_of_an_erased_person_record_nothing(links: Links) -> None:
    mail = links.send_cart_mail()
    pid = links.env.profile("ann").id
    r = links.http.delete(f"/api/v1/profiles/{pid}", headers=links.env.ws.admin_headers)
    assert r.status_code == 200
    # Erasure forgets the messages too: the link can no longer be checked, so it leads nowhere.
    r = links.get(mail.clicks[CART])
    assert r.status_code == 404
    assert "location" not in r.headers
    assert links.get(mail.open).content == PIXEL
    assert links.one_click(mail.unsubscribe).status_code == 200
    links.env.c.worker.drain()
    for name in ("Email Link Clicked", "Email Opened", "Email Unsubscribed"):
        assert links.stored(name) == 0, name
    with links.env.c.db.read() as conn:
        assert conn.execute(select(consents)).all() == []
