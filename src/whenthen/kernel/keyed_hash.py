"""Keyed hashes: for key lookup and for erasure tombstones that must not reveal the identity."""

from __future__ import annotations

import hashlib
import hmac


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def keyed_hash(secret: bytes, value: str) -> str:
    """HMAC-SHA256 of ``value`` under ``secret``; the same input always gives the same hash."""
    return hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
