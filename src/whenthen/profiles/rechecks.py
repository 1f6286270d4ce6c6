"""People whose audience state changed outside the event pipeline. Never commits.

The pipeline re-evaluates a person's segments as it applies each of their events. Lists,
tags, the lifecycle stage and traits can also change elsewhere: the admin API, a CSV
import, a journey's action, a tag rule. Those writers call :func:`mark` in the same
transaction as their change; a worker step (``segments.rechecks``) takes the marked
people in order and re-evaluates them, so membership follows within a worker tick and no
full rescan is needed. One row per person: marking again only moves ``queued_at``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from whenthen.profiles.tables import profile_rechecks


@dataclass(frozen=True, slots=True)
class Recheck:
    workspace_id: str
    profile_id: str
    reason: str
    queued_at: datetime


def mark(conn: Connection, ws: str, profile_ids: Iterable[str], reason: str, now: datetime) -> None:
    """Queue the people for a segment re-evaluation (idempotent per person)."""
    rows = [
        {"workspace_id": ws, "profile_id": pid, "reason": reason[:40], "queued_at": now}
        for pid in dict.fromkeys(profile_ids)
    ]
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(profile_rechecks)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["workspace_id", "profile_id"],
            set_={"reason": stmt.excluded.reason, "queued_at": stmt.excluded.queued_at},
        ),
        rows,
    )


#: Built once: the worker asks on every pass, mostly to hear there are none.
_QUEUED = select(profile_rechecks).order_by(profile_rechecks.c.queued_at).limit(bindparam("limit"))


def queued(conn: Connection, *, limit: int) -> list[Recheck]:
    """The oldest marks first."""
    rows = conn.execute(_QUEUED, {"limit": limit}).all()
    return [Recheck(r.workspace_id, r.profile_id, r.reason, r.queued_at) for r in rows]


def done(conn: Connection, recheck: Recheck) -> None:
    """Remove the mark unless the person was marked again since it was read."""
    conn.execute(
        delete(profile_rechecks).where(
            profile_rechecks.c.workspace_id == recheck.workspace_id,
            profile_rechecks.c.profile_id == recheck.profile_id,
            profile_rechecks.c.queued_at == recheck.queued_at,
        )
    )


def forget(conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
    conn.execute(
        delete(profile_rechecks).where(
            profile_rechecks.c.workspace_id == ws, profile_rechecks.c.profile_id.in_(list(profile_ids))
        )
    )
