"""The tracking fast path (``api.tracking.FastPath``): tracking POSTs go straight to their
handler, and answer exactly as they did through the framework's routing."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.support.workspace import make_workspace
from whenthen.api import tracking
from whenthen.api.app import create_app
from whenthen.bootstrap import Container
from whenthen.tracking import CallType, service
from whenthen.tracking.tables import events


def test_the_fast_path_serves_every_tracking_route_and_only_those(client: TestClient) -> None:
    routes = {r.path: set(r.methods or ()) for r in tracking.router.routes if isinstance(r, APIRoute)}
    assert set(tracking.PATHS) == set(routes)
    # Every route of the app under /v1 is one of them.
    documented = {p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/v1/")}
    assert documented
    assert documented <= set(tracking.PATHS)
    assert all(methods == {"POST"} for methods in routes.values())
    # The router's own forced types agree with the fast path's.
    assert tracking.PATHS["/v1/batch"] is None
    assert tracking.PATHS["/v1/t"] is CallType.TRACK
    assert tracking.PATHS["/v1/a"] is CallType.ALIAS


def test_tracking_posts_do_not_go_through_the_router(
    client: TestClient, container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(container)
    seen: list[str] = []
    original = APIRoute.handle

    async def spy(self: APIRoute, scope: Any, receive: Any, send: Any) -> None:
        seen.append(self.path)
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", spy)
    r = client.post("/v1/track", auth=ws.write_auth, json={"userId": "u1", "event": "Viewed"})
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}
    r = client.post("/v1/batch", auth=ws.write_auth, json={"batch": [{"type": "identify", "userId": "u2"}]})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    assert seen == []
    # Everything else still goes through it.
    assert client.get("/health").status_code == 200
    assert seen == ["/health"]
    with container.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar_one() == 2


def test_a_wrong_key_is_answered_as_the_app_answers_it(client: TestClient) -> None:
    r = client.post("/v1/track", auth=("wk_wrong", ""), json={"userId": "u1", "event": "Viewed"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="whenthen"'
    assert r.json()["error"]["code"] == "unauthorized"


def test_cross_origin_posts_keep_their_cors_headers(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    r = client.post(
        "/v1/t",
        content=b'{"userId": "u1", "event": "Viewed", "writeKey": "%s"}' % ws.write_key.encode(),
        headers={"Content-Type": "text/plain", "Origin": "https://shop.example"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"


def test_other_methods_and_paths_fall_through_to_the_router(client: TestClient, container: Container) -> None:
    ws = make_workspace(container)
    assert client.get("/v1/track").status_code == 405
    r = client.post(
        "/v1/track/", auth=ws.write_auth, json={"userId": "u1", "event": "Viewed"}, follow_redirects=False
    )
    assert r.status_code == 307  # the router's trailing-slash redirect, as before
    assert r.headers["location"].endswith("/v1/track")


def test_an_unexpected_error_is_a_json_500_and_raised_on(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(container)

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "prepare", broken)
    app = create_app(container, run_worker=False)
    body = {"batch": [{"type": "track", "userId": "u", "event": "e"}]}
    with TestClient(app) as tc, pytest.raises(RuntimeError, match="boom"):
        tc.post("/v1/batch", auth=ws.write_auth, json=body)
    with TestClient(app, raise_server_exceptions=False) as tc:
        r = tc.post("/v1/batch", auth=ws.write_auth, json=body)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
