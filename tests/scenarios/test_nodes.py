"""Every node kind, end to end, as a marketer would use it: events in, the clock moves,
real SMTP out (a local sink), a real local HTTP receiver for webhooks, tracked links
clicked over HTTP; on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.http_sink import HttpSink, Reply
from tests.support.journey_env import JourneyEnv
from tests.support.workspace import make_workspace
from whenthen import journeys, lists, messaging, profiles
from whenthen.api.app import create_app
from whenthen.bootstrap import build
from whenthen.kernel.clock import ManualClock
from whenthen.messaging.dispatch import signature
from whenthen.messaging.smtp_sink import SmtpSink
from whenthen.settings import EmailSettings, Settings, WebhookSettings, webhook_signing_secret

# ---- helpers --------------------------------------------------------------------------


def subjects(env: JourneyEnv, address: str) -> list[str]:
    return [m.subject for m in env.mail_to(address)]


def tracked(html: str, kind: str) -> list[str]:
    """Tracked URLs of one kind in an email: ``c`` (click) or ``o`` (open pixel)."""
    return re.findall(rf'(?:href|src)="(http://testserver/t/{kind}/[^"]+)"', html)


def visit(env: JourneyEnv, url: str) -> int:
    """Follow a tracked link the way a mail client does, then let the workers catch up."""
    with TestClient(create_app(env.c, run_worker=False)) as http:
        status = http.get(url.replace("http://testserver", ""), follow_redirects=False).status_code
    env.c.worker.drain()
    return status


def unsubscribe(env: JourneyEnv, address: str) -> None:
    """One-click unsubscribe (RFC 8058) from the List-Unsubscribe header of the last email."""
    header = env.mail_to(address)[-1].message["List-Unsubscribe"]
    url = str(header).strip("<>").replace("http://testserver", "")
    with TestClient(create_app(env.c, run_worker=False)) as http:
        r = http.post(
            url,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert r.status_code == 200
    env.c.worker.drain()


def message_log(env: JourneyEnv, user: str) -> dict[str, Any]:
    """The person's message log, by the node that queued each message."""
    with env.c.db.read() as conn:
        rows = messaging.log_for_profile(conn, env.ws.id, [env.profile(user).id], 100)
    return {r.node: r for r in rows}


def only(env: JourneyEnv, user: str) -> dict[str, Any]:
    [enrollment] = env.enrollments(user)
    return enrollment


def journal(enrollment: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [j for j in enrollment["journal"] if j["kind"] == kind]


def tags(env: JourneyEnv, user: str) -> list[str]:
    with env.c.db.read() as conn:
        return profiles.tags_of(conn, env.ws.id, env.profile(user).id)


def advance_to(env: JourneyEnv, when: datetime) -> None:
    env.advance(seconds=(when - env.clock.now()).total_seconds())


def day_by_day(env: JourneyEnv, days: int) -> None:
    """Let days pass as a running worker sees them: a timer fires on the day it is due
    (a delay after it counts from when it fired)."""
    for _ in range(days):
        env.advance(days=1)


T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)  # the clock fixture: a Wednesday, 12:00 UTC


# ---- delay ----------------------------------------------------------------------------


