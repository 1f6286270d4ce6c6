"""Segment-compatible tracking: validation, the durable event log, and reads of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from whenthen.tracking import repository as _repo
from whenthen.tracking.model import AcceptedEvent, CallType, IngestResult, Rejection, StoredEvent


def events_for_profile(
    conn: Connection, profile_ids: Sequence[str], *, after: tuple[datetime, int] | None, limit: int
) -> list[StoredEvent]:
    """A person's events in time order (ties by arrival), from ``after`` on."""
    return [_repo.to_stored(r) for r in _repo.for_profile(conn, profile_ids, after=after, limit=limit)]


def named_events(
    conn: Connection, profile_id: str, names: Sequence[str], *, since: datetime | None, limit: int = 10_000
) -> list[StoredEvent]:
    """A person's events with one of ``names``, newest first (processed ones only carry a profile)."""
    return [_repo.to_stored(r) for r in _repo.named_for_profile(conn, profile_id, names, since, limit)]


def workspace_history(conn: Connection, workspace_id: str, *, limit: int) -> list[StoredEvent]:
    """The workspace's processed events in time order (for backtests), at most ``limit``."""
    return [_repo.to_stored(r) for r in _repo.for_workspace(conn, workspace_id, limit)]


def pending_events(conn: Connection, partitions: Sequence[int], limit: int) -> list[StoredEvent]:
    """The oldest ``limit`` pending events of these partitions, in log order (locked on
    PostgreSQL): of each partition, the oldest of its pending events."""
    return [_repo.to_stored(r) for r in _repo.pending(conn, partitions, limit)]


def finish_events(
    conn: Connection,
    processed: dict[int, str | None],
    suppressed: Sequence[int] = (),
    failed: Sequence[int] = (),
) -> None:
    """Mark events processed (with the profile they belong to), drop suppressed ones
    (an erased person's events are not kept), and park failed ones."""
    _repo.mark(conn, processed, _repo.PROCESSED)
    _repo.delete_seqs(conn, suppressed)
    _repo.mark(conn, dict.fromkeys(failed), _repo.FAILED)


@dataclass(frozen=True, slots=True)
class SystemCall:
    """A track call the system makes about a person (engagement, scores, stages, segments)."""

    message_id: str
    event: str
    user_id: str | None
    anonymous_id: str | None
    payload: dict[str, Any]


def emit_many(
    conn: Connection, workspace_id: str, calls: Sequence[SystemCall], *, now: datetime, partitions: int
) -> int:
    """Append calls the system produced to the log, each in its person's partition,
    deduplicated on the message id like any call; returns how many were newly stored."""
    from whenthen.tracking import service

    track = CallType.TRACK
    # Positional: AcceptedEvent's fields in order (message id, type, event, user id,
    # anonymous id, timestamp, received at, payload); keywords cost twice the time.
    accepted = [
        AcceptedEvent(c.message_id, track, c.event, c.user_id, c.anonymous_id, now, now, c.payload)
        for c in calls
    ]
    stored, _ = service.append(conn, workspace_id, accepted, partitions=partitions)
    return stored


def attribute_events(conn: Connection, seq_to_profile: dict[int, str]) -> None:
    """Say which profile each event belongs to before its batch ends (one executemany)."""
    _repo.mark(conn, dict(seq_to_profile), _repo.PENDING)


def pending_partitions(conn: Connection, candidates: Sequence[int]) -> list[int]:
    """Those of ``candidates`` that hold pending events (an index probe each)."""
    return _repo.pending_partitions(conn, candidates)


def count_pending(conn: Connection) -> int:
    return _repo.count_pending(conn)


def reassign_events(conn: Connection, from_profile: str, into_profile: str) -> int:
    return _repo.reassign_profile(conn, from_profile, into_profile)


def delete_events_of_person(
    conn: Connection,
    workspace_id: str,
    profile_ids: Sequence[str],
    user_ids: Sequence[str],
    anonymous_ids: Sequence[str],
) -> int:
    return _repo.delete_for_person(conn, workspace_id, profile_ids, user_ids, anonymous_ids)


__all__ = [
    "AcceptedEvent",
    "CallType",
    "IngestResult",
    "Rejection",
    "StoredEvent",
    "SystemCall",
    "attribute_events",
    "count_pending",
    "delete_events_of_person",
    "emit_many",
    "events_for_profile",
    "finish_events",
    "named_events",
    "pending_events",
    "pending_partitions",
    "reassign_events",
    "workspace_history",
]
