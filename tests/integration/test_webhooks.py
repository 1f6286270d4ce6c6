"""Webhook nodes end to end: a journey calls a real local HTTP endpoint through the outbox
dispatcher (signed JSON, idempotency key, retries with backoff, timeouts, the SSRF guard,
response mapping into traits), on SQLite and PostgreSQL. The clock is manual: backoff is
waited out by moving it, never by sleeping."""

from __future__ import annotations

import hashlib
import hmac
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.conftest import make_settings
from tests.support.ingest import send
from tests.support.webhook_server import Reply, Seen, WebhookServer
from tests.support.workspace import TestWorkspace, make_workspace
from whenthen import journeys, profiles
from whenthen.api.app import create_app
from whenthen.bootstrap import Container, build
from whenthen.kernel.clock import ManualClock
from whenthen.messaging.tables import messages, outbox
from whenthen.settings import WebhookSettings, webhook_signing_secret

#: The caller's timeout in the timeout tests (the endpoint sleeps longer); other tests
#: use a roomy one so a slow machine cannot turn an answer into a timeout.
TIMEOUT = 0.3
ROOMY_TIMEOUT = 5.0
MAX_ATTEMPTS = 3


@dataclass
class HookEnv:
    c: Container
    clock: ManualClock
    ws: TestWorkspace
    hook: WebhookServer
    http: TestClient

    def publish(self, node: dict[str, Any], key: str = "crm-sync") -> None:
        definition = {
            "key": key,
            "name": "CRM sync",
            "trigger": {"kind": "event", "event": "Signed Up"},
            "entry": {"frequency": "once"},
            "start": "call",
            "nodes": {"call": {"kind": "webhook", **node}},
        }
        with self.c.db.write() as conn:
            journeys.push(conn, self.ws.id, definition, now=self.clock.now())
            journeys.publish(conn, self.ws.id, key, now=self.clock.now())

    def sign_up(self, user: str, *, plan: str = "pro", **traits: Any) -> None:
        """Identify the person, then trigger the journey; the worker runs to the end."""
        now = self.clock.now().isoformat()
        send(
            self.c,
            self.ws.id,
            {"type": "identify", "userId": user, "traits": traits, "timestamp": now},
            {
                "type": "track",
                "userId": user,
                "event": "Signed Up",
                "properties": {"plan": plan},
                "timestamp": now,
            },
        )

    def advance(self, **delta: float) -> None:
        self.clock.advance(timedelta(**delta))
        self.c.worker.drain()

    def profile(self, user: str) -> profiles.Profile:
        with self.c.db.read() as conn:
            return profiles.lookup(conn, self.ws.id, user_id=user)

    def messages(self, key: str = "crm-sync") -> list[dict[str, Any]]:
        r = self.http.get(f"/api/v1/journeys/{key}/messages", headers=self.ws.admin_headers)
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data

    def profile_messages(self, user: str) -> list[dict[str, Any]]:
        pid = self.profile(user).id
        r = self.http.get(f"/api/v1/profiles/{pid}/messages", headers=self.ws.admin_headers)
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data

    def open_jobs(self) -> int:
        with self.c.db.read() as conn:
            rows = conn.execute(select(outbox.c.id).where(outbox.c.done_at.is_(None))).all()
        return len(rows)


@contextmanager
def hook_env(
    db_url: str, clock: ManualClock, *, allow_private: bool = True, timeout: float = ROOMY_TIMEOUT
) -> Iterator[HookEnv]:
    settings = make_settings(
        db_url,
        webhooks=WebhookSettings(
            allow_private_addresses=allow_private, timeout_seconds=timeout, max_attempts=MAX_ATTEMPTS
        ),
    )
    with WebhookServer() as hook:
        c = build(settings, clock=clock)
        try:
            with TestClient(create_app(c, run_worker=False)) as http:
                yield HookEnv(c=c, clock=clock, ws=make_workspace(c), hook=hook, http=http)
        finally:
            c.close()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template_path: Path) -> str:
    path = tmp_path / "one.db"
    shutil.copyfile(sqlite_template_path, path)
    return f"sqlite:///{path}"


@pytest.fixture
def env(db_url: str, clock: ManualClock) -> Iterator[HookEnv]:
    with hook_env(db_url, clock) as e:
        yield e


def parse_signature(header: str) -> tuple[int, str]:
    parts = dict(item.split("=", 1) for item in header.split(","))
    assert set(parts) == {"t", "v1"}, header
    return int(parts["t"]), parts["v1"]