def test_delay_waits_a_duration_before_the_next_email(env: JourneyEnv) -> None:
    env.publish(
        """
        key: trial-check-in
        name: Trial check-in
        trigger: {kind: event, event: Trial Started}
        start: two_days
        nodes:
          two_days: {kind: delay, duration: 2d, next: check_in}
          check_in:
            kind: send_email
            email: {subject: "How is your trial going?", text: "Reply with any question."}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Trial Started")
    waiting = only(env, "ann")
    assert (waiting["status"], waiting["node"]) == ("active", "two_days")
    assert waiting["wake_at"] == T0 + timedelta(days=2)
    env.advance(days=1, hours=23, minutes=59)
    assert env.sink.messages() == []
    env.advance(minutes=1)
    assert subjects(env, "ann@example.com") == ["How is your trial going?"]
    assert only(env, "ann")["status"] == "completed"


def test_delay_until_nine_on_monday_in_each_readers_time_zone(env: JourneyEnv) -> None:
    env.publish(
        """
        key: weekly-digest
        name: Monday digest
        trigger: {kind: event, event: Digest Subscribed}
        start: monday_morning
        nodes:
          monday_morning: {kind: delay, until_time: "09:00", weekdays: [mon], next: digest}
          digest:
            kind: send_email
            email: {subject: "Your Monday digest", text: "This week in tea."}
        """
    )
    readers = {"li": "Asia/Shanghai", "tom": "Europe/London", "ana": "America/Sao_Paulo"}
    for user, tz in readers.items():
        env.identify(user, email=f"{user}@example.com", timezone=tz)
        env.track(user, "Digest Subscribed")  # on Wednesday
    assert env.profile("li").timezone == "Asia/Shanghai"

    def got_digest() -> set[str]:
        return {u for u in readers if subjects(env, f"{u}@example.com") == ["Your Monday digest"]}

    monday = datetime(2026, 11, 30, tzinfo=UTC)
    advance_to(env, monday + timedelta(minutes=59))  # 08:59 in Shanghai
    assert got_digest() == set()
    env.advance(minutes=1)  # Monday 09:00 in Shanghai is 01:00 UTC
    assert got_digest() == {"li"}
    advance_to(env, monday + timedelta(hours=9))  # 09:00 in London (GMT in winter)
    assert got_digest() == {"li", "tom"}
    advance_to(env, monday + timedelta(hours=12))  # 09:00 in Sao Paulo (UTC-3)
    assert got_digest() == {"li", "tom", "ana"}
    assert len(env.sink.messages()) == 3


def test_delay_until_a_week_before_the_contract_ends(env: JourneyEnv) -> None:
    env.publish(
        """
        key: renewal-reminder
        name: Renewal reminder
        trigger: {kind: event, event: Contract Signed}
        start: week_before_end
        nodes:
          week_before_end: {kind: delay, until_trait: contract_end, offset: -7d, next: remind}
          remind:
            kind: send_email
            email: {subject: "Your contract ends on {{ traits.contract_end }}", text: "Renew now."}
        """
    )
    # A date is midnight local time; a date-time is taken as it is.
    env.identify("li", email="li@example.com", timezone="Asia/Shanghai", contract_end="2026-12-20")
    env.identify("tom", email="tom@example.com", contract_end="2026-12-20T18:00:00Z")
    env.identify("kim", email="kim@example.com")  # no end date at all
    for user in ("li", "tom", "kim"):
        env.track(user, "Contract Signed")
    # Without a date the delay is skipped (and journaled): the reminder goes at once.
    assert subjects(env, "kim@example.com") == ["Your contract ends on "]
    [skipped] = journal(only(env, "kim"), "skipped")
    assert skipped["detail"]["reason"] == "trait contract_end is not a date"

    assert only(env, "li")["wake_at"] == datetime(2026, 12, 12, 16, 0, tzinfo=UTC)  # 13 Dec 00:00 +08
    advance_to(env, datetime(2026, 12, 12, 15, 59, tzinfo=UTC))
    assert env.mail_to("li@example.com") == []
    env.advance(minutes=1)
    assert subjects(env, "li@example.com") == ["Your contract ends on 2026-12-20"]
    advance_to(env, datetime(2026, 12, 13, 17, 59, tzinfo=UTC))
    assert env.mail_to("tom@example.com") == []
    env.advance(minutes=1)
    assert subjects(env, "tom@example.com") == ["Your contract ends on 2026-12-20T18:00:00Z"]


# ---- wait for event -------------------------------------------------------------------


def test_wait_for_event_takes_the_yes_branch_only_for_a_matching_event(env: JourneyEnv) -> None:
    env.publish(
        """
        key: reports-adoption
        name: Reports adoption
        trigger: {kind: event, event: Trial Started}
        start: wait_for_reports
        nodes:
          wait_for_reports:
            kind: wait_for_event
            event: Feature Used
            where: [{path: feature, op: eq, value: reports}]
            timeout: 3d
            on_event: praise
            on_timeout: nudge
          praise:
            kind: send_email
            email: {subject: "Nice first report!", text: "Here is what else reports can do."}
          nudge:
            kind: send_email
            email: {subject: "Have you tried reports?", text: "Two clicks to your first report."}
        """
    )
    for user in ("ann", "bob"):
        env.identify(user, email=f"{user}@example.com")
        env.track(user, "Trial Started")
    env.advance(days=1)
    env.track("ann", "Feature Used", feature="reports")
    env.track("bob", "Feature Used", feature="export")  # another feature: keeps waiting
    assert subjects(env, "ann@example.com") == ["Nice first report!"]
    assert only(env, "ann")["status"] == "completed"
    assert (only(env, "bob")["status"], only(env, "bob")["node"]) == ("active", "wait_for_reports")
    env.advance(days=2, minutes=1)
    assert subjects(env, "bob@example.com") == ["Have you tried reports?"]
    assert subjects(env, "ann@example.com") == ["Nice first report!"]
    assert [j["node"] for j in journal(only(env, "bob"), "timed_out")] == ["wait_for_reports"]


def test_wait_for_event_correlates_on_the_quote_that_started_the_journey(env: JourneyEnv) -> None:
    env.publish(
        """
        key: quote-follow-up
        name: Quote follow-up
        trigger: {kind: event, event: Quote Requested}
        entry: {frequency: once_per_key, key: properties.quote_id}
        start: wait_for_acceptance
        nodes:
          wait_for_acceptance:
            kind: wait_for_event
            event: Quote Accepted
            correlate: quote_id
            timeout: 5d
            on_event: thanks
            on_timeout: follow_up
          thanks:
            kind: send_email
            email: {subject: "Thanks for accepting quote {{ event.properties.quote_id }}", text: "."}
          follow_up:
            kind: send_email
            email: {subject: "Questions about quote {{ event.properties.quote_id }}?", text: "."}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Quote Requested", quote_id="q-1")
    env.track("ann", "Quote Requested", quote_id="q-2")
    env.advance(days=1)
    env.track("ann", "Quote Accepted", quote_id="q-2")
    assert subjects(env, "ann@example.com") == ["Thanks for accepting quote q-2"]
    env.advance(days=4, minutes=1)
    assert subjects(env, "ann@example.com") == [
        "Thanks for accepting quote q-2",
        "Questions about quote q-1?",
    ]
    assert sorted(e["status"] for e in env.enrollments("ann")) == ["completed", "completed"]


def test_wait_for_a_click_in_the_email_just_sent(env: JourneyEnv) -> None:
    env.publish(
        """
        key: webinar
        name: Webinar invitation
        trigger: {kind: event, event: Webinar Scheduled}
        start: save_the_date
        nodes:
          save_the_date:
            kind: send_email
            email:
              subject: Save the date
              html: '<p><a href="https://example.com/webinar/agenda">The agenda</a></p>'
            next: one_day
          one_day: {kind: delay, duration: 1d, next: invite}
          invite:
            kind: send_email
            email:
              subject: Register now
              html: '<p><a href="https://example.com/webinar/register">Register</a></p>'
            next: wait_for_registration
          wait_for_registration:
            kind: wait_for_event
            event: Email Link Clicked
            correlate: message
            timeout: 2d
            on_event: registered
            on_timeout: null
          registered: {kind: update_profile, add_tags: [webinar-registered]}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Webinar Scheduled")
    env.advance(days=1, minutes=1)
    save_the_date, invite = env.mail_to("ann@example.com")
    assert (save_the_date.subject, invite.subject) == ("Save the date", "Register now")
    # A click in the earlier email is not a click in the email the journey waits on.
    [agenda] = tracked(save_the_date.body("html"), "c")
    assert visit(env, agenda) == 302
    assert only(env, "ann")["node"] == "wait_for_registration"
    assert tags(env, "ann") == []
    [register] = tracked(invite.body("html"), "c")
    assert visit(env, register) == 302
    enrollment = only(env, "ann")
    assert enrollment["status"] == "completed"
    assert [j["detail"]["event"] for j in journal(enrollment, "event_received")] == ["Email Link Clicked"]
    assert tags(env, "ann") == ["webinar-registered"]


# ---- condition ------------------------------------------------------------------------


def test_condition_routes_on_traits_with_an_else_branch(env: JourneyEnv) -> None:
    env.publish(
        """
        key: plan-onboarding
        name: Onboarding by plan
        trigger: {kind: event, event: Signed Up}
        start: by_plan
        nodes:
          by_plan:
            kind: condition
            branches:
              - when: {trait: plan, op: eq, value: enterprise}
                next: enterprise
              - when: {trait: seats, op: gte, value: 10}
                next: team
            else: solo
          enterprise:
            kind: send_email
            email: {subject: Meet your account manager, text: "."}
          team:
            kind: send_email
            email: {subject: Invite your team, text: "."}
          solo:
            kind: send_email
            email: {subject: Getting started on your own, text: "."}
        """
    )
    people = {
        "ann": {"plan": "Enterprise", "seats": 500},  # string equality ignores case
        "bob": {"plan": "team", "seats": 25},
        "cy": {"plan": "team", "seats": 3},
        "dan": {},
    }
    for user, traits in people.items():
        env.identify(user, email=f"{user}@example.com", **traits)
        env.track(user, "Signed Up")
    assert subjects(env, "ann@example.com") == ["Meet your account manager"]
    assert subjects(env, "bob@example.com") == ["Invite your team"]
    assert subjects(env, "cy@example.com") == ["Getting started on your own"]
    assert subjects(env, "dan@example.com") == ["Getting started on your own"]
    branches = {u: journal(only(env, u), "branched")[0]["detail"]["branch"] for u in people}
    assert branches == {"ann": 0, "bob": 1, "cy": "else", "dan": "else"}


def test_condition_counts_recent_events_with_a_minimum(env: JourneyEnv) -> None:
    env.publish(
        """
        key: lead-routing
        name: Lead routing
        trigger: {kind: event, event: Demo Requested}
        start: route
        nodes:
          route:
            kind: condition
            branches:
              - when: {did: Viewed Pricing, within: 7d, min_count: 3}
                next: hot
              - when: {did_not: Order Completed, within: 30d}
                next: prospect
            else: customer
          hot:
            kind: send_email
            email: {subject: A specialist will call you today, text: "."}
          prospect:
            kind: send_email
            email: {subject: Here is a case study, text: "."}
          customer:
            kind: send_email
            email: {subject: Your success manager will reach out, text: "."}
        """
    )
    for user in ("hot", "cooling", "buyer"):
        env.identify(user, email=f"{user}@example.com")
    # (Identical calls without a messageId are one call: each visit is told apart.)
    for visit_no in range(3):
        env.track("cooling", "Viewed Pricing", visit=visit_no)  # day 0: too long ago by day 10
    env.advance(days=5)
    env.track("buyer", "Viewed Pricing")
    env.track("buyer", "Order Completed", total=120)
    env.advance(days=4)
    for visit_no in range(3):
        env.track("hot", "Viewed Pricing", visit=visit_no)
    env.track("cooling", "Viewed Pricing")
    env.advance(days=1)
    for user in ("hot", "cooling", "buyer"):
        env.track(user, "Demo Requested")
    assert subjects(env, "hot@example.com") == ["A specialist will call you today"]
    assert subjects(env, "cooling@example.com") == ["Here is a case study"]
    assert subjects(env, "buyer@example.com") == ["Your success manager will reach out"]


def test_condition_combines_all_any_and_not(env: JourneyEnv) -> None:
    env.publish(
        """
        key: vip-offer
        name: VIP offer
        trigger: {kind: event, event: Cart Viewed}
        start: decide
        nodes:
          decide:
            kind: condition
            branches:
              - when:
                  all:
                    - {trait: country, op: in, value: [CN, SG]}
                    - any:
                        - {trait: lifetime_value, op: gte, value: 1000}
                        - {did: Order Completed, min_count: 3}
                    - not: {trait: offers_opt_out, op: eq, value: true}
                next: offer
            else: null
          offer:
            kind: send_email
            email: {subject: An offer for our best customers, text: "."}
        """
    )
    people: dict[str, dict[str, Any]] = {
        "big-spender": {"country": "CN", "lifetime_value": 2000},
        "regular": {"country": "SG", "lifetime_value": 90},
        "opted-out": {"country": "CN", "lifetime_value": 2000, "offers_opt_out": True},
        "abroad": {"country": "US", "lifetime_value": 5000},
        "newcomer": {"country": "SG", "lifetime_value": 90},
    }
    env.calls(
        *[
            {"type": "identify", "userId": u, "traits": {"email": f"{u}@example.com", **t}}
            for u, t in people.items()
        ],
        *[
            {"type": "track", "userId": "regular", "event": "Order Completed", "messageId": f"r{i}"}
            for i in range(3)
        ],
        *[
            {"type": "track", "userId": "newcomer", "event": "Order Completed", "messageId": f"n{i}"}
            for i in range(2)
        ],
    )
    env.calls(*[{"type": "track", "userId": u, "event": "Cart Viewed"} for u in people])
    offered = {u for u in people if env.mail_to(f"{u}@example.com")}
    assert offered == {"big-spender", "regular"}
    assert {u: only(env, u)["status"] for u in people} == dict.fromkeys(people, "completed")


def test_condition_on_opens_and_clicks_of_an_earlier_email(env: JourneyEnv) -> None:
    env.publish(
        """
        key: launch
        name: Product launch
        trigger: {kind: event, event: Launch List Joined}
        start: announce
        nodes:
          announce:
            kind: send_email
            email:
              subject: "It's here"
              html: >-
                <p>See <a href="https://example.com/launch">what is new</a>
                and <a href="https://example.com/pricing">the pricing</a>.</p>
            next: two_days
          two_days: {kind: delay, duration: 2d, next: by_engagement}
          by_engagement:
            kind: condition
            branches:
              - when: {engaged: clicked, node: announce, link: /pricing}
                next: sales
              - when: {engaged: opened, node: announce}
                next: readers
            else: resend
          sales:
            kind: send_email
            email: {subject: "Questions about pricing?", text: "."}
          readers:
            kind: send_email
            email: {subject: "Did anything catch your eye?", text: "."}
          resend:
            kind: send_email
            email: {subject: "In case you missed it: it's here", text: "."}
        """
    )
    people = ("buyer", "reader", "silent")
    for user in people:
        env.identify(user, email=f"{user}@example.com")
        env.track(user, "Launch List Joined")
    announcements = {u: env.mail_to(f"{u}@example.com")[0].body("html") for u in people}
    [_, pricing] = tracked(announcements["buyer"], "c")
    assert visit(env, pricing) == 302
    [pixel] = tracked(announcements["reader"], "o")
    assert visit(env, pixel) == 200
    env.advance(days=2, minutes=1)
    assert subjects(env, "buyer@example.com")[1:] == ["Questions about pricing?"]
    assert subjects(env, "reader@example.com")[1:] == ["Did anything catch your eye?"]
    assert subjects(env, "silent@example.com")[1:] == ["In case you missed it: it's here"]


# ---- split ----------------------------------------------------------------------------


def test_split_follows_the_weights_and_keeps_each_person_on_their_variant(env: JourneyEnv) -> None:
    env.publish(
        """
        key: subject-test
        name: Weekly tip subject test
        trigger: {kind: event, event: Signed Up}
        start: pick
        nodes:
          pick:
            kind: split
            variants:
              - {name: short, weight: 3, next: short}
              - {name: long, weight: 1, next: long}
          short:
            kind: send_email
            email: {subject: "Tip of the week", text: "."}
            next: week
          long:
            kind: send_email
            email: {subject: "Your tip of the week, picked by our tea masters", text: "."}
            next: week
          week: {kind: delay, duration: 7d, next: pick}
        """
    )
    users = [f"u{i}" for i in range(60)]
    env.calls(*[{"type": "identify", "userId": u, "traits": {"email": f"{u}@example.com"}} for u in users])
    env.calls(*[{"type": "track", "userId": u, "event": "Signed Up"} for u in users])
    env.advance(days=7, minutes=1)  # the second week: through the split again
    subject = {"short": "Tip of the week", "long": "Your tip of the week, picked by our tea masters"}
    counts = {"short": 0, "long": 0}
    for u in users:
        [enrollment] = env.enrollments(u)
        chosen = [j["detail"]["variant"] for j in journal(enrollment, "branched")]
        assert len(chosen) == 2
        assert chosen[0] == chosen[1]  # the same enrollment always gets the same variant
        assert subjects(env, f"{u}@example.com") == [subject[chosen[0]]] * 2
        counts[chosen[0]] += 1
    assert counts["long"] >= 1
    assert counts["short"] > 30  # three to one: about 45 of 60


def test_split_holdout_exits_without_sending_anything(env: JourneyEnv) -> None:
    env.publish(
        """
        key: winback
        name: Win-back with a control group
        trigger: {kind: event, event: Churn Risk Detected}
        start: holdout
        nodes:
          holdout:
            kind: split
            holdout: 1
            variants: [{name: offer, weight: 1, next: offer}]
          offer:
            kind: send_email
            email: {subject: "We miss you: 20% off", text: "."}
        """
    )
    users = [f"p{i}" for i in range(20)]
    env.calls(*[{"type": "identify", "userId": u, "traits": {"email": f"{u}@example.com"}} for u in users])
    env.calls(*[{"type": "track", "userId": u, "event": "Churn Risk Detected"} for u in users])
    control, treated = [], []
    for u in users:
        enrollment = only(env, u)
        if enrollment["status"] == "exited":
            assert enrollment["reason"] == "holdout"
            assert env.mail_to(f"{u}@example.com") == []
            assert message_log(env, u) == {}
            control.append(u)
        else:
            assert enrollment["status"] == "completed"
            assert subjects(env, f"{u}@example.com") == ["We miss you: 20% off"]
            treated.append(u)
    assert control
    assert treated


# ---- send email -----------------------------------------------------------------------


def test_send_email_renders_traits_and_event_properties(env: JourneyEnv) -> None:
    env.publish(
        """
        key: order-confirmation
        name: Order confirmation
        trigger: {kind: event, event: Order Completed}
        entry: {frequency: every_time}
        start: confirm
        nodes:
          confirm:
            kind: send_email
            marketing: false
            email:
              from: "Orders <orders@example.com>"
              reply_to: help@example.com
              subject: "{{ traits.first_name }}, order {{ event.properties.order_id }} is confirmed"
              html: >-
                <p>Hi {{ traits.first_name }},
                {{ event.properties.items | size }} items ({{ event.name }}).</p>
              text: >-
                Total: {{ event.properties.total }} {{ event.properties.currency | upcase }}
                - {{ journey.name }}
        """
    )
    env.identify("ann", email="ann@example.com", first_name="Ann & <Co>")
    env.track("ann", "Order Completed", order_id="o-17", items=["tea", "pot"], total=42.5, currency="eur")
    [mail] = env.mail_to("ann@example.com")
    assert mail.subject == "Ann & <Co>, order o-17 is confirmed"
    assert "Hi Ann &amp; &lt;Co&gt;, 2 items (Order Completed)." in mail.body("html")  # escaped in HTML
    assert mail.body("plain").startswith("Total: 42.5 EUR - Order confirmation")
    assert str(mail.message["From"]) == "Orders <orders@example.com>"
    assert str(mail.message["Reply-To"]) == "help@example.com"
    assert mail.message["List-Unsubscribe"] is None  # transactional: no unsubscribe
    logged = message_log(env, "ann")["confirm"]
    assert (logged.status, logged.subject, logged.recipient) == ("sent", mail.subject, "ann@example.com")


def test_send_email_skips_an_unsubscribed_person_but_not_transactional_mail(env: JourneyEnv) -> None:
    env.publish(
        """
        key: newsletter
        name: Newsletter and account notices
        trigger: {kind: event, event: Joined}
        start: issue_one
        nodes:
          issue_one:
            kind: send_email
            email: {subject: Issue 1, text: "."}
            next: week
          week: {kind: delay, duration: 7d, next: issue_two}
          issue_two:
            kind: send_email
            email: {subject: Issue 2, text: "."}
            next: terms
          terms:
            kind: send_email
            marketing: false
            email: {subject: Our terms changed, text: "."}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Joined")
    unsubscribe(env, "ann@example.com")
    env.advance(days=7, minutes=1)
    assert subjects(env, "ann@example.com") == ["Issue 1", "Our terms changed"]
    log = message_log(env, "ann")
    assert (log["issue_two"].status, log["issue_two"].reason) == ("skipped", "unsubscribed")
    assert log["terms"].status == "sent"
    assert only(env, "ann")["status"] == "completed"  # no exit rule: the journey goes on


def test_send_email_to_a_person_without_an_address_is_skipped(env: JourneyEnv) -> None:
    env.publish(
        """
        key: welcome
        name: Welcome
        trigger: {kind: event, event: Signed Up}
        start: hello
        nodes:
          hello:
            kind: send_email
            email: {subject: Welcome, text: "."}
        """
    )
    env.identify("app-only", phone="+8613800138000", email="not an address")
    env.track("app-only", "Signed Up")
    logged = message_log(env, "app-only")["hello"]
    assert (logged.status, logged.reason, logged.sent_at) == ("skipped", "no email address", None)
    assert env.sink.messages() == []


def test_send_email_with_a_broken_template_fails_that_message_only(env: JourneyEnv) -> None:
    """A syntax error is refused at push; this template parses but breaks a render limit."""
    env.publish(
        """
        key: broken
        name: A typo in a template
        trigger: {kind: event, event: Signed Up}
        start: broken
        nodes:
          broken:
            kind: send_email
            email: {subject: "Hello", html: "{% for i in (1..100000) %}{{ i }}{% endfor %}"}
            next: fine
          fine:
            kind: send_email
            email: {subject: "Still here", text: "."}
        """
    )
    env.identify("ann", email="ann@example.com", vip=True)
    env.track("ann", "Signed Up")
    log = message_log(env, "ann")
    assert log["broken"].status == "failed"
    assert log["broken"].reason.startswith("template: ")
    assert "loop iteration limit" in log["broken"].reason
    assert subjects(env, "ann@example.com") == ["Still here"]
    assert only(env, "ann")["status"] == "completed"


# ---- webhook --------------------------------------------------------------------------


@pytest.fixture
def crm() -> Iterator[HttpSink]:
    with HttpSink() as sink:
        yield sink


@pytest.fixture
def hook_env(db_url: str, clock: ManualClock) -> Iterator[JourneyEnv]:
    """``env`` with webhooks allowed to reach this machine (the SSRF guard is off)."""
    with SmtpSink() as sink:
        settings = Settings(
            database_url=db_url,
            secret_key="scenario-secret",
            sqlite_synchronous="NORMAL",
            demo_workspace=False,
            public_url="http://testserver",
            email=EmailSettings(smtp_host=sink.host, smtp_port=sink.port, from_address="shop@example.com"),
            webhooks=WebhookSettings(allow_private_addresses=True, timeout_seconds=5),
        )
        c = build(settings, clock=clock)
        try:
            yield JourneyEnv(c=c, clock=clock, ws=make_workspace(c), sink=sink)
        finally:
            c.close()


def test_webhook_pushes_the_signup_to_the_crm_and_keeps_its_id(hook_env: JourneyEnv, crm: HttpSink) -> None:
    env = hook_env
    crm.reply = Reply(201, {"contact": {"id": "C-42", "owner": "sales"}})
    env.publish(
        f"""
        key: crm-sync
        name: CRM sync
        trigger: {{kind: event, event: Signed Up}}
        start: push
        nodes:
          push:
            kind: webhook
            url: {crm.url("/contacts")}
            headers: {{X-Api-Key: key-1}}
            body:
              email: "{{{{ traits.email }}}}"
              plan: "{{{{ event.properties.plan }}}}"
              source: whenthen
            map_response: {{crm_id: contact.id}}
            next: an_hour
          an_hour: {{kind: delay, duration: 1h, next: welcome}}
          welcome:
            kind: send_email
            email: {{subject: "Your account {{{{ traits.crm_id }}}} is ready", text: "."}}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Signed Up", plan="pro")
    [request] = crm.requests()
    assert (request.method, request.path) == ("POST", "/contacts")
    assert request.json() == {"email": "ann@example.com", "plan": "pro", "source": "whenthen"}
    assert request.headers["x-api-key"] == "key-1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"].endswith(":push:1")
    stamp = int(env.clock.now().timestamp())
    assert request.headers["x-whenthen-signature"] == signature(
        webhook_signing_secret(env.c.settings), stamp, request.body
    )
    assert env.profile("ann").traits["crm_id"] == "C-42"
    logged = message_log(env, "ann")["push"]
    assert (logged.status, logged.recipient) == ("sent", crm.url("/contacts"))
    env.advance(hours=1)
    assert subjects(env, "ann@example.com") == ["Your account C-42 is ready"]
    assert len(crm.requests()) == 1


# ---- update profile, lists ---------------------------------------------------------------


def test_update_profile_sets_and_unsets_traits_and_tags(env: JourneyEnv) -> None:
    env.publish(
        """
        key: trial-lifecycle
        name: Trial lifecycle
        trigger: {kind: event, event: Trial Started}
        start: mark_trial
        nodes:
          mark_trial:
            kind: update_profile
            set: {stage: trial, trial_ends: "2026-12-09"}
            add_tags: [trial, onboarding]
            next: wait_for_purchase
          wait_for_purchase:
            kind: wait_for_event
            event: Subscribed
            timeout: 14d
            on_event: mark_customer
            on_timeout: mark_lapsed
          mark_customer:
            kind: update_profile
            set: {stage: customer}
            unset: [trial_ends]
            add_tags: [customer]
            remove_tags: [trial, onboarding]
          mark_lapsed:
            kind: update_profile
            set: {stage: lapsed}
            remove_tags: [trial]
        """
    )
    for user in ("ann", "bob"):
        env.identify(user, email=f"{user}@example.com", first_name=user.title())
        env.track(user, "Trial Started")
    assert env.profile("ann").traits == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "stage": "trial",
        "trial_ends": "2026-12-09",
    }
    assert tags(env, "ann") == ["onboarding", "trial"]
    env.advance(days=3)
    env.track("ann", "Subscribed")
    assert env.profile("ann").traits == {"email": "ann@example.com", "first_name": "Ann", "stage": "customer"}
    assert tags(env, "ann") == ["customer"]
    env.advance(days=11, minutes=1)
    assert env.profile("bob").traits["stage"] == "lapsed"
    assert env.profile("bob").traits["trial_ends"] == "2026-12-09"
    assert tags(env, "bob") == ["onboarding"]


def test_lists_gain_and_lose_members(env: JourneyEnv) -> None:
    env.publish(
        """
        key: vip-list
        name: VIP list
        trigger:
          kind: event
          event: Order Completed
          where: [{path: total, op: gte, value: 500}]
        start: join
        nodes:
          join: {kind: add_to_list, list: vip, next: watch_refunds}
          watch_refunds:
            kind: wait_for_event
            event: Refund Issued
            timeout: 30d
            on_event: leave
            on_timeout: null
          leave: {kind: remove_from_list, list: vip}
        """
    )

    def vips() -> set[str]:
        with env.c.db.read() as conn:
            return set(lists.members(conn, env.ws.id, "vip"))

    env.track("ann", "Order Completed", total=800)
    env.track("bob", "Order Completed", total=20)
    env.track("cy", "Order Completed", total=500)
    ann, cy = env.profile("ann").id, env.profile("cy").id
    assert vips() == {ann, cy}
    env.advance(days=2)
    env.track("ann", "Refund Issued")
    assert vips() == {cy}
    env.advance(days=29)
    assert vips() == {cy}
    assert only(env, "cy")["status"] == "completed"
    assert env.enrollments("bob") == []


# ---- jump, exit, goal ---------------------------------------------------------------------

PRO_ONBOARDING = """
key: pro-onboarding
name: Pro onboarding
trigger: {kind: api}
entry:
  frequency: once
  condition: {trait: email, op: exists}
start: hello
nodes:
  hello:
    kind: send_email
    email: {subject: "Welcome to Pro, {{ traits.first_name }}", text: "."}
"""

SIGNUP_ROUTER = """
key: signup-router
name: Sign-up router
trigger: {kind: event, event: Signed Up}
entry: {frequency: every_time}
start: by_plan
nodes:
  by_plan:
    kind: condition
    branches: [{when: {trait: plan, op: eq, value: pro}, next: to_pro}]
    else: basic
  to_pro: {kind: jump, journey: pro-onboarding}
  basic:
    kind: send_email
    email: {subject: "Welcome", text: "."}
"""


def by_journey(env: JourneyEnv, user: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in env.enrollments(user):
        out.setdefault(e["journey"], []).append(e)
    return out


def test_jump_enters_another_journey_whose_entry_rules_apply(env: JourneyEnv) -> None:
    env.publish(PRO_ONBOARDING)
    env.publish(SIGNUP_ROUTER)
    env.identify("ann", email="ann@example.com", first_name="Ann", plan="pro")
    env.identify("sam", phone="+14155550100", plan="pro")  # no email: the entry condition says no
    env.identify("bob", email="bob@example.com", plan="basic")
    for user in ("ann", "sam", "bob"):
        env.track(user, "Signed Up")
    assert subjects(env, "ann@example.com") == ["Welcome to Pro, Ann"]
    assert subjects(env, "bob@example.com") == ["Welcome"]
    ann = by_journey(env, "ann")
    assert [(e["status"], e["reason"]) for e in ann["signup-router"]] == [
        ("exited", "jumped to pro-onboarding")
    ]
    assert [e["status"] for e in ann["pro-onboarding"]] == ["completed"]
    sam = by_journey(env, "sam")
    assert "pro-onboarding" not in sam
    [refused] = journal(sam["signup-router"][0], "jump_refused")
    assert refused["detail"] == {"journey": "pro-onboarding", "reason": "entry rules"}
    # Signing up again jumps again, but pro onboarding admits a person once.
    env.advance(days=1)
    env.track("ann", "Signed Up")
    ann = by_journey(env, "ann")
    assert len(ann["signup-router"]) == 2
    assert len(ann["pro-onboarding"]) == 1
    assert subjects(env, "ann@example.com") == ["Welcome to Pro, Ann"]


def test_a_jump_to_a_paused_journey_is_refused_without_losing_the_event(env: JourneyEnv) -> None:
    env.publish(PRO_ONBOARDING)
    env.publish(SIGNUP_ROUTER)
    env.publish(
        """
        key: signup-alert
        name: Sign-up alert to the founder
        trigger: {kind: event, event: Signed Up}
        start: tag
        nodes:
          tag: {kind: update_profile, add_tags: [new-signup]}
        """
    )
    with env.c.db.write() as conn:
        journeys.set_status(conn, env.ws.id, "pro-onboarding", "paused", now=env.clock.now())
    env.identify("ann", email="ann@example.com", plan="pro")
    env.track("ann", "Signed Up")
    assert env.c.worker.stats.failed == 0  # the sign-up was processed, not parked
    assert tags(env, "ann") == ["new-signup"]
    ann = by_journey(env, "ann")
    assert "pro-onboarding" not in ann
    [router] = ann["signup-router"]
    assert (router["status"], router["reason"]) == ("exited", "jumped to pro-onboarding")
    [refused] = journal(router, "jump_refused")
    assert refused["detail"] == {"journey": "pro-onboarding", "reason": "journey is paused"}
    assert env.sink.messages() == []


def test_exit_node_ends_the_journey_there(env: JourneyEnv) -> None:
    env.publish(
        """
        key: feedback
        name: Support feedback
        trigger: {kind: event, event: Ticket Closed}
        start: asked_not_to
        nodes:
          asked_not_to:
            kind: condition
            branches: [{when: {trait: surveys_opt_out, op: eq, value: true}, next: stop}]
            else: survey
          stop: {kind: exit}
          survey:
            kind: send_email
            email: {subject: "How did we do?", text: "."}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.identify("bob", email="bob@example.com", surveys_opt_out=True)
    env.track("ann", "Ticket Closed")
    env.track("bob", "Ticket Closed")
    assert subjects(env, "ann@example.com") == ["How did we do?"]
    assert env.mail_to("bob@example.com") == []
    bob = only(env, "bob")
    assert (bob["status"], bob["reason"]) == ("exited", "exit node")
    assert journal(bob, "exited")[0]["node"] == "stop"


def test_goal_converts_from_any_node_within_its_window_only(env: JourneyEnv) -> None:
    env.publish(
        """
        key: trial-conversion
        name: Trial conversion
        trigger: {kind: event, event: Trial Started}
        goal: {event: Subscribed, within: 7d}
        start: day_one
        nodes:
          day_one:
            kind: send_email
            email: {subject: Day one, text: "."}
            next: wait_for_setup
          wait_for_setup:
            kind: wait_for_event
            event: Integration Connected
            timeout: 3d
            on_event: long_wait
            on_timeout: long_wait
          long_wait: {kind: delay, duration: 10d, next: last_chance}
          last_chance:
            kind: send_email
            email: {subject: Last chance, text: "."}
        """
    )
    for user in ("early", "later", "late"):
        env.identify(user, email=f"{user}@example.com")
        env.track(user, "Trial Started")
    env.advance(days=1)
    env.track("early", "Subscribed")  # while waiting for the integration
    day_by_day(env, 4)
    env.track("later", "Subscribed")  # while in the long delay, on day 5
    day_by_day(env, 3)
    env.track("late", "Subscribed")  # day 8: after the 7-day window
    converted = {u: only(env, u) for u in ("early", "later")}
    assert {u: (e["status"], e["reason"]) for u, e in converted.items()} == {
        "early": ("converted", "goal: Subscribed"),
        "later": ("converted", "goal: Subscribed"),
    }
    assert journal(converted["early"], "converted")[0]["node"] == "wait_for_setup"
    assert journal(converted["later"], "converted")[0]["node"] == "long_wait"
    assert (only(env, "late")["status"], only(env, "late")["node"]) == ("active", "long_wait")
    env.advance(days=5, minutes=1)
    assert subjects(env, "late@example.com") == ["Day one", "Last chance"]
    assert only(env, "late")["status"] == "completed"
    assert subjects(env, "early@example.com") == ["Day one"]
    assert subjects(env, "later@example.com") == ["Day one"]


def test_a_condition_counts_the_events_of_the_same_batch_including_the_trigger(env: JourneyEnv) -> None:
    """Third view of a product within a day: a 'still interested?' email. The three views
    arrive in one batch; each entry's condition must see the views before it and itself."""
    env.publish(
        {
            "key": "interest",
            "name": "Repeated interest",
            "trigger": {"kind": "event", "event": "Product Viewed"},
            "entry": {"frequency": "every_time"},
            "start": "check",
            "nodes": {
                "check": {
                    "kind": "condition",
                    "branches": [
                        {"when": {"did": "Product Viewed", "within": "1d", "min_count": 3}, "next": "nudge"}
                    ],
                    "else": None,
                },
                "nudge": {
                    "kind": "send_email",
                    "email": {"subject": "Still thinking about it?", "text": "."},
                },
            },
        }
    )
    env.identify("vic", email="vic@example.com")
    env.calls(
        *(
            {
                "type": "track",
                "userId": "vic",
                "event": "Product Viewed",
                "properties": {"sku": "tea", "n": n},
            }
            for n in range(3)
        )
    )
    assert [m.subject for m in env.mail_to("vic@example.com")] == ["Still thinking about it?"]
