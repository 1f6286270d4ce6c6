"""The Segment HTTP Tracking API: /v1/identify, /v1/track, ... /v1/batch.

Paths the Segment libraries use are all served: the long names, analytics.js's short
ones (/v1/t, /v1/i, /v1/p, /v1/s, /v1/g, /v1/a), /v1/batch, /v1/b and /v1/import.
Bodies are read whatever the Content-Type (analytics.js sends text/plain to avoid a CORS
preflight) and may be gzip- or deflate-encoded.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from whenthen.api.auth import authenticate_write_key, basic_user, container
from whenthen.api.errors import domain_error_response, error_response, unexpected_error_response
from whenthen.api.group_commit import TrackingWriter, writer
from whenthen.api.responses import JSONBody
from whenthen.bootstrap import Container
from whenthen.kernel.errors import DomainError, Unauthorized
from whenthen.tracking import CallType, service
from whenthen.tracking.parsing import decompress
from whenthen.tracking.validation import Invalid, Limits
from whenthen.workspaces import Principal

router = APIRouter(tags=["tracking"])


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Invalid("payload_too_large", f"the body may be at most {limit} bytes", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Invalid("payload_too_large", f"the body may be at most {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _limits(c: Container) -> Limits:
    s = c.settings.ingest
    return Limits(
        max_event_bytes=s.max_event_bytes,
        max_nesting_depth=s.max_nesting_depth,
        max_future=timedelta(seconds=s.max_future_seconds),
        min_year=s.min_timestamp_year,
    )


async def _handle(request: Request, forced_type: CallType | None) -> Response:
    c = container(request)
    s = c.settings.ingest
    limit = s.max_event_bytes if forced_type is not None else s.max_batch_bytes
    try:
        raw = await _read_body(request, limit)
        body = decompress(raw, request.headers.get("content-encoding"), limit)
        if not body or body.isspace():
            raise Invalid("invalid_json", "the body is empty")
        value, exact = service.parse(body)
        if forced_type is not None:
            grouped = await _single(c, request, body, value, exact, forced_type)
            if grouped is not None:
                return grouped
        return await run_in_threadpool(_ingest, c, request, body, value, exact, forced_type)
    except Invalid as exc:
        return error_response(exc.status, exc.code, exc.message)


async def _single(
    c: Container, request: Request, body: bytes, value: Any, exact: bool, forced_type: CallType
) -> Response | None:
    """A valid single call, stored by the group-commit writer with the calls of concurrent
    requests (``api/group_commit.py``); ``None`` for a call that is not valid, which
    ``_ingest`` answers (its checks come in the documented order)."""
    key = _write_key(request, value)
    if not key:
        return None
    received_at = c.clock.now()
    try:
        prepared = _prepare(c, body, value, exact, forced_type, received_at)
    except Invalid:
        return None
    [event] = prepared.accepted
    refusal = await writer(request.app.state).write(key, event, received_at)
    return refusal if refusal is not None else JSONBody(_SINGLE_OK)


def _prepare(
    c: Container, body: bytes, value: Any, exact: bool, forced_type: CallType | None, received_at: datetime
) -> service.Prepared:
    return service.prepare(
        body,
        value,
        exact,
        forced_type=forced_type,
        received_at=received_at,
        limits=_limits(c),
        max_batch_events=c.settings.ingest.max_batch_events,
    )


def make_writer(c: Container) -> TrackingWriter:
    """The tracking writer (group commit of single calls, and of batches on SQLite) for an
    app over ``c``; stopped with the app (its lifespan) or, at the latest, when the
    container is closed."""
    made = TrackingWriter(c, _rate_limited)
    c.closers.append(made.stop)
    return made


def _write_key(request: Request, value: Any) -> str | None:
    """The write key: HTTP Basic user name first, else ``writeKey`` in the body."""
    try:
        key = basic_user(request) or service.write_key_in_body(value)
    except ValueError:
        # base64 refuses a header holding non-ASCII characters with a plain ValueError.
        raise Unauthorized("malformed Basic authorization header") from None
    if key is not None:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in the body's writeKey
            raise Unauthorized("missing, invalid or revoked key") from None
    return key


def _ingest(
    c: Container, request: Request, body: bytes, value: Any, exact: bool, forced_type: CallType | None
) -> Response:
    """Validate, then check the key and append in one transaction.

    Checks answer in the documented order (docs/design/tracking.md): a wrong key is a
    401 before any 400 about the request or its calls, and a refused request is refused
    before the rate limit. The key is looked up in the append's own transaction when there
    is something to append (the writer's transaction, shared with the other requests in
    flight; a key revoked before it commits is refused); else, and before any error about
    the calls, on its own.
    """
    key = _write_key(request, value)
    if not key:
        raise Unauthorized("a write key is required: HTTP Basic user name or writeKey in the body")
    received_at = c.clock.now()
    try:
        prepared = _prepare(c, body, value, exact, forced_type, received_at)
    except Invalid:
        authenticate_write_key(c, key)
        raise
    stored, duplicates = 0, prepared.duplicates
    if prepared.accepted:
        # Stored with the calls of the other requests in flight on SQLite (group commit),
        # in a transaction of its own on PostgreSQL; the key is checked and the rate
        # limit applied in that transaction.
        outcome = writer(request.app.state).write_batch(key, prepared.accepted, received_at)
        if not isinstance(outcome, int):
            return outcome  # the 429: nothing written
        stored = outcome
        duplicates += len(prepared.accepted) - stored
    else:
        refusal = _rate_limited(c, authenticate_write_key(c, key), 1, received_at)
        if refusal is not None:
            return refusal
    if forced_type is not None:
        return JSONBody(_SINGLE_OK)
    rejected = [
        {"index": r.index, "code": r.code, "message": r.message, "messageId": r.message_id}
        for r in prepared.rejected
    ]
    if rejected and not prepared.accepted:
        raise DomainError(
            "invalid_batch",
            "no call in the batch was accepted",
            status=400,
            details={"rejected": rejected},
        )
    return JSONBody({"success": True, "accepted": stored, "duplicates": duplicates, "rejected": rejected})


_SINGLE_OK = {"success": True}


def _rate_limited(c: Container, principal: Principal, calls: int, now: datetime) -> Response | None:
    """The 429 when the workspace's bucket lacks ``calls`` tokens (at least one a request)."""
    decision = c.buckets.take(principal.workspace_id, max(1, calls), now)
    if decision.allowed:
        return None
    return error_response(
        429,
        "rate_limited",
        "too many events for this workspace; retry after the given delay",
        {"Retry-After": str(decision.retry_after_seconds)},
    )