def verify(secret: bytes, seen: Seen) -> int:
    """Check the request's signature as a receiver would; returns its timestamp."""
    t, v1 = parse_signature(seen.headers["x-whenthen-signature"])
    expected = hmac.new(secret, f"{t}.".encode() + seen.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, v1)
    return t


def test_body_headers_signature_and_liquid(env: HookEnv) -> None:
    env.publish(
        {
            "url": f"{env.hook.url}/hooks/crm?src=wt",
            "headers": {"X-Team": "growth", "X-Whenthen-Signature": "forged", "Idempotency-Key": "mine"},
            "body": {
                "email": "{{ traits.email }}",
                "name": "{{ traits.first_name }}",
                "plan": "{{ event.properties.plan | upcase }}",
                "event": "{{ event.name }}",
                "journey": "{{ journey.key }}",
                "missing": "[{{ traits.nothing_here }}]",
                "nested": {"list": ["{{ profile.user_id }}", 7, True, None]},
            },
        }
    )
    env.sign_up("ann", email="ann@example.com", first_name="Ann & <Co>")
    [seen] = env.hook.requests
    assert (seen.method, seen.path) == ("POST", "/hooks/crm?src=wt")
    assert seen.json() == {
        "email": "ann@example.com",
        "name": "Ann & <Co>",  # JSON, not HTML: nothing escaped
        "plan": "PRO",
        "event": "Signed Up",
        "journey": "crm-sync",
        "missing": "[]",  # undefined variables render empty
        "nested": {"list": ["ann", 7, True, None]},
    }
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-team"] == "growth"
    [msg] = env.messages()
    assert seen.headers["x-whenthen-message-id"] == msg["id"]
    # Headers of the definition cannot forge the signature nor replace the idempotency key.
    assert seen.headers["idempotency-key"] != "mine"
    assert verify(webhook_signing_secret(env.c.settings), seen) == int(env.clock.now().timestamp())
    assert not hmac.compare_digest(
        parse_signature(seen.headers["x-whenthen-signature"])[1],
        hmac.new(b"another-secret", seen.body, hashlib.sha256).hexdigest(),
    )
    # The body is signed: one changed byte no longer verifies.
    tampered = Seen(seen.method, seen.path, seen.headers, seen.body.replace(b"PRO", b"PRI"))
    with pytest.raises(AssertionError):
        verify(webhook_signing_secret(env.c.settings), tampered)
    assert msg["channel"] == "webhook"
    assert msg["status"] == "sent"
    assert msg["delivered"] is True
    assert msg["attempts"] == 1
    assert msg["reason"] is None
    assert msg["recipient"] == f"{env.hook.url}/hooks/crm?src=wt"
    assert msg["node"] == "call"
    assert msg["sent_at"] is not None
    assert env.profile_messages("ann") == [msg]
    assert env.open_jobs() == 0


def test_default_body_describes_the_person_and_the_event(env: HookEnv) -> None:
    env.publish({"url": f"{env.hook.url}/in"})
    env.sign_up("bob", plan="free", email="bob@example.com", city="Lyon")
    [seen] = env.hook.requests
    body = seen.json()
    assert body["profile"]["id"] == env.profile("bob").id
    assert body["profile"]["user_id"] == "bob"
    assert body["profile"]["email"] == "bob@example.com"
    assert body["traits"]["city"] == "Lyon"
    assert body["event"]["properties"] == {"plan": "free"}
    verify(webhook_signing_secret(env.c.settings), seen)


def test_retries_with_backoff_on_503_then_succeeds(env: HookEnv) -> None:
    env.hook.script(Reply(503), Reply(503, b"busy"), Reply(200, {"ok": True}))
    env.publish({"url": f"{env.hook.url}/hooks", "body": {"user": "{{ profile.user_id }}"}})
    env.sign_up("ann")
    started = env.clock.now()
    assert len(env.hook.requests) == 1
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"], msg["reason"]) == ("retrying", 1, "HTTP 503")
    assert msg["delivered"] is False
    env.advance(seconds=14)  # the first backoff is 15 s: not yet
    assert len(env.hook.requests) == 1
    env.advance(seconds=1)
    assert len(env.hook.requests) == 2
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"]) == ("retrying", 2)
    env.advance(seconds=29)  # the second backoff is 30 s
    assert len(env.hook.requests) == 2
    env.advance(seconds=1)
    first, second, third = env.hook.requests
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"], msg["reason"]) == ("sent", 3, None)
    assert msg["delivered"] is True
    # The same key on every attempt, so the receiver can drop the duplicates; each attempt
    # is signed afresh with the time it was made.
    keys = {s.headers["idempotency-key"] for s in (first, second, third)}
    assert len(keys) == 1
    assert keys.pop()
    assert [verify(webhook_signing_secret(env.c.settings), s) for s in (first, second, third)] == [
        int(started.timestamp()),
        int((started + timedelta(seconds=15)).timestamp()),
        int((started + timedelta(seconds=45)).timestamp()),
    ]
    assert first.body == second.body == third.body
    env.advance(hours=2)
    assert len(env.hook.requests) == 3  # done: never called again
    assert env.open_jobs() == 0


