"""Profiles and the rules for merging them. Pure."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from whenthen.kernel.ids import ProfileId, WorkspaceId


class IdentityKind(enum.StrEnum):
    USER_ID = "user_id"
    ANONYMOUS_ID = "anonymous_id"


@dataclass(frozen=True, slots=True)
class Identity:
    kind: IdentityKind
    value: str


@dataclass(frozen=True, slots=True)
class Profile:
    id: ProfileId
    workspace_id: WorkspaceId
    traits: dict[str, Any]
    trait_times: dict[str, str]
    email: str | None
    phone: str | None
    timezone: str | None
    first_seen: datetime | None
    last_seen: datetime | None
    event_count: int
    merged_into: ProfileId | None
    created_at: datetime
    updated_at: datetime
    identities: tuple[Identity, ...] = field(default=())

    @property
    def user_ids(self) -> list[str]:
        return [i.value for i in self.identities if i.kind is IdentityKind.USER_ID]

    @property
    def anonymous_ids(self) -> list[str]:
        return [i.value for i in self.identities if i.kind is IdentityKind.ANONYMOUS_ID]


@dataclass(frozen=True, slots=True)
class Merge:
    from_profile_id: ProfileId
    into_profile_id: ProfileId
    reason: str
    message_id: str | None
    merged_at: datetime


def apply_traits(
    traits: dict[str, Any],
    trait_times: dict[str, str],
    incoming: dict[str, Any],
    at: datetime,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Set each incoming top-level trait unless the profile holds a newer value for it.

    Latest timestamp wins, per top-level key; on a tie the later-processed call wins.
    Nested objects (``address``) are replaced whole, as Segment's identify does.
    """
    stamp = trait_stamp(at)
    new_traits = dict(traits)
    new_times = dict(trait_times)
    for key, value in incoming.items():
        current = new_times.get(key)
        if current is None or current <= stamp:
            new_traits[key] = value
            new_times[key] = stamp
    return new_traits, new_times


def trait_stamp(at: datetime) -> str:
    """A fixed-width UTC stamp, so stamps order as strings."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def merge_traits(
    into: tuple[dict[str, Any], dict[str, str]],
    source: tuple[dict[str, Any], dict[str, str]],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Combine two profiles' traits: for each key, the value set most recently wins;
    on a tie the surviving profile (``into``) keeps its value."""
    traits, times = dict(into[0]), dict(into[1])
    for key, value in source[0].items():
        theirs = source[1].get(key, "")
        ours = times.get(key)
        if ours is None or theirs > ours:
            traits[key] = value
            times[key] = theirs
    return traits, times


def earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return min(x for x in (a, b) if x is not None) if (a or b) else None


def latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return max(x for x in (a, b) if x is not None) if (a or b) else None
