"""Static lists (members, CSV imports with a report) and tags over HTTP."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.support.ingest import send
from tests.support.workspace import TestWorkspace, make_workspace
from whenthen.bootstrap import Container


def people(container: Container, ws: TestWorkspace, *users: str) -> dict[str, str]:
    send(
        container,
        ws.id,
        *({"type": "identify", "userId": u, "traits": {"email": f"{u}@example.com"}} for u in users),
    )
    from whenthen import profiles

    with container.db.read() as conn:
        return {u: profiles.lookup(conn, ws.id, user_id=u).id for u in users}


def test_lists_and_members(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    ids = people(container, ws, "ann", "bob", "cid")
    r = client.post("/api/v1/lists", json={"key": "attendees", "name": "Tea Summit attendees"}, headers=h)
    assert r.status_code == 201
    assert r.json()["members"] == 0
    assert (
        client.post("/api/v1/lists", json={"key": "Bad Key!"}, headers=h).json()["error"]["code"]
        == "invalid_key"
    )
    r = client.post(
        "/api/v1/lists/attendees/members",
        json={"user_ids": ["ann", "nobody"], "emails": ["BOB@example.com"], "profile_ids": [ids["ann"]]},
        headers=h,
    )
    assert r.json() == {"added": 2, "already_members": 0, "not_found": [{"user_id": "nobody"}]}
    r = client.post("/api/v1/lists/attendees/members", json={"user_ids": ["ann", "cid"]}, headers=h)
    assert r.json() == {"added": 1, "already_members": 1, "not_found": []}
    first = client.get("/api/v1/lists/attendees/members", params={"limit": 2}, headers=h).json()
    rest = client.get(
        "/api/v1/lists/attendees/members", params={"limit": 2, "cursor": first["next_cursor"]}, headers=h
    ).json()
    assert sorted(first["data"] + rest["data"]) == sorted(ids.values())
    assert rest["next_cursor"] is None
    assert client.delete(f"/api/v1/lists/attendees/members/{ids['bob']}", headers=h).json() == {
        "removed": True
    }
    assert client.delete(f"/api/v1/lists/attendees/members/{ids['bob']}", headers=h).json() == {
        "removed": False
    }
    assert [x["members"] for x in client.get("/api/v1/lists", headers=h).json()["data"]] == [2]
    assert client.get("/api/v1/lists/nope/members", headers=h).status_code == 404
    assert client.get(f"/api/v1/profiles/{ids['ann']}/tags", headers=h).json()["lists"] == ["attendees"]


def test_csv_import_with_progress_and_report(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    ids = people(container, ws, "ann", "bob")
    client.post("/api/v1/lists/vip/members", json={"user_ids": ["bob"]}, headers=h)
    csv = (
        "\ufeffEmail,User_ID,name\n"  # a BOM and other case, as spreadsheets write them
        "ann@example.com,,Ann\n"
        ",bob,Bob\n"
        "not-an-email,,Zed\n"
        "ghost@example.com,,Ghost\n"
        ",,nobody\n"
        "\n"
        "ANN@example.com,,Ann again\n"
    )
    r = client.post(
        "/api/v1/lists/vip/imports", content=csv.encode(), headers={**h, "Content-Type": "text/csv"}
    )
    assert r.status_code == 202, r.text
    status_url = r.json()["status_url"]
    assert r.json()["rows"] == 6
    assert client.get(status_url, headers=h).json()["status"] == "queued"
    container.worker.drain()
    report = client.get(status_url, headers=h).json()
    assert report["status"] == "done"
    assert (report["total_rows"], report["processed_rows"], report["added"], report["already_members"]) == (
        6,
        6,
        1,
        2,
    )
    assert report["rejected"] == [
        {"row": 4, "reason": "invalid email 'not-an-email'"},
        {
            "row": 5,
            "reason": "no person with email 'ghost@example.com' (send them through the tracking API first)",
        },
        {"row": 6, "reason": "no user_id, email, anonymous_id or profile_id"},
    ]
    members = client.get("/api/v1/lists/vip/members", headers=h).json()["data"]
    assert sorted(members) == sorted(ids.values())


def test_bad_csv_files_are_refused_with_a_reason(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    for body, reason in [
        (b"", "the file is empty"),
        (b"name,city\nAnn,Lyon\n", "the header needs one of: user_id, email, anonymous_id, profile_id"),
        (b"\xff\xfe\x00bad", "the file is not UTF-8"),
        (b"user_id\na\x00b\n", "the file contains NUL characters"),
    ]:
        r = client.post("/api/v1/lists/x/imports", content=body, headers=h)
        assert r.status_code == 400, body
        assert r.json()["error"] == {"code": "invalid_csv", "message": reason}


def test_tags(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    h = ws.admin_headers
    ids = people(container, ws, "ann")
    url = f"/api/v1/profiles/{ids['ann']}/tags"
    assert client.post(url, json={"tags": ["vip", "prefers-wechat", "vip"]}, headers=h).json()["tags"] == [
        "prefers-wechat",
        "vip",
    ]
    assert client.delete(f"{url}/vip", headers=h).json()["tags"] == ["prefers-wechat"]
    assert client.post(url, json={"tags": []}, headers=h).status_code == 400
    assert client.post(url, json={"tags": ["x" * 101]}, headers=h).status_code == 400


def test_another_workspace_sees_none_of_it(client: TestClient, container: Container) -> None:
    a = make_workspace(container, "A")
    b = make_workspace(container, "B")
    ids = people(container, a, "ann")
    client.post("/api/v1/lists/vip/members", json={"user_ids": ["ann"]}, headers=a.admin_headers)
    imp = client.post("/api/v1/lists/vip/imports", content=b"user_id\nann\n", headers=a.admin_headers).json()
    hb = b.admin_headers
    assert client.get("/api/v1/lists", headers=hb).json()["data"] == []
    assert client.get("/api/v1/lists/vip/members", headers=hb).status_code == 404
    assert client.get(f"/api/v1/lists/vip/imports/{imp['import_id']}", headers=hb).status_code == 404
    assert client.get(f"/api/v1/profiles/{ids['ann']}/tags", headers=hb).status_code == 404
    assert (
        client.post(f"/api/v1/profiles/{ids['ann']}/tags", json={"tags": ["x"]}, headers=hb).status_code
        == 404
    )
    assert client.delete(f"/api/v1/lists/vip/members/{ids['ann']}", headers=hb).status_code == 404
    r = client.post("/api/v1/lists/vip/members", json={"profile_ids": [ids["ann"]]}, headers=hb)
    assert r.json() == {"added": 0, "already_members": 0, "not_found": [{"profile_id": ids["ann"]}]}


def test_erasure_removes_list_membership_and_tags(client: TestClient, container: Container) -> None:
    from sqlalchemy import select

    from whenthen.lists.tables import list_members
    from whenthen.profiles.tables import profile_tags

    ws = make_workspace(container)
    h = ws.admin_headers
    ids = people(container, ws, "ann")
    client.post("/api/v1/lists/vip/members", json={"user_ids": ["ann"]}, headers=h)
    client.post(f"/api/v1/profiles/{ids['ann']}/tags", json={"tags": ["vip"]}, headers=h)
    assert client.delete(f"/api/v1/profiles/{ids['ann']}", headers=h).status_code == 200
    with container.db.read() as conn:
        assert conn.execute(select(list_members)).all() == []
        assert conn.execute(select(profile_tags)).all() == []