def test_each_message_has_its_own_idempotency_key(env: HookEnv) -> None:
    env.publish({"url": f"{env.hook.url}/hooks"})
    env.sign_up("ann")
    env.sign_up("bob")
    a, b = env.hook.requests
    assert a.headers["idempotency-key"] != b.headers["idempotency-key"]
    assert a.headers["x-whenthen-message-id"] != b.headers["x-whenthen-message-id"]
    assert sorted(m["status"] for m in env.messages()) == ["sent", "sent"]


@pytest.mark.parametrize("status", [404, 422])
def test_a_client_error_fails_at_once_with_the_reason(env: HookEnv, status: int) -> None:
    env.hook.script(Reply(status, {"error": "nope"}))
    env.publish({"url": f"{env.hook.url}/hooks"})
    env.sign_up("ann")
    env.advance(hours=3)
    assert len(env.hook.requests) == 1
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"], msg["reason"]) == ("failed", 1, f"HTTP {status}")
    assert msg["delivered"] is False
    assert env.open_jobs() == 0


@pytest.mark.parametrize("status", [429, 502])
def test_retryable_statuses_are_retried(env: HookEnv, status: int) -> None:
    env.hook.script(Reply(status), Reply(204, b""))
    env.publish({"url": f"{env.hook.url}/hooks"})
    env.sign_up("ann")
    [msg] = env.messages()
    assert (msg["status"], msg["reason"]) == ("retrying", f"HTTP {status}")
    env.advance(seconds=15)
    assert len(env.hook.requests) == 2
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"]) == ("sent", 2)


@pytest.fixture
def quick(db_url: str, clock: ManualClock) -> Iterator[HookEnv]:
    """An env whose caller gives up after TIMEOUT seconds."""
    with hook_env(db_url, clock, timeout=TIMEOUT) as e:
        yield e


def test_a_timeout_is_retried_then_succeeds(quick: HookEnv) -> None:
    env = quick
    # The endpoint answers only after 1.5 s: the caller (timeout 0.3 s) gives up first.
    env.hook.script(Reply(200, {"late": True}, delay=1.5), Reply(200, {"ok": True}))
    env.publish({"url": f"{env.hook.url}/slow"})
    env.sign_up("ann")
    [msg] = env.messages()
    assert msg["status"] == "retrying"
    assert msg["attempts"] == 1
    assert "Timeout" in msg["reason"]
    env.advance(seconds=15)
    first, second = env.hook.requests
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"], msg["reason"]) == ("sent", 2, None)


def test_retries_exhausted_fail_the_message(env: HookEnv) -> None:
    env.hook.script(Reply(503))  # repeated for every request
    env.publish({"url": f"{env.hook.url}/down"})
    env.sign_up("ann")
    for _ in range(MAX_ATTEMPTS + 2):
        env.advance(hours=1)
    assert len(env.hook.requests) == MAX_ATTEMPTS
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"], msg["reason"]) == ("failed", MAX_ATTEMPTS, "HTTP 503")
    assert env.open_jobs() == 0


def test_timeouts_until_exhausted_fail_the_message(quick: HookEnv) -> None:
    env = quick
    env.hook.script(Reply(200, delay=0.8))
    env.publish({"url": f"{env.hook.url}/slow"})
    env.sign_up("ann")
    for _ in range(MAX_ATTEMPTS):
        env.advance(hours=1)
    assert len(env.hook.requests) == MAX_ATTEMPTS
    [msg] = env.messages()
    assert msg["status"] == "failed"
    assert msg["attempts"] == MAX_ATTEMPTS
    assert "Timeout" in msg["reason"]


def test_erasing_the_person_stops_pending_retries(env: HookEnv) -> None:
    env.hook.script(Reply(503))
    env.publish({"url": f"{env.hook.url}/hooks"})
    env.sign_up("ann")
    assert len(env.hook.requests) == 1
    pid = env.profile("ann").id
    assert env.http.delete(f"/api/v1/profiles/{pid}", headers=env.ws.admin_headers).status_code == 200
    env.advance(hours=1)
    env.advance(hours=1)
    assert len(env.hook.requests) == 1
    assert env.messages() == []
    assert env.open_jobs() == 0


