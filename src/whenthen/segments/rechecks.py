"""Re-evaluating people whose audience state changed outside the pipeline.

Writers outside the event pipeline (admin API, CSV import, journey actions, tag rules)
mark the person with ``profiles.mark_for_recheck`` in the transaction of their change.
:func:`recheck_step`, a worker step, takes the oldest marks, re-evaluates each person in
every segment of their workspace and clears the mark, in one transaction. A person marked
again while the step ran keeps their mark (it is cleared only if unchanged) and is taken
again on the next step. A person merged away or erased meanwhile is dropped.

Each person is settled inside a savepoint: on PostgreSQL a pipeline worker may settle
the same person concurrently, and the loser of that race (a duplicate membership row)
keeps its mark and retries on the next step instead of failing the whole batch.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from whenthen.kernel.clock import Clock
from whenthen.profiles.rechecks import done, queued
from whenthen.profiles.tables import profiles as profiles_table
from whenthen.segments import service
from whenthen.segments.evaluator import DecaySpec
from whenthen.storage import Database


def recheck(conn: Connection, now: datetime, emit: service.Emit, *, limit: int = 500) -> int:
    """Settle up to ``limit`` marked people; returns how many marks were taken."""
    marks = queued(conn, limit=limit)
    by_ws: dict[str, list[service.Segment]] = {}
    lives: dict[str, dict[str, DecaySpec]] = {}
    for mark in marks:
        ws = mark.workspace_id
        if ws not in by_ws:
            by_ws[ws] = service.all_segments(conn, ws)
            lives[ws] = service.half_lives_of(conn, ws) if by_ws[ws] else {}
        alive = conn.execute(
            select(profiles_table.c.id).where(
                profiles_table.c.workspace_id == ws,
                profiles_table.c.id == mark.profile_id,
                profiles_table.c.merged_into.is_(None),
            )
        ).first()
        if alive is not None and by_ws[ws]:
            try:
                with conn.begin_nested():
                    service.on_change(
                        conn,
                        ws,
                        mark.profile_id,
                        now,
                        segments=by_ws[ws],
                        event_name=None,
                        emit=emit,
                        cause=f"recheck:{mark.profile_id}:{mark.queued_at.isoformat()}",
                        at=mark.queued_at,
                        half_lives=lives[ws],
                    )
            except IntegrityError:
                continue  # settled concurrently by the pipeline: keep the mark, retry later
        done(conn, mark)
    return len(marks)


def recheck_step(db: Database, clock: Clock, emit: service.Emit, *, limit: int = 500) -> int:
    """A worker step: settle the oldest marked people in one transaction."""
    with db.write() as conn:
        return recheck(conn, clock.now(), emit, limit=limit)
