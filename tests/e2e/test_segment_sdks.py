"""The official Segment libraries, unchanged, pointed at whenthen's host.

* ``segment-analytics-python``: every call type, anonymous then identified, in its
  batching, gzip and sync modes; a wrong write key reaches ``on_error`` and stores nothing.
* ``@segment/analytics-node`` (pinned in tests/sdk/node/package.json), run by node.
* analytics.js (analytics-next): no browser here; the requests its Segment.io plugin
  makes (short paths, ``text/plain``, Basic auth and ``writeKey`` in the body, ``sentAt``,
  ``_metadata``, the batching strategy's ``/v1/b``) are replayed over HTTP, with the CORS
  preflight a browser sends first.

Everything is read back through the admin API, after the embedded worker applied it.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
from segment.analytics import VERSION as PYTHON_LIBRARY_VERSION
from segment.analytics import Client
from segment.analytics.request import APIError

from tests.support.live_server import LiveServer
from tests.support.workspace import TestWorkspace, make_workspace
from whenthen.kernel.clock import SystemClock

NODE_DIR = Path(__file__).resolve().parents[1] / "sdk" / "node"
NODE_LIBRARY = "@segment/analytics-node"
NPM_TIMEOUT = 300
NODE_TIMEOUT = 120

#: Fields of a call that must come back from storage exactly as the library sent them.
CALL_FIELDS = (
    "type",
    "event",
    "name",
    "category",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "properties",
    "traits",
    "context",
    "integrations",
    "_metadata",
)

Json = dict[str, Any]
Sent = list[Json]


# ---- reading back through the admin API ----------------------------------------------


@pytest.fixture
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        yield client


def admin_get(http: httpx.Client, ws: TestWorkspace, path: str, **params: str) -> Json:
    r = http.get(path, params=params, headers=ws.admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, dict)
    return body


def lookup(http: httpx.Client, ws: TestWorkspace, **params: str) -> Json:
    return admin_get(http, ws, "/api/v1/profiles/lookup", **params)


def events_of(http: httpx.Client, ws: TestWorkspace, profile_id: str) -> list[Json]:
    """All of a profile's events, following the cursor."""
    out: list[Json] = []
    params = {"limit": "2"}  # small pages, so the cursor is exercised too
    while True:
        page = admin_get(http, ws, f"/api/v1/profiles/{profile_id}/events", **params)
        assert page["profile_id"] == profile_id
        out.extend(page["data"])
        if page["next_cursor"] is None:
            return out
        params["cursor"] = page["next_cursor"]


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_stored_as_sent(sent: Sent, stored: list[Json]) -> None:
    """Each sent call is stored once, under its messageId, with its fields intact."""
    by_id = {e["message_id"]: e for e in stored}
    assert len(by_id) == len(stored), "an event is stored twice"
    assert sorted(by_id) == sorted(m["messageId"] for m in sent)
    for msg in sent:
        event = by_id[msg["messageId"]]
        payload = event["payload"]
        for key in CALL_FIELDS:
            if msg.get(key) is not None:
                assert payload[key] == msg[key], (msg["type"], key)
        assert event["type"] == msg["type"]
        assert event["user_id"] == msg.get("userId")
        assert event["anonymous_id"] == msg.get("anonymousId")
        if msg["type"] == "track":
            assert event["event"] == msg["event"]
        elif msg["type"] in ("page", "screen"):
            assert event["event"] == msg.get("name")
        assert "writeKey" not in payload, "the write key must not be stored with the event"
        assert parse_time(payload["originalTimestamp"]) == parse_time(msg["timestamp"])
        # Skew correction moves the timestamp by the client/server clock difference only;
        # here both clocks are this machine's.
        skew = abs(parse_time(payload["timestamp"]) - parse_time(msg["timestamp"]))
        assert skew.total_seconds() < 60
        assert payload["sentAt"] is not None
        assert payload["receivedAt"] is not None


def assert_no_problems_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or (r.name.startswith("segment") and r.levelno >= logging.WARNING)
    ]
    assert bad == []


# ---- segment-analytics-python ------------------------------------------------------------


