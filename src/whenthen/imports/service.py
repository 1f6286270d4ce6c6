"""List imports: queued in the outbox, processed a chunk per transaction. Never commits."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from whenthen import lists, messaging, profiles
from whenthen.imports.csvfile import Row
from whenthen.kernel.errors import NotFound
from whenthen.kernel.ids import new_secret
from whenthen.lists.tables import list_imports
from whenthen.profiles.normalization import normalise_email

CHUNK = 1000
MAX_REPORTED = 1000


def start(conn: Connection, ws: str, list_key: str, rows: list[Row], *, now: datetime) -> str:
    import_id = "imp_" + new_secret(9).replace("-", "a").replace("_", "b")
    conn.execute(
        insert(list_imports).values(
            id=import_id,
            workspace_id=ws,
            list_key=list_key,
            status="queued",
            total_rows=len(rows),
            processed_rows=0,
            added=0,
            already_members=0,
            rejected=[],
            created_at=now,
        )
    )
    messaging.enqueue_job(
        conn,
        ws,
        "list_import",
        {"import_id": import_id, "rows": [[r.number, r.kind, r.value] for r in rows], "offset": 0},
        now,
    )
    return import_id


def process_chunk(conn: Connection, job_payload: dict[str, Any], ws: str, *, now: datetime) -> dict[str, Any]:
    """Handle the next chunk of rows; returns the payload to keep (``offset`` moves on)."""
    import_id = job_payload["import_id"]
    state = conn.execute(select(list_imports).where(list_imports.c.id == import_id)).first()
    if state is None:
        return {**job_payload, "offset": len(job_payload["rows"])}
    offset = int(job_payload["offset"])
    chunk = job_payload["rows"][offset : offset + CHUNK]
    added = already = 0
    rejected: list[dict[str, Any]] = list(state.rejected or [])
    extra_rejected = 0
    joined: list[str] = []
    for number, kind, value in chunk:
        reason = None
        if kind is None or value is None:
            reason = "no user_id, email, anonymous_id or profile_id"
        elif kind == "email" and normalise_email(value) is None:
            reason = f"invalid email {value!r}"
        else:
            pid = profiles.find(conn, ws, kind, value)
            if pid is None:
                reason = f"no person with {kind} {value!r} (send them through the tracking API first)"
            elif lists.add_member(conn, ws, state.list_key, pid, source=f"import:{import_id}", now=now):
                added += 1
                joined.append(pid)
            else:
                already += 1
        if reason is not None:
            if len(rejected) < MAX_REPORTED:
                rejected.append({"row": number, "reason": reason})
            else:
                extra_rejected += 1
    # Segments reading the list follow through the worker's recheck step.
    profiles.mark_for_recheck(conn, ws, joined, "list", now)
    processed = offset + len(chunk)
    finished = processed >= len(job_payload["rows"])
    conn.execute(
        update(list_imports)
        .where(list_imports.c.id == import_id)
        .values(
            status="done" if finished else "running",
            processed_rows=processed,
            added=list_imports.c.added + added,
            already_members=list_imports.c.already_members + already,
            rejected=rejected,
            finished_at=now if finished else None,
        )
    )
    return {**job_payload, "offset": processed, "unreported_rejections": extra_rejected}


def status(conn: Connection, ws: str, list_key: str, import_id: str) -> dict[str, Any]:
    row = conn.execute(
        select(list_imports).where(
            list_imports.c.id == import_id,
            list_imports.c.workspace_id == ws,
            list_imports.c.list_key == list_key,
        )
    ).first()
    if row is None:
        raise NotFound("import")
    return {
        "id": row.id,
        "list": row.list_key,
        "status": row.status,
        "total_rows": row.total_rows,
        "processed_rows": row.processed_rows,
        "added": row.added,
        "already_members": row.already_members,
        "rejected": row.rejected,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
    }
