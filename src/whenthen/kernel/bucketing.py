"""Stable hashing: the same input lands in the same bucket in every process and on every replay."""

from __future__ import annotations

import hashlib


def stable_bucket(parts: tuple[str, ...], buckets: int) -> int:
    """Map ``parts`` to ``0 .. buckets-1``; independent of PYTHONHASHSEED and of the machine."""
    if buckets <= 0:
        raise ValueError("buckets must be positive")
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def partition_for(workspace_id: str, routing_key: str, partitions: int) -> int:
    """The event-log partition of a person: by ``userId`` when known, else ``anonymousId``."""
    return stable_bucket((workspace_id, routing_key), partitions)
