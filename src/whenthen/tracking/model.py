"""What the tracking API accepts and refuses. Pure data."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple


class CallType(enum.StrEnum):
    IDENTIFY = "identify"
    TRACK = "track"
    PAGE = "page"
    SCREEN = "screen"
    GROUP = "group"
    ALIAS = "alias"


class AcceptedEvent(NamedTuple):
    """One validated, normalised Segment call, ready to append to the log.

    ``payload`` is the call as sent (unknown fields kept) with ``messageId``,
    ``timestamp`` (skew-corrected), ``originalTimestamp``, ``sentAt`` and ``receivedAt``
    filled in, and ``writeKey`` removed.

    Immutable like the frozen dataclasses of this module, but a named tuple: one is made
    for every call ingested, and a named tuple is made in a quarter of the time a frozen
    dataclass takes (docs/benchmarks.md, "Ingest").
    """

    message_id: str
    type: CallType
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    timestamp: datetime
    received_at: datetime
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one call was refused. ``index`` is its position in a batch (0 for single calls)."""

    index: int
    code: str
    message: str
    status: int = 400
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int
    duplicates: int
    rejected: tuple[Rejection, ...]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as kept in the log, handed to other concepts."""

    seq: int
    workspace_id: str
    message_id: str
    type: CallType
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    timestamp: datetime
    received_at: datetime
    payload: dict[str, Any]
    profile_id: str | None
