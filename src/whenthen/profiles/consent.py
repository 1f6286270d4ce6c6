"""Consent per channel, tags, and trait updates made by journeys. Never commits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from whenthen.profiles import repository as repo
from whenthen.profiles.model import apply_traits, trait_stamp
from whenthen.profiles.normalization import normalise_traits, reachability
from whenthen.profiles.tables import consents, profile_tags
from whenthen.storage.driver import DriverQuery
from whenthen.storage.id_lists import by_ids, per_dialect


def set_consent(
    conn: Connection, ws: str, profile_id: str, channel: str, status: str, *, source: str, now: datetime
) -> bool:
    """Record a consent decision; returns whether it changed anything."""
    row = conn.execute(
        select(consents.c.status).where(
            consents.c.workspace_id == ws, consents.c.profile_id == profile_id, consents.c.channel == channel
        )
    ).first()
    if row is not None and row.status == status:
        return False
    if row is None:
        conn.execute(
            insert(consents).values(
                workspace_id=ws,
                profile_id=profile_id,
                channel=channel,
                status=status,
                source=source,
                changed_at=now,
            )
        )
    else:
        conn.execute(
            update(consents)
            .where(
                consents.c.workspace_id == ws,
                consents.c.profile_id == profile_id,
                consents.c.channel == channel,
            )
            .values(status=status, source=source, changed_at=now)
        )
    return True


def consent_status(conn: Connection, ws: str, profile_id: str, channel: str) -> str | None:
    row = conn.execute(
        select(consents.c.status).where(
            consents.c.workspace_id == ws, consents.c.profile_id == profile_id, consents.c.channel == channel
        )
    ).first()
    return str(row.status) if row else None


def consent_statuses(conn: Connection, ws: str, profile_ids: Iterable[str], channel: str) -> dict[str, str]:
    """``consent_status`` of many profiles at once: those with a decision on ``channel``."""
    ids = list(profile_ids)
    if not ids:
        return {}
    rows = _STATUSES[conn.dialect.name].all(conn, {"ids": ids, "ws": ws, "channel": channel})
    return {profile_id: str(status) for profile_id, status in rows}


#: By the ids as one list parameter (``storage.id_lists.by_ids``), prebuilt: the
#: dispatcher reads a batch's consents with it.
_STATUSES = per_dialect(
    lambda d: DriverQuery(
        by_ids(
            d,
            consents,
            "profile_id",
            "ids",
            [consents.c.profile_id, consents.c.status],
            consents.c.workspace_id == bindparam("ws"),
            consents.c.channel == bindparam("channel"),
        )
    )
)


def consents_of(conn: Connection, ws: str, profile_id: str) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        select(consents).where(consents.c.workspace_id == ws, consents.c.profile_id == profile_id)
    )
    return {r.channel: {"status": r.status, "source": r.source, "changed_at": r.changed_at} for r in rows}


def add_tags(conn: Connection, ws: str, profile_id: str, tags: Iterable[str], now: datetime) -> None:
    current = set(tags_of(conn, ws, profile_id))
    for tag in dict.fromkeys(t.strip() for t in tags if t.strip()):
        if tag not in current:
            conn.execute(
                insert(profile_tags).values(workspace_id=ws, profile_id=profile_id, tag=tag, added_at=now)
            )


def remove_tags(conn: Connection, ws: str, profile_id: str, tags: Iterable[str]) -> None:
    names = [t.strip() for t in tags]
    if names:
        conn.execute(
            delete(profile_tags).where(
                profile_tags.c.workspace_id == ws,
                profile_tags.c.profile_id == profile_id,
                profile_tags.c.tag.in_(names),
            )
        )


def tags_of(conn: Connection, ws: str, profile_id: str) -> list[str]:
    rows = conn.execute(
        select(profile_tags.c.tag)
        .where(profile_tags.c.workspace_id == ws, profile_tags.c.profile_id == profile_id)
        .order_by(profile_tags.c.tag)
    )
    return [r[0] for r in rows]


def update_traits(
    conn: Connection,
    ws: str,
    profile_id: str,
    *,
    set_: Mapping[str, Any],
    unset: Iterable[str],
    now: datetime,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Set and remove traits as of ``now`` (latest timestamp wins, like identify).
    Returns the traits before and after, or ``None`` when the person is gone."""
    profile = repo.get(conn, ws, profile_id, lock=True)
    if profile is None:
        return None
    traits, times = apply_traits(profile.traits, profile.trait_times, normalise_traits(dict(set_)), now)
    for key in unset:
        traits.pop(key, None)
        times[key] = trait_stamp(now)
    reach = reachability(traits)
    from dataclasses import replace

    repo.save_state(
        conn,
        replace(profile, traits=traits, trait_times=times, email=reach.email, phone=reach.phone),
        now,
    )
    return profile.traits, traits


def move_to(conn: Connection, ws: str, from_id: str, into_id: str, now: datetime) -> None:
    """On a merge: tags and consent of the source join the survivor (an unsubscribe wins)."""
    add_tags(conn, ws, into_id, tags_of(conn, ws, from_id), now)
    conn.execute(
        delete(profile_tags).where(profile_tags.c.workspace_id == ws, profile_tags.c.profile_id == from_id)
    )
    for channel, info in consents_of(conn, ws, from_id).items():
        mine = consent_status(conn, ws, into_id, channel)
        if mine is None or info["status"] == "unsubscribed":
            set_consent(
                conn, ws, into_id, channel, info["status"], source=info["source"], now=info["changed_at"]
            )
    conn.execute(delete(consents).where(consents.c.workspace_id == ws, consents.c.profile_id == from_id))


def delete_for(conn: Connection, ws: str, profile_ids: list[str]) -> None:
    conn.execute(
        delete(profile_tags).where(
            profile_tags.c.workspace_id == ws, profile_tags.c.profile_id.in_(profile_ids)
        )
    )
    conn.execute(
        delete(consents).where(consents.c.workspace_id == ws, consents.c.profile_id.in_(profile_ids))
    )
