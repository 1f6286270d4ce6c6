"""Tracking links in sent email: /t/c (click), /t/o (open pixel), /t/u (unsubscribe).

A click redirects only to a URL that was in the message (the token is signed and the URL
must be in the message's recorded links, or the message is still in flight: see
``engagement.click_target``); anything else is a 404, never an open redirect.
Unsubscribing: ``GET /t/u/..`` shows a page with a button (link scanners follow GETs), and
``POST /t/u/..`` unsubscribes; mail clients use the POST for RFC 8058 one-click.
"""

from __future__ import annotations

import base64
import contextlib
from html import escape

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response

from whenthen.api.auth import container
from whenthen.bootstrap import Container
from whenthen.kernel.errors import NotFound
from whenthen.messaging import engagement

router = APIRouter(prefix="/t", tags=["tracking links"], include_in_schema=False)

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = {"Cache-Control": "no-store, private"}


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>{escape(title)}</title></head>"
        "<body style='font-family:sans-serif;max-width:32em;margin:4em auto'>"
        f"{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers=NO_STORE)


@router.get("/c/{token}")
async def click(request: Request, token: str) -> Response:
    c = container(request)

    def run() -> str:
        link = engagement.read_token(c.secret, token, "click")
        with c.db.write() as conn:
            url = engagement.click_target(conn, link)
            engagement.record(
                conn, link, "Email Link Clicked", {"url": url}, now=c.clock.now(), partitions=_parts(c)
            )
        c.worker.notify()
        return url

    try:
        url = await run_in_threadpool(run)
    except NotFound:
        return _page("Link not found", "<h1>This link is not valid.</h1>", 404)
    return RedirectResponse(url, status_code=302, headers=NO_STORE)


@router.get("/o/{token}")
async def open_pixel(request: Request, token: str) -> Response:
    c = container(request)

    def run() -> None:
        link = engagement.read_token(c.secret, token, "open")
        with c.db.write() as conn:
            engagement.record(conn, link, "Email Opened", {}, now=c.clock.now(), partitions=_parts(c))
        c.worker.notify()

    with contextlib.suppress(NotFound):  # a pixel always answers with a pixel
        await run_in_threadpool(run)
    return Response(PIXEL, media_type="image/gif", headers=NO_STORE)


@router.get("/u/{token}")
async def unsubscribe_page(request: Request, token: str) -> Response:
    c = container(request)
    try:
        engagement.read_token(c.secret, token, "unsubscribe")
    except NotFound:
        return _page("Link not found", "<h1>This link is not valid.</h1>", 404)
    return _page(
        "Unsubscribe",
        "<h1>Unsubscribe</h1><p>Stop receiving these emails?</p>"
        f"<form method='post' action='{escape(str(request.url.path))}'>"
        "<button type='submit' name='List-Unsubscribe' value='One-Click'>Unsubscribe</button></form>",
    )


@router.post("/u/{token}")
async def unsubscribe(request: Request, token: str) -> Response:
    c = container(request)
    form = (await _head(request, 1000)).decode("utf-8", "replace")
    source = "one-click" if "List-Unsubscribe=One-Click" in form else "unsubscribe page"

    def run() -> bool:
        link = engagement.read_token(c.secret, token, "unsubscribe")
        with c.db.write() as conn:
            done = engagement.unsubscribe(conn, link, now=c.clock.now(), partitions=_parts(c), source=source)
        c.worker.notify()
        return done

    try:
        await run_in_threadpool(run)
    except NotFound:
        return _page("Link not found", "<h1>This link is not valid.</h1>", 404)
    return _page(
        "Unsubscribed", "<h1>You are unsubscribed.</h1><p>You will not receive these emails again.</p>"
    )


async def _head(request: Request, limit: int) -> bytes:
    """The first ``limit`` bytes of the body, without reading (and holding) the rest."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit]


def _parts(c: Container) -> int:
    return c.settings.pipeline.partitions
