"""Re-evaluating people whose audience state changed outside the pipeline.

Writers outside the event pipeline (admin API, CSV import, journey actions, tag rules)
mark the person with ``profiles.mark_for_recheck`` in the transaction of their change.
:func:`recheck_step`, a worker step, takes the oldest marks, re-evaluates each person in
every segment of their workspace and clears the mark, in one transaction. A person marked
again while the step ran keeps their mark (it is cleared only if unchanged) and is taken
again on the next step. A person merged away or erased meanwhile is dropped.

On PostgreSQL the person's profile row is locked first (skipping it when another
transaction holds it, e.g. a pipeline worker applying their events: the mark is kept for
a later step). Each person is also settled inside a savepoint: should a writer that does
not take that lock settle the same person concurrently, the loser of the race (a
duplicate membership row) keeps its mark and retries on the next step instead of failing
the whole batch.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.exc import IntegrityError

from whenthen.kernel.clock import Clock
from whenthen.profiles.rechecks import done, queued
from whenthen.profiles.tables import profiles as profiles_table
from whenthen.segments import service
from whenthen.segments.evaluator import DecaySpec
from whenthen.storage import Database

#: The person, if they still exist and are not merged away. On PostgreSQL their row is
#: locked, skipping one another transaction holds: a pipeline worker applying their
#: events holds it for its batch, and settling the person at the same moment would decide
#: on what this step cannot see yet. Such a person keeps their mark for a later step; the
#: step never waits (the holder may be waiting for a row this step wrote).
_ALIVE = select(profiles_table.c.id).where(
    profiles_table.c.workspace_id == bindparam("ws"),
    profiles_table.c.id == bindparam("pid"),
    profiles_table.c.merged_into.is_(None),
)
_ALIVE_LOCKED = {"sqlite": _ALIVE, "postgresql": _ALIVE.with_for_update(skip_locked=True)}


def recheck(conn: Connection, now: datetime, emit: service.Emit, *, limit: int = 500) -> int:
    """Settle up to ``limit`` marked people; returns how many marks were taken (not those
    of people another transaction holds: they wait for a later step)."""
    marks = queued(conn, limit=limit)
    by_ws: dict[str, list[service.Segment]] = {}
    lives: dict[str, dict[str, DecaySpec]] = {}
    left = 0
    for mark in marks:
        ws = mark.workspace_id
        if ws not in by_ws:
            by_ws[ws] = service.all_segments(conn, ws)
            lives[ws] = service.half_lives_of(conn, ws) if by_ws[ws] else {}
        alive = conn.execute(_ALIVE_LOCKED[conn.dialect.name], {"ws": ws, "pid": mark.profile_id}).first()
        held = (
            alive is None
            and conn.dialect.name == "postgresql"
            and conn.execute(_ALIVE, {"ws": ws, "pid": mark.profile_id}).first() is not None
        )
        if held:
            left += 1
            continue  # a pipeline worker is applying their events: the mark stays
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
    return len(marks) - left


def recheck_step(db: Database, clock: Clock, emit: service.Emit, *, limit: int = 500) -> int:
    """A worker step: settle the oldest marked people in one transaction."""
    with db.write() as conn:
        return recheck(conn, clock.now(), emit, limit=limit)
