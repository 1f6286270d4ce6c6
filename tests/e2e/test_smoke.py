from __future__ import annotations

from fastapi.testclient import TestClient

from tests.support.workspace import make_workspace
from whenthen.bootstrap import Container


def test_track_then_lookup_merged_profile(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    r = client.post("/v1/track", auth=ws.write_auth, json={"anonymousId": "a1", "event": "Viewed"})
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}
    r = client.post(
        "/v1/identify",
        auth=ws.write_auth,
        json={"anonymousId": "a1", "userId": "u1", "traits": {"email": "Ann@Example.com"}},
    )
    assert r.status_code == 200, r.text
    container.worker.drain()
    r = client.get("/api/v1/profiles/lookup", params={"user_id": "u1"}, headers=ws.admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_ids"] == ["u1"]
    assert body["anonymous_ids"] == ["a1"]
    assert body["email"] == "ann@example.com"
    assert body["event_count"] == 2