def test_map_response_writes_traits(env: HookEnv) -> None:
    env.hook.script(
        Reply(201, {"data": {"id": "crm-42", "scores": [0.9, 0.1], "tier": None}, "status": "created"})
    )
    env.publish(
        {
            "url": f"{env.hook.url}/hooks",
            "map_response": {
                "crm_id": "data.id",
                "crm_score": "data.scores.0",
                "crm_status": "status",
                "crm_tier": "data.tier",  # null in the answer: not written
                "crm_missing": "data.nothing.here",  # absent: not written
            },
        }
    )
    # A segment on a mapped trait follows the answer (the worker's recheck step).
    r = env.http.put(
        "/api/v1/segments/crm-created",
        json={
            "name": "In the CRM",
            "definition": {"condition": {"kind": "trait", "path": "crm_status", "value": "created"}},
        },
        headers=env.ws.admin_headers,
    )
    assert r.status_code == 200, r.text
    env.sign_up("ann", email="ann@example.com")
    env.advance(seconds=1)
    in_segment = env.http.get("/api/v1/segments/crm-created/members", headers=env.ws.admin_headers).json()
    assert [m["profile_id"] for m in in_segment["data"]] == [env.profile("ann").id]
    traits = env.profile("ann").traits
    assert traits["crm_id"] == "crm-42"
    assert traits["crm_score"] == 0.9
    assert traits["crm_status"] == "created"
    assert "crm_tier" not in traits
    assert "crm_missing" not in traits
    assert traits["email"] == "ann@example.com"
    [msg] = env.messages()
    assert msg["status"] == "sent"


def test_map_response_of_a_failed_call_writes_nothing(env: HookEnv) -> None:
    env.hook.script(Reply(422, {"data": {"id": "crm-42"}}))
    env.publish({"url": f"{env.hook.url}/hooks", "map_response": {"crm_id": "data.id"}})
    env.sign_up("ann")
    assert "crm_id" not in env.profile("ann").traits
    [msg] = env.messages()
    assert msg["status"] == "failed"


def test_a_huge_answer_is_cut_and_the_call_still_counts(env: HookEnv) -> None:
    env.hook.script(Reply(200, b"x" * (3 * 1024 * 1024)))
    env.publish({"url": f"{env.hook.url}/hooks", "map_response": {"crm_id": "id"}})
    env.sign_up("ann")
    [msg] = env.messages()
    assert (msg["status"], msg["attempts"]) == ("sent", 1)
    with env.c.db.read() as conn:
        response = conn.execute(select(messages.c.response).where(messages.c.id == msg["id"])).scalar_one()
    assert response["status"] == 200
    assert response["body"] == "x" * 2000  # not JSON: kept as (the start of) the text
    assert "crm_id" not in env.profile("ann").traits


def test_a_body_that_fails_to_render_fails_without_calling(env: HookEnv) -> None:
    # Parses (so the push accepts it) but breaks the loop limit when rendered.
    env.publish(
        {"url": f"{env.hook.url}/hooks", "body": {"x": "{% for i in (1..100000) %}{{ i }}{% endfor %}"}}
    )
    env.sign_up("ann")
    env.advance(hours=1)
    assert env.hook.requests == []
    [msg] = env.messages()
    assert msg["status"] == "failed"
    assert msg["reason"].startswith("template:")
    assert env.open_jobs() == 0


def test_a_body_with_a_template_error_is_refused_at_push(env: HookEnv) -> None:
    from whenthen.journeys import InvalidDefinition

    with pytest.raises(InvalidDefinition) as info:
        env.publish({"url": f"{env.hook.url}/hooks", "body": {"x": "{{ traits.a | no_such_filter }}"}})
    [problem] = info.value.problems
    assert (problem.node, problem.field) == ("call", "body.x")
    assert problem.reason == "template: unknown filter 'no_such_filter'"


def test_private_addresses_are_refused_without_retry(db_url: str, clock: ManualClock) -> None:
    with hook_env(db_url, clock, allow_private=False) as env:
        env.publish({"url": f"{env.hook.url}/internal"})
        env.sign_up("ann")
        for _ in range(3):
            env.advance(hours=1)
        assert env.hook.requests == []  # nothing ever reached the endpoint
        [msg] = env.messages()
        assert msg["status"] == "failed"
        assert msg["attempts"] == 1
        assert "private address" in msg["reason"]
        assert env.open_jobs() == 0