#: Every tracking path and the call type it forces (``None``: a batch).
PATHS: dict[str, CallType | None] = {}


class FastPath:
    """Sends ``POST`` requests to the tracking paths straight to their handler, past the
    framework's routing, dependency and exception layers, which cost about as much as
    the handler's own work for a single call (docs/benchmarks.md, "Ingest"). Installed
    inside the CORS middleware, so browsers get the same headers; errors are answered as
    the app's exception handlers answer them. Any other request, and a path that does not
    match exactly (a trailing slash, say), goes through the app as before."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path in PATHS:
                request = Request(scope, receive)
                try:
                    response = await _handle(request, PATHS[path])
                except DomainError as exc:
                    response = domain_error_response(request, exc)
                except Exception as exc:
                    # As Starlette's ServerErrorMiddleware: the JSON 500, then the error
                    # raised on to the server (which logs it; a test client re-raises it).
                    await unexpected_error_response(exc)(scope, receive, send)
                    raise
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route(paths: tuple[str, ...], forced_type: CallType | None) -> None:
    async def endpoint(request: Request) -> Response:
        return await _handle(request, forced_type)

    name = forced_type.value if forced_type else "batch"
    endpoint.__name__ = f"segment_{name}"
    for i, path in enumerate(paths):
        PATHS[path] = forced_type
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            include_in_schema=i == 0,
            summary=f"Segment {name} call",
            name=f"segment_{name}_{i}",
        )


_route(("/v1/identify", "/v1/i"), CallType.IDENTIFY)
_route(("/v1/track", "/v1/t"), CallType.TRACK)
_route(("/v1/page", "/v1/p"), CallType.PAGE)
_route(("/v1/screen", "/v1/s"), CallType.SCREEN)
_route(("/v1/group", "/v1/g"), CallType.GROUP)
_route(("/v1/alias", "/v1/a"), CallType.ALIAS)
_route(("/v1/batch", "/v1/b", "/v1/import"), None)