class ErrorLog:
    """The library's ``on_error`` callback: remembers what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[Exception, list[Json]]] = []

    def __call__(self, error: Exception, batch: list[Json]) -> None:
        self.calls.append((error, batch))


def python_client(live_server: LiveServer, write_key: str, on_error: ErrorLog, mode: str) -> Any:
    return Client(
        write_key=write_key,
        host=live_server.url,
        on_error=on_error,
        gzip=mode == "gzip",
        sync_mode=mode == "sync",
        upload_interval=0.05,
        max_retries=2,
        timeout=15,
    )


def enqueued(result: Any) -> Json:
    """A library call returns ``(queued, message)``; the message is what it sends."""
    ok, msg = result
    assert ok is True
    assert isinstance(msg, dict)
    return msg


@pytest.mark.parametrize("mode", ["batched", "gzip", "sync"])
def test_python_library_anonymous_then_identified(
    live_server: LiveServer, http: httpx.Client, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    ws = make_workspace(live_server.container)
    errors = ErrorLog()
    client = python_client(live_server, ws.write_key, errors, mode)
    user = f"user-{uuid4()}"
    anon_a = f"anon-{uuid4()}"  # this visit: browsing, then signing in
    anon_b = f"anon-{uuid4()}"  # another device, joined later by alias
    sent: Sent = []
    try:
        # The person is known from earlier; today's visit starts anonymous.
        sent.append(
            enqueued(client.identify(user_id=user, traits={"name": "Ann Lee", "plan": "free", "logins": 1}))
        )
        sent.append(
            enqueued(
                client.page(
                    anonymous_id=anon_a,
                    category="Docs",
                    name="Pricing",
                    properties={"path": "/pricing", "url": "https://acme.example/pricing"},
                    context={"page": {"path": "/pricing"}, "userAgent": "pytest"},
                )
            )
        )
        sent.append(
            enqueued(client.screen(anonymous_id=anon_a, name="Home", properties={"variant": "b", "ab": True}))
        )
        sent.append(
            enqueued(
                client.track(
                    anonymous_id=anon_a,
                    event="Product Viewed",
                    properties={
                        "sku": "SKU-1",
                        "price": Decimal("19.99"),
                        "tags": ["new", "sale"],
                        "dims": {"w": 10, "h": 2.5},
                        "in_stock": True,
                        "note": None,
                    },
                    integrations={"All": True, "Mixpanel": False},
                )
            )
        )
        sent.append(enqueued(client.track(anonymous_id=anon_b, event="Cart Viewed", properties={"items": 2})))
        client.flush()
        live_server.wait_until_processed()
        # Two separate profiles so far: the known person and the anonymous visitor.
        known = lookup(http, ws, user_id=user)
        visitor = lookup(http, ws, anonymous_id=anon_a)
        assert known["id"] != visitor["id"]
        assert visitor["user_ids"] == []
        assert visitor["event_count"] == 3

        # Signing in: identify with both ids merges the visit into the person.
        sent.append(
            enqueued(
                client.identify(
                    user_id=user,
                    anonymous_id=anon_a,
                    traits={"email": "  Ann.Lee@Example.COM ", "phone": "+1 (415) 555-0100", "plan": "pro"},
                    context={"timezone": "Europe/Berlin", "ip": "203.0.113.9", "locale": "de-DE"},
                )
            )
        )
        sent.append(
            enqueued(
                client.track(
                    user_id=user,
                    event="Order Completed",
                    properties={"order_id": "o-1", "revenue": 42.5, "currency": "EUR"},
                )
            )
        )
        sent.append(
            enqueued(
                client.group(user_id=user, group_id="acme-inc", traits={"name": "Acme", "employees": 50})
            )
        )
        sent.append(enqueued(client.alias(previous_id=anon_b, user_id=user)))
        client.flush()
    finally:
        if mode != "sync":  # in sync mode the library has no consumer thread to join
            client.shutdown()
    live_server.wait_until_processed()

    assert errors.calls == [], "the library reported errors through on_error"
    assert_no_problems_logged(caplog)
    assert live_server.failed_events() == 0

    # How the library called: /v1/batch, Basic auth with the write key, gzip when asked.
    calls = [r for r in live_server.requests if r.path.startswith("/v1/")]
    assert calls
    basic = "Basic " + base64.b64encode(f"{ws.write_key}:".encode()).decode()
    for r in calls:
        assert (r.method, r.path, r.status) == ("POST", "/v1/batch", 200)
        assert r.headers["authorization"] == basic
        assert r.headers["user-agent"] == f"analytics-python/{PYTHON_LIBRARY_VERSION}"
        assert r.headers.get("content-encoding") == ("gzip" if mode == "gzip" else None)
    if mode == "sync":
        assert len(calls) == len(sent)  # one request per call

    # One person, whichever id is asked for.
    profile = lookup(http, ws, user_id=user)
    assert lookup(http, ws, anonymous_id=anon_a)["id"] == profile["id"]
    assert lookup(http, ws, anonymous_id=anon_b)["id"] == profile["id"]
    assert lookup(http, ws, email="ann.lee@example.com")["id"] == profile["id"]
    assert profile["user_ids"] == [user]
    assert sorted(profile["anonymous_ids"]) == sorted([anon_a, anon_b])
    assert profile["event_count"] == len(sent)
    assert sorted(m["reason"] for m in profile["merges"]) == ["alias", "identify"]
    assert {m["from_profile_id"] for m in profile["merges"]} >= {visitor["id"]}
    # Traits: normalised, latest wins per trait, earlier ones kept.
    assert profile["email"] == "ann.lee@example.com"
    assert profile["phone"] == "+14155550100"
    assert profile["timezone"] == "Europe/Berlin"
    assert profile["traits"]["email"] == "ann.lee@example.com"
    assert profile["traits"]["plan"] == "pro"
    assert profile["traits"]["name"] == "Ann Lee"
    assert profile["traits"]["logins"] == 1
    assert [(g["group_id"], g["traits"]) for g in profile["groups"]] == [
        ("acme-inc", {"name": "Acme", "employees": 50})
    ]

    # Every call, anonymous ones included, belongs to the merged profile, as sent.
    stored = events_of(http, ws, profile["id"])
    assert_stored_as_sent(sent, stored)
    assert Counter(e["type"] for e in stored) == {
        "identify": 2,
        "page": 1,
        "screen": 1,
        "track": 3,
        "group": 1,
        "alias": 1,
    }
    anonymous = [e for e in stored if e["user_id"] is None]
    assert {e["anonymous_id"] for e in anonymous} == {anon_a, anon_b}
    viewed = next(e for e in stored if e["event"] == "Product Viewed")
    assert viewed["payload"]["properties"]["price"] == 19.99  # the library's Decimal, as a number
    for e in stored:
        assert e["payload"]["context"]["library"] == {
            "name": "analytics-python",
            "version": PYTHON_LIBRARY_VERSION,
        }
    signed_in = next(e for e in stored if e["type"] == "identify" and e["anonymous_id"] == anon_a)
    # The event keeps the traits as sent; the profile holds them normalised.
    assert signed_in["payload"]["traits"]["email"] == "  Ann.Lee@Example.COM "
    assert signed_in["payload"]["context"]["timezone"] == "Europe/Berlin"


def test_python_library_wrong_write_key_calls_on_error_and_stores_nothing(
    live_server: LiveServer, http: httpx.Client
) -> None:
    ws = make_workspace(live_server.container)  # a workspace exists; its key is not the one used
    errors = ErrorLog()
    client = python_client(live_server, "wk_not-a-real-key", errors, "batched")
    sent: Sent = []
    try:
        sent.append(enqueued(client.track(user_id="u-wrong", event="Signed Up", properties={"plan": "pro"})))
        sent.append(enqueued(client.identify(user_id="u-wrong", traits={"email": "x@example.com"})))
        client.flush()
    finally:
        client.shutdown()

    assert len(errors.calls) == 1
    error, batch = errors.calls[0]
    assert isinstance(error, APIError)
    assert error.status == 401
    assert [m["messageId"] for m in batch] == [m["messageId"] for m in sent]
    # 401 is final: the library does not retry it.
    calls = [r for r in live_server.requests if r.path.startswith("/v1/")]
    assert [(r.path, r.status) for r in calls] == [("/v1/batch", 401)]

    live_server.wait_until_processed()
    assert live_server.stored_events() == 0
    assert admin_get(http, ws, "/api/v1/profiles")["data"] == []
    r = http.get("/api/v1/profiles/lookup", params={"user_id": "u-wrong"}, headers=ws.admin_headers)
    assert r.status_code == 404, r.text


# ---- @segment/analytics-node -----------------------------------------------------------------


def _pinned_node_version() -> str:
    package = json.loads((NODE_DIR / "package.json").read_text())
    version = package["dependencies"][NODE_LIBRARY]
    assert isinstance(version, str)
    assert version[:1].isdigit(), "pin an exact version of @segment/analytics-node"
    return version


@pytest.fixture(scope="session")
def node_sdk() -> str:
    """The node binary, with tests/sdk/node's dependencies installed from its lockfile.

    Fails (never skips) when node or npm is missing or the install fails: CI has both
    and the registry."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is required for the @segment/analytics-node test")
    installed = NODE_DIR / "node_modules" / "@segment" / "analytics-node" / "package.json"
    if not installed.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is required to install tests/sdk/node")
        try:
            done = subprocess.run(
                [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm ci did not finish within {NPM_TIMEOUT}s")
        if done.returncode != 0:
            pytest.fail(f"npm ci failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    version = json.loads(installed.read_text())["version"]
    assert version == _pinned_node_version(), "node_modules does not match package.json; run npm ci"
    return node


def run_send_mjs(node: str, host: str, write_key: str, *ids: str) -> subprocess.CompletedProcess[str]:
    """Run tests/sdk/node/send.mjs (bounded): the node library sends one person's calls."""
    try:
        return subprocess.run(
            [node, str(NODE_DIR / "send.mjs"), host, write_key, *ids],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"send.mjs did not finish within {NODE_TIMEOUT}s")


def run_node_sender(node: str, host: str, write_key: str, *ids: str) -> Json:
    done = run_send_mjs(node, host, write_key, *ids)
    assert done.returncode == 0, f"send.mjs failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    out = json.loads(done.stdout)
    assert isinstance(out, dict)
    return out


def test_node_library_anonymous_then_identified(
    live_server: LiveServer, http: httpx.Client, node_sdk: str, caplog: pytest.LogCaptureFixture
) -> None:
    ws = make_workspace(live_server.container)
    user = f"user-{uuid4()}"
    anon = f"anon-{uuid4()}"
    previous = f"crm-{uuid4()}"  # an id from another system, joined by alias
    out = run_node_sender(node_sdk, live_server.url, ws.write_key, user, anon, previous)
    version = _pinned_node_version()
    assert out["library"] == version
    sent: Sent = out["events"]
    # The callbacks run as deliveries settle, not in call order.
    assert sorted(m["type"] for m in sent) == ["alias", "group", "identify", "page", "track", "track"]

    calls = [r for r in live_server.requests if r.path.startswith("/v1/")]
    assert calls
    basic = "Basic " + base64.b64encode(f"{ws.write_key}:".encode()).decode()
    for r in calls:
        assert (r.method, r.path, r.status) == ("POST", "/v1/batch", 200)
        assert r.headers["authorization"] == basic
        assert r.headers["content-type"] == "application/json"

    live_server.wait_until_processed()
    assert_no_problems_logged(caplog)
    assert live_server.failed_events() == 0
    profile = lookup(http, ws, user_id=user)
    assert lookup(http, ws, anonymous_id=anon)["id"] == profile["id"]
    assert profile["user_ids"] == [user]
    assert sorted(profile["anonymous_ids"]) == sorted([anon, previous])
    assert profile["email"] == "node.user@example.org"
    assert profile["traits"]["email"] == "node.user@example.org"
    assert profile["traits"]["plan"] == "team"
    assert profile["timezone"] == "America/New_York"
    assert profile["event_count"] == len(sent)
    assert [(g["group_id"], g["traits"]) for g in profile["groups"]] == [
        ("globex", {"name": "Globex", "employees": 1200})
    ]

    stored = events_of(http, ws, profile["id"])
    assert_stored_as_sent(sent, stored)
    assert {e["anonymous_id"] for e in stored if e["user_id"] is None} == {anon}
    for e in stored:
        assert e["payload"]["context"]["library"] == {"name": NODE_LIBRARY, "version": version}
        assert e["payload"]["context"]["ip"] == "198.51.100.23"
    order = next(e for e in stored if e["event"] == "Order Completed")
    assert order["payload"]["properties"] == {
        "order_id": "o-77",
        "revenue": 99.95,
        "currency": "USD",
        "items": [{"sku": "N-1", "qty": 2}],
    }


def test_node_library_wrong_write_key_fails_and_stores_nothing(
    live_server: LiveServer, node_sdk: str
) -> None:
    make_workspace(live_server.container)
    done = run_send_mjs(node_sdk, live_server.url, "wk_not-a-real-key", "u-1", "a-1", "p-1")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "delivery_failure: [401]" in done.stderr
    calls = [r for r in live_server.requests if r.path.startswith("/v1/")]
    assert [(r.path, r.status) for r in calls] == [("/v1/batch", 401)]  # 401 is not retried
    assert live_server.stored_events() == 0


# ---- analytics.js (analytics-next in the browser) --------------------------------------------

ORIGIN = "https://shop.example"
AJS_VERSION = "npm:next-1.84.3"
PAGE_URL = f"{ORIGIN}/pricing?utm_source=news&utm_campaign=spring"
PAGE_CONTEXT = {
    "path": "/pricing",
    "referrer": "https://www.google.com/",
    "search": "?utm_source=news&utm_campaign=spring",
    "title": "Pricing",
    "url": PAGE_URL,
}


def js_date(value: datetime) -> str:
    """A JavaScript ``Date`` as ``JSON.stringify`` writes it."""
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BrowserSession:
    """Builds calls exactly as analytics-next 1.84's Segment.io plugin sends them.

    The shape was taken from the library's own dist/pkg code (plugins/segmentio:
    index.js, normalize.js, fetch-dispatcher.js, batched-dispatcher.js, shared-dispatcher.js;
    core/events; plugins/env-enrichment), and checked against the requests it made when
    run under jsdom with a recording ``fetch``: one POST per call to ``<apiHost>/<first
    letter of the type>`` with ``Content-Type: text/plain`` and ``Authorization: Basic
    base64(writeKey:)``, the body carrying ``writeKey``, ``sentAt`` and ``_metadata``,
    ``userId: null`` while anonymous, and ``anonymousId`` on every call; with the
    batching strategy, one POST to ``<apiHost>/b`` of ``{writeKey, batch, sentAt}`` whose
    calls lose their own ``sentAt``.
    """

    def __init__(self, write_key: str) -> None:
        self.write_key = write_key
        self.anonymous_id = str(uuid4())
        self.user_id: str | None = None
        self.clock = SystemClock()

    def _context(self) -> Json:
        return {
            "page": dict(PAGE_CONTEXT),
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "userAgentData": {
                "brands": [
                    {"brand": "Chromium", "version": "131"},
                    {"brand": "Not_A Brand", "version": "24"},
                ],
                "mobile": False,
                "platform": "macOS",
            },
            "locale": "en-US",
            "library": {"name": "analytics.js", "version": AJS_VERSION},
            "campaign": {"source": "news", "name": "spring"},
            "timezone": "Europe/Paris",
        }

    def call(self, type_: str, fields: Json) -> Json:
        now = self.clock.now()
        body: Json = {"timestamp": js_date(now), "integrations": {}, "type": type_, **fields}
        body["context"] = self._context()
        body["messageId"] = f"ajs-next-{int(now.timestamp() * 1000)}-{uuid4()}"
        body["anonymousId"] = self.anonymous_id
        body["writeKey"] = self.write_key
        # normalize.js: ``json.userId = json.userId || user.id()``, so JSON null while anonymous.
        body["userId"] = body.get("userId") or self.user_id
        body["sentAt"] = js_date(self.clock.now())
        body["_metadata"] = {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []}
        return body

    def headers(self, *, basic_auth: bool = True) -> dict[str, str]:
        headers = {"Content-Type": "text/plain", "Origin": ORIGIN}
        if basic_auth:
            token = base64.b64encode(f"{self.write_key}:".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        return headers

    def batch(self, calls: list[Json]) -> Json:
        return {
            "writeKey": self.write_key,
            "batch": [{k: v for k, v in c.items() if k != "sentAt"} for c in calls],
            "sentAt": js_date(self.clock.now()),
        }


def post_text(http: httpx.Client, path: str, body: Json, headers: dict[str, str]) -> httpx.Response:
    """POST as ``fetch(url, {method: 'post', headers, body: JSON.stringify(body)})`` does."""
    return http.post(path, content=json.dumps(body, separators=(",", ":")).encode(), headers=headers)


@pytest.mark.parametrize("path", ["/v1/t", "/v1/i", "/v1/p", "/v1/g", "/v1/a", "/v1/s", "/v1/b"])
def test_analytics_js_cors_preflight_is_answered(
    live_server: LiveServer, http: httpx.Client, path: str
) -> None:
    # analytics.js sets an Authorization header, so a browser asks first.
    r = http.options(
        path,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] in ("*", ORIGIN)
    assert "POST" in [m.strip() for m in r.headers["access-control-allow-methods"].split(",")]
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert int(r.headers["access-control-max-age"]) > 0


def test_analytics_js_requests_are_stored(
    live_server: LiveServer, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    ws = make_workspace(live_server.container)
    browser = BrowserSession(ws.write_key)
    user = f"user-{uuid4()}"
    old_id = f"legacy-{uuid4()}"
    sent: Sent = []
    requests: list[tuple[str, Json, dict[str, str]]] = []

    def single(path: str, type_: str, fields: Json, *, basic_auth: bool = True) -> None:
        body = browser.call(type_, fields)
        sent.append(body)
        requests.append((path, body, browser.headers(basic_auth=basic_auth)))

    page_properties = {**PAGE_CONTEXT, "plan": "pro", "category": "Docs", "name": "Pricing"}
    single("/v1/p", "page", {"properties": page_properties, "category": "Docs", "name": "Pricing"})
    single("/v1/t", "track", {"event": "Product Viewed", "properties": {"sku": "SKU-1", "price": 19.99}})
    browser.user_id = user
    single(
        "/v1/i",
        "identify",
        {"userId": user, "traits": {"email": "Browser.User@Example.NET", "name": "Bea"}},
    )
    single("/v1/g", "group", {"traits": {"name": "Acme"}, "groupId": "acme"})
    single("/v1/s", "screen", {"properties": {"variant": "b"}, "name": "Home"})
    single("/v1/a", "alias", {"userId": user, "previousId": old_id})
    # analytics.js classic sent no Authorization header: the write key only in the body.
    single("/v1/t", "track", {"event": "Coupon Applied", "properties": {"code": "SPRING"}}, basic_auth=False)

    for path, body, headers in requests:
        r = post_text(http, path, body, headers)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["access-control-allow-origin"] in ("*", ORIGIN)

    # The batching delivery strategy: {writeKey, batch, sentAt} to <apiHost>/b.
    batched = [
        browser.call("track", {"event": "Checkout Started", "properties": {"total": 30}}),
        browser.call("track", {"event": "Order Completed", "properties": {"total": 30, "currency": "EUR"}}),
    ]
    body = browser.batch(batched)
    r = post_text(http, "/v1/b", body, browser.headers())
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 2
    sent.extend(body["batch"])

    seen = [(r.path, r.status, r.headers["content-type"]) for r in live_server.requests if r.method == "POST"]
    assert seen == [(path, 200, "text/plain") for path, _, _ in requests] + [("/v1/b", 200, "text/plain")]

    live_server.wait_until_processed()
    assert_no_problems_logged(caplog)
    assert live_server.failed_events() == 0
    profile = lookup(http, ws, user_id=user)
    assert lookup(http, ws, anonymous_id=browser.anonymous_id)["id"] == profile["id"]
    assert profile["user_ids"] == [user]
    assert sorted(profile["anonymous_ids"]) == sorted([browser.anonymous_id, old_id])
    assert profile["email"] == "browser.user@example.net"
    assert profile["timezone"] == "Europe/Paris"
    assert profile["event_count"] == len(sent)
    assert [g["group_id"] for g in profile["groups"]] == ["acme"]

    stored = events_of(http, ws, profile["id"])
    assert_stored_as_sent(sent, stored)
    by_id = {e["message_id"]: e for e in stored}
    for msg in sent[:7]:  # single calls: their own sentAt
        assert parse_time(by_id[msg["messageId"]]["payload"]["sentAt"]) == parse_time(msg["sentAt"])
    for msg in body["batch"]:  # batched calls: the batch's sentAt
        assert parse_time(by_id[msg["messageId"]]["payload"]["sentAt"]) == parse_time(body["sentAt"])
