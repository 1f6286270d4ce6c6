"""Signed tokens for tracking links: clicks, opens and unsubscribes. Pure.

A token is ``base64url(json) . base64url(hmac-sha256[:16])``. Only the server can make
one, so a click redirects only to a URL that was signed into a message we sent.
"""

from __future__ import annotations

import base64
import hmac
from typing import Any

import orjson


class BadToken(ValueError):
    """A tracking-link token that is malformed or not signed by this server."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> str:
    # ``hmac.digest``: OpenSSL's one-shot HMAC, the same bytes as ``hmac.new(...).digest()``
    # without building an HMAC object (a message signs three or more tokens).
    return _b64(hmac.digest(secret, b"whenthen-link\x1f" + body.encode("ascii"), "sha256")[:16])


def sign(secret: bytes, payload: dict[str, Any]) -> str:
    body = _b64(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
    return f"{body}.{_mac(secret, body)}"


def verify(secret: bytes, token: str) -> dict[str, Any]:
    if not token or len(token) > 8192 or token.count(".") != 1:
        raise BadToken("malformed token")
    body, mac = token.split(".")
    if not (body.isascii() and mac.isascii()):
        # hmac.compare_digest refuses non-ASCII str (TypeError): a forged token is a bad
        # token, never a server error.
        raise BadToken("malformed token")
    if not hmac.compare_digest(_mac(secret, body).encode("ascii"), mac.encode("ascii")):
        raise BadToken("bad signature")
    try:
        payload = orjson.loads(_unb64(body))
    except (ValueError, orjson.JSONDecodeError):
        raise BadToken("malformed token") from None
    if not isinstance(payload, dict):
        raise BadToken("malformed token")
    return payload
