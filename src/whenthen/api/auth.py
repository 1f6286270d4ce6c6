"""Resolving the caller: admin keys as Bearer tokens, write keys as Segment does."""

from __future__ import annotations

import base64
import binascii

from fastapi import Request
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from whenthen import workspaces
from whenthen.bootstrap import Container
from whenthen.kernel.errors import Unauthorized
from whenthen.workspaces import KeyKind, Principal


def container(request: Request) -> Container:
    c = request.app.state.container
    assert isinstance(c, Container)
    return c


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def basic_user(request: Request) -> str | None:
    """The user name of HTTP Basic auth: where Segment's libraries put the write key."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # ValueError: non-ASCII base64, UnicodeDecodeError
        raise Unauthorized("malformed Basic authorization header") from None
    user, _, _password = decoded.partition(":")
    return user or None


def _authenticate(c: Container, key: str, kind: KeyKind) -> Principal:
    with c.db.read() as conn:
        return workspaces.authenticate(conn, key, kind)


async def admin(request: Request) -> Principal:
    """FastAPI dependency: the workspace of a valid, unrevoked admin key."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("an admin key is required: Authorization: Bearer <admin key>")
    return await run_in_threadpool(_authenticate, container(request), token, KeyKind.ADMIN)


def authenticate_write_key(c: Container, key: str | None) -> Principal:
    if not key:
        raise Unauthorized("a write key is required: HTTP Basic user name or writeKey in the body")
    return _authenticate(c, key, KeyKind.WRITE)


def authenticate_write_key_in(conn: Connection, key: str) -> Principal:
    """The write key's workspace, looked up in a transaction the caller has open (the
    tracking API's append), so that the key is checked where the events are written."""
    return workspaces.authenticate(conn, key, KeyKind.WRITE)