PRIVATE_HOSTS = {
    "loopback-name": "localhost",
    "loopback-v6": "[::1]",
    "unspecified": "0.0.0.0",
    "metadata": "169.254.169.254",
    "private-10": "10.0.0.1",
    "private-192": "192.168.1.1",
    "decimal-loopback": "2130706433",
    "mapped-v6": "[::ffff:127.0.0.1]",
    "carrier-nat": "100.64.0.1",
}


def test_the_guard_refuses_every_private_spelling(sqlite_url: str, clock: ManualClock) -> None:
    """Loopback by name, IPv6, the unspecified address, the cloud metadata address, private
    ranges, a decimal IPv4 and an IPv4-mapped IPv6: each refused before any connection is
    tried (the guard does not touch the database: SQLite is enough)."""
    with hook_env(sqlite_url, clock, allow_private=False) as env:
        for key, host in PRIVATE_HOSTS.items():
            env.publish({"url": f"http://{host}:{env.hook.port}/x"}, key=key)
        env.sign_up("ann")
        for key, host in PRIVATE_HOSTS.items():
            [msg] = env.messages(key)
            assert (msg["status"], msg["attempts"]) == ("failed", 1), host
            assert "private address" in msg["reason"], host
        assert env.hook.requests == []


def test_public_names_that_do_not_resolve_are_retried_not_refused(
    sqlite_url: str, clock: ManualClock
) -> None:
    """An unresolvable name is a network error (retryable), not a private address."""
    with hook_env(sqlite_url, clock, allow_private=False) as env:
        env.publish({"url": "http://no-such-host.invalid/x"})
        env.sign_up("ann")
        [msg] = env.messages()
        assert (msg["status"], msg["attempts"]) == ("retrying", 1)
        assert "private" not in msg["reason"]


def test_webhooks_are_not_signed_with_the_master_secret() -> None:
    from whenthen.settings import Settings

    derived = Settings(secret_key="master").webhooks.signing_secret
    assert derived is None
    key = webhook_signing_secret(Settings(secret_key="master"))
    assert b"master" not in key
    assert key == webhook_signing_secret(Settings(secret_key="master"))  # stable across restarts
    assert key != webhook_signing_secret(Settings(secret_key="other"))
    assert webhook_signing_secret(Settings(webhooks={"signing_secret": "s3"})) == b"s3"


def test_a_name_that_rebinds_to_a_private_address_is_refused_where_it_connects() -> None:
    """DNS rebinding: the name resolves to a public address when the call is checked and
    to the loopback address when the socket is opened. The guard decides on the address it
    connects to, so the local endpoint is never reached, and the refusal is permanent."""
    from whenthen.messaging.adapters.webhook import HttpxWebhookCaller

    with WebhookServer() as hook:
        answers = iter([["93.184.216.34"], ["127.0.0.1"]])
        asked: list[str] = []

        def rebinding(host: str, port: int) -> list[str]:
            asked.append(host)
            return next(answers, ["127.0.0.1"])

        caller = HttpxWebhookCaller(timeout=ROOMY_TIMEOUT, allow_private=False, resolver=rebinding)
        try:
            result = caller.call(f"http://rebind.example:{hook.port}/x", b"{}", {})
        finally:
            caller.close()
        assert asked == ["rebind.example", "rebind.example"]  # checked, then resolved to connect
        assert (result.status, result.permanent) == (None, True)
        assert result.error is not None
        assert "private address" in result.error
        assert hook.requests == []


def test_the_guard_connects_to_the_address_it_checked() -> None:
    """A name whose only address is public is connected to at that address, never
    resolved again by the socket layer: ``public.example`` does not resolve on this
    machine, so any outcome but a name error (an answer from whatever sits at that
    address, or a network error, retried) shows the checked address was used."""
    from whenthen.messaging.adapters.webhook import HttpxWebhookCaller

    asked: list[str] = []

    def public(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["93.184.216.34"]

    caller = HttpxWebhookCaller(timeout=0.3, allow_private=False, resolver=public)
    try:
        result = caller.call("http://public.example:9/x", b"{}", {})
    finally:
        caller.close()
    assert asked == ["public.example", "public.example"]
    assert result.permanent is False
    error = result.error or ""
    assert "private" not in error
    assert "Name or service not known" not in error
    assert "nodename nor servname" not in error
    assert result.status is not None or "Connect" in error or "Timeout" in error
