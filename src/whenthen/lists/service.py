"""Static lists: named sets of profiles, changed by API, import or journeys. Never commits."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select

from whenthen.lists.tables import list_members, static_lists


def ensure_list(conn: Connection, ws: str, key: str, *, name: str | None, now: datetime) -> None:
    row = conn.execute(
        select(static_lists.c.key).where(static_lists.c.workspace_id == ws, static_lists.c.key == key)
    ).first()
    if row is None:
        conn.execute(insert(static_lists).values(workspace_id=ws, key=key, name=name or key, created_at=now))


def add_member(conn: Connection, ws: str, key: str, profile_id: str, *, source: str, now: datetime) -> bool:
    ensure_list(conn, ws, key, name=None, now=now)
    exists = conn.execute(
        select(list_members.c.profile_id).where(
            list_members.c.workspace_id == ws,
            list_members.c.list_key == key,
            list_members.c.profile_id == profile_id,
        )
    ).first()
    if exists:
        return False
    conn.execute(
        insert(list_members).values(
            workspace_id=ws, list_key=key, profile_id=profile_id, added_at=now, source=source
        )
    )
    return True


def remove_member(conn: Connection, ws: str, key: str, profile_id: str) -> bool:
    result = conn.execute(
        delete(list_members).where(
            list_members.c.workspace_id == ws,
            list_members.c.list_key == key,
            list_members.c.profile_id == profile_id,
        )
    )
    return result.rowcount > 0


def members(conn: Connection, ws: str, key: str, *, after: str | None = None, limit: int = 100) -> list[str]:
    stmt = select(list_members.c.profile_id).where(
        list_members.c.workspace_id == ws, list_members.c.list_key == key
    )
    if after:
        stmt = stmt.where(list_members.c.profile_id > after)
    return [r[0] for r in conn.execute(stmt.order_by(list_members.c.profile_id).limit(limit))]


def lists_of(conn: Connection, ws: str, profile_id: str) -> list[str]:
    # ``added_at`` is read (and not used) so that no index covers the query: SQLite (no
    # statistics) preferred the primary key (workspace, list, person), which covers
    # ``list_key`` alone, and walked the whole workspace in it for the person's few rows;
    # with a column only the table holds, it searches ``ix_list_members_profile``. It runs
    # on every merge. Sorted here rather than by ``ORDER BY``, which favours the key too.
    rows = conn.execute(
        select(list_members.c.list_key, list_members.c.added_at).where(
            list_members.c.workspace_id == ws, list_members.c.profile_id == profile_id
        )
    )
    return sorted(r[0] for r in rows)


def all_lists(conn: Connection, ws: str) -> list[dict[str, Any]]:
    counts: dict[str, int] = dict(
        conn.execute(
            select(list_members.c.list_key, func.count())
            .where(list_members.c.workspace_id == ws)
            .group_by(list_members.c.list_key)
        ).all()
    )
    rows = conn.execute(
        select(static_lists).where(static_lists.c.workspace_id == ws).order_by(static_lists.c.key)
    )
    return [
        {"key": r.key, "name": r.name, "members": int(counts.get(r.key, 0)), "created_at": r.created_at}
        for r in rows
    ]


def move_members(conn: Connection, ws: str, from_id: str, into_id: str, now: datetime) -> None:
    for key in lists_of(conn, ws, from_id):
        add_member(conn, ws, key, into_id, source="merge", now=now)
    conn.execute(
        delete(list_members).where(list_members.c.workspace_id == ws, list_members.c.profile_id == from_id)
    )


def delete_for(conn: Connection, ws: str, profile_ids: list[str]) -> None:
    conn.execute(
        delete(list_members).where(
            list_members.c.workspace_id == ws, list_members.c.profile_id.in_(profile_ids)
        )
    )
