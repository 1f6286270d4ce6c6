"""The journeys admin API over HTTP: definitions, versions, enrollment, simulation, isolation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient

from tests.support.ingest import send
from tests.support.workspace import make_workspace
from whenthen.bootstrap import Container

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"


def definition(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return data


def test_schema_is_published(client: TestClient) -> None:
    schema = client.get("/api/v1/journeys/schema").json()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "nodes" in schema["properties"]
    assert {"trigger", "start", "nodes", "key", "name"} <= set(schema["required"])


def test_push_yaml_and_json_with_precise_errors(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    r = client.post(
        "/api/v1/journeys",
        content=(EXAMPLES / "ebook.yaml").read_bytes(),
        headers={**h, "Content-Type": "application/yaml"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "draft"
    bad = definition("ebook")
    bad["nodes"]["send_ebook"]["next"] = "nowhere"
    bad["nodes"]["reminder"]["email"] = {"subject": "x"}
    r = client.post("/api/v1/journeys", json=bad, headers=h)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_definition"
    problems = {(p["node"], p["field"]) for p in err["problems"]}
    assert ("reminder", "email") in problems
    r = client.post("/api/v1/journeys/validate", json={**definition("ebook"), "start": "nope"}, headers=h)
    assert r.status_code == 400
    assert r.json()["error"]["problems"] == [
        {"node": None, "field": "start", "reason": "no node named 'nope'"}
    ]
    r = client.post("/api/v1/journeys", content=b"{not json", headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_document")


def test_versions_are_immutable_and_in_flight_people_stay_pinned(
    client: TestClient, container: Container
) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    v1 = definition("welcome-series")
    assert client.post("/api/v1/journeys", json=v1, headers=h).status_code == 201
    assert client.post("/api/v1/journeys/welcome-series/publish", headers=h).json()["active_version"] == 1
    r = client.post("/api/v1/journeys/welcome-series/publish", headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "nothing_to_publish")
    send(container, ws.id, {"type": "identify", "userId": "early", "traits": {"email": "early@example.com"}})
    send(container, ws.id, {"type": "track", "userId": "early", "event": "Signed Up"})
    v2 = definition("welcome-series")
    v2["nodes"]["tips"]["email"]["subject"] = "New tips"
    client.post("/api/v1/journeys", json=v2, headers=h)
    body = client.get("/api/v1/journeys/welcome-series", params={"version": 1}, headers=h).json()
    assert body["definition"]["nodes"]["tips"]["email"]["subject"] == "Three tips to get more out of it"
    assert [v["version"] for v in body["versions"]] == [1, 2]
    assert body["active_version"] == 1
    client.post("/api/v1/journeys/welcome-series/publish", headers=h)
    profile = client.get("/api/v1/profiles/lookup", params={"user_id": "early"}, headers=h).json()
    [enrollment] = client.get(f"/api/v1/profiles/{profile['id']}/journeys", headers=h).json()["data"]
    assert enrollment["version"] == 1
    assert enrollment["status"] == "active"
    assert enrollment["journal"][0]["kind"] == "entered"


def test_enroll_through_the_api_and_message_log(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    d = {
        "key": "loan-offer",
        "name": "Loan offer",
        "trigger": {"kind": "api"},
        "start": "offer",
        "nodes": {
            "offer": {
                "kind": "send_email",
                "email": {
                    "subject": "Your offer: {{ payload.amount }} EUR at {{ payload.rate }}%",
                    "text": "Hi",
                },
            }
        },
    }
    client.post("/api/v1/journeys", json=d, headers=h)
    send(container, ws.id, {"type": "identify", "userId": "u1", "traits": {"email": "u1@example.com"}})
    r = client.post("/api/v1/journeys/loan-offer/enroll", json={"user_id": "u1", "payload": {}}, headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "journey_not_active")
    client.post("/api/v1/journeys/loan-offer/publish", headers=h)
    r = client.post("/api/v1/journeys/loan-offer/enroll", json={"user_id": "nobody"}, headers=h)
    assert r.status_code == 404
    r = client.post(
        "/api/v1/journeys/loan-offer/enroll",
        json={"user_id": "u1", "payload": {"amount": 5000, "rate": 3.9}},
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert r.json()["enrolled"] is True
    # Entry frequency "once" (the default): a second enrollment is refused quietly.
    assert (
        client.post("/api/v1/journeys/loan-offer/enroll", json={"user_id": "u1"}, headers=h).json()[
            "enrolled"
        ]
        is False
    )
    container.worker.drain()
    [msg] = client.get("/api/v1/journeys/loan-offer/messages", headers=h).json()["data"]
    assert msg["subject"] == "Your offer: 5000 EUR at 3.9%"
    assert msg["status"] == "captured"  # no SMTP configured: kept in the local mailbox
    assert msg["delivered"] is False
    mailbox = client.get("/api/v1/mailbox", headers=h).json()
    assert mailbox["delivered"] is False
    assert [m["id"] for m in mailbox["data"]] == [msg["id"]]
    pid = r.json()["profile_id"]
    assert client.get(f"/api/v1/profiles/{pid}/messages", headers=h).json()["data"][0]["id"] == msg["id"]


def test_simulate_and_backtest(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    events = [
        {"type": "track", "userId": "u", "event": "Signed Up", "timestamp": "2026-11-20T08:00:00Z"},
    ]
    r = client.post(
        "/api/v1/journeys/simulate",
        json={"definition": definition("welcome-series"), "events": events},
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert r.json()["summary"] == {"completed": 1, "emails": 3}
    r = client.post(
        "/api/v1/journeys/simulate",
        json={"definition": definition("welcome-series"), "events": events, "until": "2026-11-21T00:00:00Z"},
        headers=h,
    )
    assert r.json()["summary"] == {"active": 1, "emails": 1}
    send(container, ws.id, {"type": "track", "userId": "stored", "event": "Signed Up"})
    r = client.post(
        "/api/v1/journeys/simulate",
        json={"definition": definition("welcome-series"), "backtest": True},
        headers=h,
    )
    assert r.json()["summary"]["emails"] == 3
    assert len(r.json()["people"]) == 1
    r = client.post(
        "/api/v1/journeys/simulate",
        json={"definition": definition("welcome-series"), "events": [{"x": 1}]},
        headers=h,
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_events")
    # Nothing was stored or sent by simulating.
    assert client.get("/api/v1/journeys", headers=h).json()["data"] == []


def test_signal_returns_at_once(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    r = client.post(
        "/api/v1/signals",
        json={"name": "storm_warning", "properties": {"city": "Shanghai"}},
        headers=ws.admin_headers,
    )
    assert r.status_code == 202
    assert r.json()["accepted"] is True


def test_journeys_of_one_workspace_are_invisible_to_another(client: TestClient, container: Container) -> None:
    a = make_workspace(container, "A")
    b = make_workspace(container, "B")
    client.post("/api/v1/journeys", json=definition("ebook"), headers=a.admin_headers)
    client.post("/api/v1/journeys/ebook/publish", headers=a.admin_headers)
    hb = b.admin_headers
    assert client.get("/api/v1/journeys", headers=hb).json()["data"] == []
    for method, path in [
        ("GET", "/api/v1/journeys/ebook"),
        ("POST", "/api/v1/journeys/ebook/publish"),
        ("POST", "/api/v1/journeys/ebook/pause"),
        ("POST", "/api/v1/journeys/ebook/archive"),
        ("GET", "/api/v1/journeys/ebook/messages"),
    ]:
        r = client.request(method, path, headers=hb)
        assert r.status_code == 404, (method, path, r.text)
    # B may create its own journey with the same key.
    assert client.post("/api/v1/journeys", json=definition("ebook"), headers=hb).status_code == 201
    assert client.get("/api/v1/journeys/ebook", headers=a.admin_headers).json()["status"] == "active"
    assert client.get("/api/v1/journeys/ebook", headers=hb).json()["status"] == "draft"
    for path in ("/api/v1/journeys", "/api/v1/mailbox", "/api/v1/signals"):
        assert client.get(path).status_code in (401, 405)
