"""The admin API over HTTP: reads, pagination, export, erasure, keys, and tenant isolation."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.ingest import send
from tests.support.workspace import TestWorkspace, make_workspace
from whenthen.bootstrap import Container
from whenthen.kernel.clock import ManualClock


@pytest.fixture
def two(container: Container, clock: ManualClock) -> tuple[TestWorkspace, TestWorkspace, str, str]:
    """Workspaces A and B, each with one identified person; returns their profile ids."""
    a = make_workspace(container, "A")
    b = make_workspace(container, "B")
    for i in range(5):
        send(
            container,
            a.id,
            {
                "type": "track",
                "userId": "ann",
                "event": f"E{i}",
                "messageId": f"a{i}",
                "properties": {"i": i},
            },
            drain=False,
        )
        clock.advance(timedelta(seconds=1))
    send(
        container,
        a.id,
        {
            "type": "identify",
            "userId": "ann",
            "traits": {"plan": "pro", "email": "ann@a.com"},
            "messageId": "ai",
        },
    )
    send(container, b.id, {"type": "identify", "userId": "bob", "traits": {"plan": "pro"}, "messageId": "bi"})
    ra = _get(container, a, "/api/v1/profiles/lookup", params={"user_id": "ann"})
    rb = _get(container, b, "/api/v1/profiles/lookup", params={"user_id": "bob"})
    return a, b, ra["id"], rb["id"]


def _get(container: Container, ws: TestWorkspace, path: str, **kw: Any) -> Any:
    from whenthen.api.app import create_app

    with TestClient(create_app(container, run_worker=False)) as tc:
        r = tc.get(path, headers=ws.admin_headers, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def test_profile_reads(client: TestClient, two: tuple[TestWorkspace, TestWorkspace, str, str]) -> None:
    a, _, pa, _ = two
    h = a.admin_headers
    body = client.get(f"/api/v1/profiles/{pa}", headers=h).json()
    assert body["user_ids"] == ["ann"]
    assert body["traits"] == {"plan": "pro", "email": "ann@a.com"}
    assert body["event_count"] == 6
    assert client.get("/api/v1/profiles/lookup", params={"email": "ANN@a.com"}, headers=h).json()["id"] == pa

    # Events in time order, paginated with an opaque cursor.
    page1 = client.get(f"/api/v1/profiles/{pa}/events", params={"limit": 4}, headers=h).json()
    assert [e["message_id"] for e in page1["data"]] == ["a0", "a1", "a2", "a3"]
    assert page1["data"][0]["payload"]["properties"] == {"i": 0}
    page2 = client.get(
        f"/api/v1/profiles/{pa}/events", params={"limit": 4, "cursor": page1["next_cursor"]}, headers=h
    ).json()
    assert [e["message_id"] for e in page2["data"]] == ["a4", "ai"]
    assert page2["next_cursor"] is None

    listed = client.get("/api/v1/profiles", params={"trait.plan": "pro"}, headers=h).json()
    assert [p["id"] for p in listed["data"]] == [pa]
    assert client.get("/api/v1/profiles", params={"trait.plan": "free"}, headers=h).json()["data"] == []

    export = client.get(f"/api/v1/profiles/{pa}/export", headers=h)
    assert export.status_code == 200
    assert "attachment" in export.headers["content-disposition"]
    assert len(export.json()["events"]) == 6


def test_list_paginates(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    send(container, ws.id, *({"type": "identify", "userId": f"u{i}", "messageId": str(i)} for i in range(7)))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = client.get("/api/v1/profiles", params=params, headers=ws.admin_headers).json()
        seen += [p["id"] for p in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7
    assert len(set(seen)) == 7


def test_erase_over_http(client: TestClient, two: tuple[TestWorkspace, TestWorkspace, str, str]) -> None:
    a, _, pa, _ = two
    r = client.delete(f"/api/v1/profiles/{pa}", headers=a.admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["events_deleted"] == 6
    assert client.get(f"/api/v1/profiles/{pa}", headers=a.admin_headers).status_code == 404
    r = client.get("/api/v1/profiles/lookup", params={"user_id": "ann"}, headers=a.admin_headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_bad_queries_are_clear_errors(
    client: TestClient, two: tuple[TestWorkspace, TestWorkspace, str, str]
) -> None:
    a, _, pa, _ = two
    h = a.admin_headers
    r = client.get("/api/v1/profiles/lookup", headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_query")
    r = client.get("/api/v1/profiles/lookup", params={"user_id": "x", "email": "y"}, headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_query")
    r = client.get(f"/api/v1/profiles/{pa}/events", params={"cursor": "!!!"}, headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_cursor")
    r = client.get(f"/api/v1/profiles/{pa}/events", params={"limit": 0}, headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "validation_error")
    r = client.post("/api/v1/keys", json={"kind": "superuser"}, headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "validation_error")


def test_keys_lifecycle(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    r = client.post("/api/v1/keys", json={"kind": "admin", "name": "ops"}, headers=h)
    assert r.status_code == 201
    new = r.json()
    assert new["key"].startswith("ak_")
    listed = client.get("/api/v1/keys", headers=h).json()["data"]
    assert {k["id"] for k in listed} >= {new["id"]}
    assert all("key" not in k for k in listed)  # plaintext is never shown again
    new_h = {"Authorization": f"Bearer {new['key']}"}
    assert client.get("/api/v1/workspace", headers=new_h).json()["id"] == ws.id
    assert client.delete(f"/api/v1/keys/{new['id']}", headers=h).json()["active"] is False
    r = client.get("/api/v1/workspace", headers=new_h)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")


def test_keys_are_stored_hashed(container: Container) -> None:
    from sqlalchemy import select

    from whenthen.workspaces.tables import api_keys

    ws = make_workspace(container)
    with container.db.read() as conn:
        dump = str(conn.execute(select(api_keys)).all())
    assert ws.admin_key not in dump
    assert ws.write_key not in dump


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic Zm9vOg=="},
        {"Authorization": "Bearer "},
    ],
)
def test_missing_or_wrong_admin_key(client: TestClient, headers: dict[str, str]) -> None:
    r = client.get("/api/v1/profiles", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


def test_write_key_is_not_an_admin_key(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    r = client.get("/api/v1/profiles", headers={"Authorization": f"Bearer {ws.write_key}"})
    assert r.status_code == 401


ADMIN_CALLS = [
    ("GET", "/api/v1/profiles/{pa}"),
    ("GET", "/api/v1/profiles/{pa}/events"),
    ("GET", "/api/v1/profiles/{pa}/export"),
    ("DELETE", "/api/v1/profiles/{pa}"),
    ("DELETE", "/api/v1/keys/{ka}"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
def test_workspace_b_cannot_touch_workspace_a(
    client: TestClient,
    container: Container,
    two: tuple[TestWorkspace, TestWorkspace, str, str],
    method: str,
    path: str,
) -> None:
    a, b, pa, _ = two
    ka = client.get("/api/v1/keys", headers=a.admin_headers).json()["data"][0]["id"]
    r = client.request(method, path.format(pa=pa, ka=ka), headers=b.admin_headers)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"
    # A's data is untouched.
    assert client.get(f"/api/v1/profiles/{pa}", headers=a.admin_headers).status_code == 200
    assert all(k["active"] for k in client.get("/api/v1/keys", headers=a.admin_headers).json()["data"])


def test_workspace_b_sees_only_its_own(
    client: TestClient, two: tuple[TestWorkspace, TestWorkspace, str, str]
) -> None:
    a, b, pa, pb = two
    hb = b.admin_headers
    assert [p["id"] for p in client.get("/api/v1/profiles", headers=hb).json()["data"]] == [pb]
    assert [
        p["id"]
        for p in client.get("/api/v1/profiles", params={"trait.plan": "pro"}, headers=hb).json()["data"]
    ] == [pb]
    for params in ({"user_id": "ann"}, {"email": "ann@a.com"}):
        assert client.get("/api/v1/profiles/lookup", params=params, headers=hb).status_code == 404
    assert client.get("/api/v1/workspace", headers=hb).json()["id"] == b.id
    key_ids_b = {k["id"] for k in client.get("/api/v1/keys", headers=hb).json()["data"]}
    key_ids_a = {k["id"] for k in client.get("/api/v1/keys", headers=a.admin_headers).json()["data"]}
    assert key_ids_a.isdisjoint(key_ids_b)
    assert len(key_ids_b) == 2
    assert pa not in str(client.get("/api/v1/profiles", headers=hb).json())


def test_write_key_of_b_writes_into_b(client: TestClient, container: Container) -> None:
    a = make_workspace(container, "A")
    b = make_workspace(container, "B")
    r = client.post("/v1/track", auth=b.write_auth, json={"userId": "zed", "event": "E"})
    assert r.status_code == 200
    container.worker.drain()
    assert (
        client.get("/api/v1/profiles/lookup", params={"user_id": "zed"}, headers=a.admin_headers).status_code
        == 404
    )
    assert (
        client.get("/api/v1/profiles/lookup", params={"user_id": "zed"}, headers=b.admin_headers).status_code
        == 200
    )


def test_openapi_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path in (
        "/v1/track",
        "/v1/batch",
        "/v1/identify",
        "/api/v1/profiles/lookup",
        "/api/v1/profiles/{profile_id}/events",
    ):
        assert path in doc["paths"], path
    assert client.get("/health").json()["status"] == "ok"
