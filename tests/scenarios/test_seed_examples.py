"""The seed examples under examples/journeys, end to end: events in, the clock moves,
real SMTP out (a local sink), click-through over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from tests.support.journey_env import JourneyEnv
from whenthen import lists, profiles
from whenthen.api.app import create_app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"


def example(name: str) -> str:
    return (EXAMPLES / f"{name}.yaml").read_text()


def tracked_links(html: str) -> list[str]:
    return re.findall(r'href="(http://testserver/t/c/[^"]+)"', html)


def click(env: JourneyEnv, url: str) -> str:
    with TestClient(create_app(env.c, run_worker=False)) as http:
        r = http.get(url.replace("http://testserver", ""), follow_redirects=False)
    assert r.status_code == 302, r.text
    env.c.worker.drain()
    return str(r.headers["location"])


def test_abandoned_cart_reminds_after_an_hour_then_last_call(env: JourneyEnv) -> None:
    env.publish(example("abandoned-cart"))
    env.identify("ann", email="ann@example.com", first_name="Ann")
    env.track("ann", "Product Added", cart_id="c-1", product_name="Green tea")
    assert env.sink.messages() == []
    env.advance(minutes=59)
    assert env.sink.messages() == []
    env.advance(minutes=2)
    [first] = env.mail_to("ann@example.com")
    assert first.subject == "Ann, your Green tea is waiting"
    assert "https://shop.example.com/cart/c-1" not in first.body("html")  # links are tracked
    assert first.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    env.advance(days=1, minutes=1)
    subjects = [m.subject for m in env.mail_to("ann@example.com")]
    assert subjects == ["Ann, your Green tea is waiting", "Last call: Green tea"]
    [enrollment] = env.enrollments("ann")
    assert enrollment["status"] == "completed"


def test_abandoned_cart_checkout_of_that_cart_converts_and_sends_nothing(env: JourneyEnv) -> None:
    env.publish(example("abandoned-cart"))
    env.identify("bob", email="bob@example.com")
    env.track("bob", "Product Added", cart_id="c-1", product_name="Tea")
    env.track("bob", "Product Added", cart_id="c-2", product_name="Mug")  # a second cart: own flow
    env.advance(minutes=30)
    env.track("bob", "Order Completed", cart_id="c-1")
    env.advance(hours=2)
    mails = env.mail_to("bob@example.com")
    assert [m.subject for m in mails] == ["Hi, your Mug is waiting"]
    by_cart = {e["journal"][0]["detail"].get("cart") or e["id"]: e for e in env.enrollments("bob")}
    statuses = sorted(e["status"] for e in by_cart.values())
    assert statuses == ["active", "converted"]


def test_ebook_reminds_only_those_who_did_not_click(env: JourneyEnv) -> None:
    env.publish(example("ebook"))
    for user in ("reader", "skipper"):
        env.identify(user, email=f"{user}@example.com")
        env.track(user, "Form Submitted", form="ebook", title="The Tea Guide")
    env.track("other", "Form Submitted", form="newsletter")
    [to_reader] = env.mail_to("reader@example.com")
    assert to_reader.subject == "Your ebook: The Tea Guide"
    [download] = tracked_links(to_reader.body("html"))
    assert click(env, download) == "https://example.com/ebooks/guide.pdf"
    env.advance(days=3, minutes=1)
    assert [m.subject for m in env.mail_to("reader@example.com")] == ["Your ebook: The Tea Guide"]
    assert [m.subject for m in env.mail_to("skipper@example.com")] == [
        "Your ebook: The Tea Guide",
        "Did you get your ebook?",
    ]
    with env.c.db.read() as conn:
        assert profiles.tags_of(conn, env.ws.id, env.profile("reader").id) == ["ebook-downloaded"]
        assert profiles.tags_of(conn, env.ws.id, env.profile("skipper").id) == []


def test_rsvp_click_joins_the_attendee_list(env: JourneyEnv) -> None:
    env.publish(example("rsvp"))
    for user in ("yes", "agenda-only", "silent"):
        env.identify(user, email=f"{user}@example.com")
        env.track(user, "Invited", event_name="Tea Summit", event_id="ts-26")
    links = {
        u: tracked_links(env.mail_to(f"{u}@example.com")[0].body("html")) for u in ("yes", "agenda-only")
    }
    assert click(env, links["yes"][0]) == "https://events.example.com/rsvp?e=ts-26"
    assert click(env, links["agenda-only"][1]) == "https://events.example.com/agenda"
    env.advance(days=8)
    with env.c.db.read() as conn:
        attendees = lists.members(conn, env.ws.id, "attendees")
    assert attendees == [env.profile("yes").id]
    assert [m.subject for m in env.mail_to("yes@example.com")] == [
        "You're invited: Tea Summit",
        "See you at Tea Summit",
    ]
    assert len(env.mail_to("agenda-only@example.com")) == 1
    assert len(env.mail_to("silent@example.com")) == 1


def test_welcome_series_every_two_days_until_unsubscribed(env: JourneyEnv) -> None:
    env.publish(example("welcome-series"))
    for user in ("stay", "leave"):
        env.identify(user, email=f"{user}@example.com", first_name=user.title())
        env.track(user, "Signed Up")
    assert [m.subject for m in env.mail_to("stay@example.com")] == ["Welcome, Stay!"]
    # One-click unsubscribe (RFC 8058) from the first email's header.
    header = env.mail_to("leave@example.com")[0].message["List-Unsubscribe"]
    url = str(header).strip("<>").replace("http://testserver", "")
    with TestClient(create_app(env.c, run_worker=False)) as http:
        assert http.get(url).status_code == 200  # a page with a button: GET changes nothing
        r = http.post(
            url,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200
    env.c.worker.drain()
    env.advance(days=2, minutes=1)
    env.advance(days=2, minutes=1)
    assert [m.subject for m in env.mail_to("stay@example.com")] == [
        "Welcome, Stay!",
        "Three tips to get more out of it",
        "A welcome offer for you",
    ]
    assert [m.subject for m in env.mail_to("leave@example.com")] == ["Welcome, Leave!"]
    [e] = env.enrollments("leave")
    assert (e["status"], e["reason"]) == ("exited", "unsubscribed")
