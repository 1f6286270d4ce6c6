"""Segments stored, and their membership maintained. Never commits.

Membership is kept in ``segment_members`` (with every entry and exit in
``segment_history``) three ways (see ``docs/design/segments.md``, "Membership"):

* saving a segment recomputes it for the whole workspace with the SQL compiler;
* :func:`on_change` re-evaluates one profile with the evaluator after the pipeline applied
  one of its events, for the segments that event can affect;
* :func:`fire_due_timers` re-evaluates a profile when ``next_change`` said its answer may
  change by the passage of time alone (a window ends).

Entries and exits are announced through an ``emit`` callback (the pipeline's, which appends
``Segment Entered`` / ``Segment Exited`` to the person's log): this layer may not import
the pipeline.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, delete, func, insert, select, update

from whenthen import lists, scoring
from whenthen.kernel.clock import Clock
from whenthen.kernel.errors import DomainError, NotFound
from whenthen.profiles.tables import identities, profile_tags, profiles
from whenthen.scoring.tables import profile_scores, profile_stages
from whenthen.segments.compiler import members_query
from whenthen.segments.definition import (
    EngagementCondition,
    EventCondition,
    InvalidSegment,
    ListCondition,
    Op,
    PerformedTimeCondition,
    ScoreCondition,
    SegmentDefinition,
    SequenceCondition,
    StageCondition,
    TagCondition,
    TraitCondition,
    parse_segment,
    walk,
)
from whenthen.segments.evaluator import ProfileView, evaluate, next_change
from whenthen.segments.tables import segment_history, segment_members, segment_timers, segments
from whenthen.storage import Database
from whenthen.tracking.tables import events

ENTERED = "Segment Entered"
EXITED = "Segment Exited"


class Emit(Protocol):
    """Append a system event to the person's log; ``cause`` makes its message id (the same
    cause never emits the same event twice). The pipeline's ``emit`` with its partitions
    bound (``functools.partial(emit, partitions=n)``) is one."""

    def __call__(
        self,
        conn: Connection,
        ws: str,
        profile_id: str,
        name: str,
        properties: dict[str, Any],
        *,
        now: datetime,
        cause: str,
    ) -> None: ...


def no_emit(
    conn: Connection,
    ws: str,
    profile_id: str,
    name: str,
    properties: dict[str, Any],
    *,
    now: datetime,
    cause: str,
) -> None:
    """An :data:`Emit` that announces nothing."""


@dataclass(frozen=True, slots=True)
class Segment:
    id: str
    workspace_id: str
    key: str
    name: str
    definition: SegmentDefinition
    document: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime

    @property
    def event_names(self) -> frozenset[str]:
        return event_names(self.definition)

    @property
    def has_state(self) -> bool:
        return has_state(self.definition)

    def info(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "definition": self.document,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


# ---- what a definition looks at ------------------------------------------------------------


def event_names(definition: SegmentDefinition) -> frozenset[str]:
    """Every event name a definition's event, performed-time, sequence or engagement leaves read."""
    out: set[str] = set()
    for cond in walk(definition.condition):
        if isinstance(cond, EventCondition | PerformedTimeCondition):
            out.add(cond.event)
        elif isinstance(cond, SequenceCondition):
            for spec in (cond.first, cond.then, cond.then_not):
                if spec is not None:
                    out.add(spec.event)
        elif isinstance(cond, EngagementCondition):
            out.update(c.event for c in cond.as_events())
    return frozenset(out)


def has_state(definition: SegmentDefinition) -> bool:
    """Whether the definition reads traits, lists, tags, scores or the stage."""
    state = TraitCondition | ListCondition | TagCondition | ScoreCondition | StageCondition
    return any(isinstance(c, state) for c in walk(definition.condition))


def time_dependent(definition: SegmentDefinition) -> bool:
    """Whether the answer can change by the passage of time alone (some leaf has a window,
    a relative date, a ``then_not`` wait, or reads a score, which may decay)."""
    for c in walk(definition.condition):
        if isinstance(c, EventCondition | EngagementCondition) and c.within_last is not None:
            return True
        if isinstance(c, TraitCondition) and c.op in (Op.WITHIN_LAST, Op.WITHIN_NEXT, Op.OLDER_THAN):
            return True
        if isinstance(c, PerformedTimeCondition) and c.op in ("within_last", "within_next", "older_than"):
            return True
        if isinstance(c, SequenceCondition) and (c.first_within_last is not None or c.then_not is not None):
            return True
        if isinstance(c, ScoreCondition):
            return True
    return False


def relevant(segment: Segment, event_name: str | None) -> bool:
    """Whether a change can affect the segment: any change (``event_name`` None) affects
    every segment; a track event affects the segments that read its name, and every
    segment that reads state (traits, lists, tags, scores, stage), which the same event may
    have changed through the profile or scoring."""
    if event_name is None:
        return True
    return segment.has_state or event_name in segment.event_names


# ---- the segments -------------------------------------------------------------------------


def _parse(data: Any) -> SegmentDefinition:
    try:
        return parse_segment(data)
    except InvalidSegment as exc:
        raise DomainError(
            "invalid_definition",
            "the definition is not valid",
            details={"problems": [p.model_dump() for p in exc.problems]},
        ) from None


def _row_to_segment(row: Any) -> Segment:
    return Segment(
        id=row.id,
        workspace_id=row.workspace_id,
        key=row.key,
        name=row.name,
        definition=parse_segment(row.definition),
        document=dict(row.definition),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def all_segments(conn: Connection, ws: str) -> list[Segment]:
    rows = conn.execute(select(segments).where(segments.c.workspace_id == ws).order_by(segments.c.key))
    return [_row_to_segment(r) for r in rows]


def get_segment(conn: Connection, ws: str, key: str) -> Segment:
    row = conn.execute(select(segments).where(segments.c.workspace_id == ws, segments.c.key == key)).first()
    if row is None:
        raise NotFound("segment")
    return _row_to_segment(row)


def half_lives_of(conn: Connection, ws: str) -> dict[str, timedelta | None]:
    return {m.key: m.decay.period for m in scoring.models(conn, ws)}


def save_segment(
    conn: Connection,
    ws: str,
    key: str,
    name: str,
    data: Any,
    now: datetime,
    *,
    emit: Emit = no_emit,
) -> tuple[Segment, dict[str, int]]:
    """Create or update a segment (bumping its version) and recompute its membership over
    the whole workspace. Returns the segment and ``{"entered": n, "exited": m}``."""
    definition = _parse(data)
    document = definition.model_dump(mode="json", by_alias=True, exclude_none=True)
    row = conn.execute(select(segments).where(segments.c.workspace_id == ws, segments.c.key == key)).first()
    if row is None:
        seg_id = uuid.uuid4().hex
        conn.execute(
            insert(segments).values(
                id=seg_id,
                workspace_id=ws,
                key=key,
                name=name,
                definition=document,
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
    else:
        conn.execute(
            update(segments)
            .where(segments.c.id == row.id)
            .values(name=name, definition=document, version=row.version + 1, updated_at=now)
        )
    segment = get_segment(conn, ws, key)
    counts = recompute(conn, segment, now, emit=emit)
    return segment, counts


def recompute(conn: Connection, segment: Segment, now: datetime, *, emit: Emit = no_emit) -> dict[str, int]:
    """Membership of the whole workspace from the SQL compiler, diffed against the stored
    one; timers rebuilt for every profile when the definition depends on time."""
    ws = segment.workspace_id
    half_lives = half_lives_of(conn, ws)
    query = members_query(
        segment.definition,
        workspace_id=ws,
        now=now,
        dialect_name=conn.dialect.name,
        half_lives=half_lives,
    )
    wanted = {r[0] for r in conn.execute(query)}
    current = {
        r[0]
        for r in conn.execute(
            select(segment_members.c.profile_id).where(segment_members.c.segment_id == segment.id)
        )
    }
    cause = f"segment:{segment.id}:v{segment.version}"
    for pid in sorted(wanted - current):
        _enter(conn, segment, pid, now, emit, f"{cause}:{pid}")
    for pid in sorted(current - wanted):
        _exit(conn, segment, pid, now, emit, f"{cause}:{pid}")
    conn.execute(delete(segment_timers).where(segment_timers.c.segment_id == segment.id))
    if time_dependent(segment.definition):
        names = sorted(segment.event_names)
        ids = conn.execute(
            select(profiles.c.id).where(profiles.c.workspace_id == ws, profiles.c.merged_into.is_(None))
        ).scalars()
        for pid in list(ids):
            view = load_view(conn, ws, pid, now, half_lives, names=names)
            _set_timer(conn, segment, pid, next_change(segment.definition, view, now))
    return {"entered": len(wanted - current), "exited": len(current - wanted)}


def delete_segment(conn: Connection, ws: str, key: str) -> None:
    segment = get_segment(conn, ws, key)
    conn.execute(delete(segments).where(segments.c.id == segment.id))
    conn.execute(delete(segment_members).where(segment_members.c.segment_id == segment.id))
    conn.execute(delete(segment_timers).where(segment_timers.c.segment_id == segment.id))
    conn.execute(delete(segment_history).where(segment_history.c.segment_id == segment.id))


def preview(conn: Connection, ws: str, data: Any, now: datetime, *, sample: int = 10) -> dict[str, Any]:
    """How many profiles a definition selects now, and a few of them; nothing is saved."""
    definition = _parse(data)
    query = members_query(
        definition,
        workspace_id=ws,
        now=now,
        dialect_name=conn.dialect.name,
        half_lives=half_lives_of(conn, ws),
    ).subquery()
    count = conn.execute(select(func.count()).select_from(query)).scalar_one()
    ids = conn.execute(select(query.c.id).order_by(query.c.id).limit(sample)).scalars()
    return {"count": int(count), "sample": list(ids)}


# ---- reading memberships ------------------------------------------------------------------


def members(
    conn: Connection, ws: str, key: str, *, after: str | None = None, limit: int = 100
) -> tuple[list[dict[str, Any]], str | None]:
    """Current members in profile id order, from after ``after``; and the next cursor."""
    segment = get_segment(conn, ws, key)
    stmt = (
        select(segment_members.c.profile_id, segment_members.c.since)
        .join(profiles, profiles.c.id == segment_members.c.profile_id)
        .where(segment_members.c.segment_id == segment.id, profiles.c.workspace_id == ws)
        .order_by(segment_members.c.profile_id)
        .limit(limit + 1)
    )
    if after:
        stmt = stmt.where(segment_members.c.profile_id > after)
    rows = list(conn.execute(stmt))
    page = [{"profile_id": r.profile_id, "since": r.since.isoformat()} for r in rows[:limit]]
    cursor = page[-1]["profile_id"] if len(rows) > limit and page else None
    return page, cursor


def history_of(conn: Connection, ws: str, profile_id: str) -> dict[str, Any]:
    """The profile's current segments and every entry and exit, oldest first."""
    keys = {
        r.id: (r.key, r.name)
        for r in conn.execute(
            select(segments.c.id, segments.c.key, segments.c.name).where(segments.c.workspace_id == ws)
        )
    }
    current = conn.execute(
        select(segment_members.c.segment_id, segment_members.c.since).where(
            segment_members.c.workspace_id == ws, segment_members.c.profile_id == profile_id
        )
    )
    now_in = sorted(
        (
            {"segment": keys[r.segment_id][0], "name": keys[r.segment_id][1], "since": r.since.isoformat()}
            for r in current
            if r.segment_id in keys
        ),
        key=lambda d: str(d["segment"]),
    )
    rows = conn.execute(
        select(segment_history)
        .where(segment_history.c.workspace_id == ws, segment_history.c.profile_id == profile_id)
        .order_by(segment_history.c.entered_at, segment_history.c.id)
    )
    history = [
        {
            "segment": keys[r.segment_id][0],
            "entered_at": r.entered_at.isoformat(),
            "exited_at": r.exited_at.isoformat() if r.exited_at else None,
        }
        for r in rows
        if r.segment_id in keys
    ]
    return {"segments": now_in, "history": history}


def export_csv(conn: Connection, ws: str, key: str) -> str:
    """``profile_id,user_id,email,since`` for every current member."""
    segment = get_segment(conn, ws, key)
    user_id = (
        select(func.min(identities.c.value))
        .where(
            identities.c.workspace_id == ws,
            identities.c.kind == "user_id",
            identities.c.profile_id == segment_members.c.profile_id,
        )
        .correlate(segment_members)
        .scalar_subquery()
    )
    rows = conn.execute(
        select(
            segment_members.c.profile_id, user_id.label("user_id"), profiles.c.email, segment_members.c.since
        )
        .join(profiles, profiles.c.id == segment_members.c.profile_id)
        .where(segment_members.c.segment_id == segment.id, profiles.c.workspace_id == ws)
        .order_by(segment_members.c.profile_id)
    )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["profile_id", "user_id", "email", "since"])
    for r in rows:
        writer.writerow([r.profile_id, _safe(r.user_id), _safe(r.email), r.since.isoformat()])
    return out.getvalue()


def _safe(value: str | None) -> str:
    """A cell a spreadsheet will not run as a formula."""
    if value is None:
        return ""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


# ---- one profile ---------------------------------------------------------------------------


def load_view(
    conn: Connection,
    ws: str,
    profile_id: str,
    now: datetime,
    half_lives: dict[str, timedelta | None],
    *,
    names: Sequence[str] | None = None,
) -> ProfileView:
    """What the evaluator sees of one profile, from the database: traits, its ``track``
    events (only those named ``names`` when given), lists, tags, scores and stage. Events
    later than ``now`` are left out, as the compiler does."""
    traits = conn.execute(
        select(profiles.c.traits).where(profiles.c.workspace_id == ws, profiles.c.id == profile_id)
    ).scalar()
    evs: list[tuple[str, dict[str, Any], datetime]] = []
    if names is None or names:
        stmt = select(events.c.event, events.c.payload, events.c.timestamp).where(
            events.c.workspace_id == ws,
            events.c.profile_id == profile_id,
            events.c.type == "track",
        )
        if names is not None:
            stmt = stmt.where(events.c.event.in_(list(names)))
        for r in conn.execute(stmt):
            props = r.payload.get("properties") if isinstance(r.payload, dict) else None
            evs.append((r.event or "", props if isinstance(props, dict) else {}, r.timestamp))
    tags = conn.execute(
        select(profile_tags.c.tag).where(
            profile_tags.c.workspace_id == ws, profile_tags.c.profile_id == profile_id
        )
    ).scalars()
    scores = {
        r.model_key: (float(r.points), r.as_of)
        for r in conn.execute(
            select(profile_scores.c.model_key, profile_scores.c.points, profile_scores.c.as_of).where(
                profile_scores.c.workspace_id == ws, profile_scores.c.profile_id == profile_id
            )
        )
    }
    stage = conn.execute(
        select(profile_stages.c.stage).where(
            profile_stages.c.workspace_id == ws, profile_stages.c.profile_id == profile_id
        )
    ).scalar()
    return ProfileView(
        traits=traits if isinstance(traits, dict) else {},
        events=tuple(evs),
        lists=frozenset(lists.lists_of(conn, ws, profile_id)),
        tags=frozenset(tags),
        scores=scores,
        half_lives=half_lives,
        stage=stage,
    )


def _names(segs: Iterable[Segment]) -> list[str]:
    out: set[str] = set()
    for s in segs:
        out |= s.event_names
    return sorted(out)


def on_change(
    conn: Connection,
    ws: str,
    profile_id: str,
    now: datetime,
    *,
    segments: Sequence[Segment],
    event_name: str | None = None,
    emit: Emit = no_emit,
    cause: str = "",
    half_lives: dict[str, timedelta | None] | None = None,
) -> int:
    """Re-evaluate the profile in the segments the change can affect (:func:`relevant`):
    update membership, history and timers, announce entries and exits. Returns the number
    of entries and exits."""
    affected = [s for s in segments if relevant(s, event_name)]
    if not affected:
        return 0
    if half_lives is None:
        half_lives = half_lives_of(conn, ws)
    view = load_view(conn, ws, profile_id, now, half_lives, names=_names(affected))
    current = set(
        conn.execute(
            select(segment_members.c.segment_id).where(
                segment_members.c.workspace_id == ws, segment_members.c.profile_id == profile_id
            )
        ).scalars()
    )
    moves = 0
    for seg in affected:
        moves += _settle(
            conn, seg, profile_id, view, now, seg.id in current, emit, cause or f"change:{now.isoformat()}"
        )
    return moves


def _settle(
    conn: Connection,
    seg: Segment,
    profile_id: str,
    view: ProfileView,
    now: datetime,
    was_member: bool,
    emit: Emit,
    cause: str,
) -> int:
    is_member = evaluate(seg.definition, view, now)
    moved = 0
    if is_member and not was_member:
        _enter(conn, seg, profile_id, now, emit, cause)
        moved = 1
    elif was_member and not is_member:
        _exit(conn, seg, profile_id, now, emit, cause)
        moved = 1
    _set_timer(conn, seg, profile_id, next_change(seg.definition, view, now))
    return moved


def _enter(conn: Connection, seg: Segment, pid: str, now: datetime, emit: Emit, cause: str) -> None:
    ws = seg.workspace_id
    conn.execute(
        insert(segment_members).values(segment_id=seg.id, profile_id=pid, workspace_id=ws, since=now)
    )
    conn.execute(
        insert(segment_history).values(segment_id=seg.id, workspace_id=ws, profile_id=pid, entered_at=now)
    )
    emit(conn, ws, pid, ENTERED, {"segment": seg.key}, now=now, cause=cause)


def _exit(conn: Connection, seg: Segment, pid: str, now: datetime, emit: Emit, cause: str) -> None:
    ws = seg.workspace_id
    conn.execute(
        delete(segment_members).where(
            segment_members.c.segment_id == seg.id, segment_members.c.profile_id == pid
        )
    )
    conn.execute(
        update(segment_history)
        .where(
            segment_history.c.segment_id == seg.id,
            segment_history.c.profile_id == pid,
            segment_history.c.exited_at.is_(None),
        )
        .values(exited_at=now)
    )
    emit(conn, ws, pid, EXITED, {"segment": seg.key}, now=now, cause=cause)


def _set_timer(conn: Connection, seg: Segment, pid: str, due: datetime | None) -> None:
    where = (segment_timers.c.segment_id == seg.id, segment_timers.c.profile_id == pid)
    if due is None:
        conn.execute(delete(segment_timers).where(*where))
        return
    if conn.execute(update(segment_timers).where(*where).values(due_at=due)).rowcount:
        return
    conn.execute(
        insert(segment_timers).values(
            segment_id=seg.id, profile_id=pid, workspace_id=seg.workspace_id, due_at=due
        )
    )


def fire_due_timers(conn: Connection, now: datetime, *, limit: int = 500, emit: Emit = no_emit) -> int:
    """Re-evaluate the (segment, profile) pairs whose timer is due, and reschedule them.
    Returns how many timers were handled."""
    due = list(
        conn.execute(
            select(segment_timers)
            .where(segment_timers.c.due_at <= now)
            .order_by(segment_timers.c.due_at)
            .limit(limit)
        )
    )
    cache: dict[str, Segment | None] = {}
    lives: dict[str, dict[str, timedelta | None]] = {}
    for t in due:
        if t.segment_id not in cache:
            row = conn.execute(select(segments).where(segments.c.id == t.segment_id)).first()
            cache[t.segment_id] = _row_to_segment(row) if row is not None else None
        seg = cache[t.segment_id]
        alive = conn.execute(
            select(profiles.c.id).where(
                profiles.c.id == t.profile_id,
                profiles.c.workspace_id == t.workspace_id,
                profiles.c.merged_into.is_(None),
            )
        ).first()
        if seg is None or alive is None:
            conn.execute(
                delete(segment_timers).where(
                    segment_timers.c.segment_id == t.segment_id, segment_timers.c.profile_id == t.profile_id
                )
            )
            continue
        ws = seg.workspace_id
        if ws not in lives:
            lives[ws] = half_lives_of(conn, ws)
        view = load_view(conn, ws, t.profile_id, now, lives[ws], names=sorted(seg.event_names))
        was = (
            conn.execute(
                select(segment_members.c.profile_id).where(
                    segment_members.c.segment_id == seg.id, segment_members.c.profile_id == t.profile_id
                )
            ).first()
            is not None
        )
        cause = f"segment-timer:{seg.id}:v{seg.version}:{t.profile_id}:{t.due_at.isoformat()}"
        _settle(conn, seg, t.profile_id, view, now, was, emit, cause)
    return len(due)


def timer_step(db: Database, clock: Clock, emit: Emit, *, limit: int = 500) -> int:
    """A worker step: fire the due segment timers in one transaction."""
    with db.write() as conn:
        return fire_due_timers(conn, clock.now(), limit=limit, emit=emit)


# ---- merges and erasure --------------------------------------------------------------------


def on_merge(conn: Connection, ws: str, from_id: str, into_id: str, now: datetime) -> None:
    """The merged-away profile leaves its segments silently (its open history entries are
    closed at ``now`` and the history moves to the survivor); the caller then re-evaluates
    the survivor in every segment."""
    conn.execute(
        update(segment_history)
        .where(
            segment_history.c.workspace_id == ws,
            segment_history.c.profile_id == from_id,
            segment_history.c.exited_at.is_(None),
        )
        .values(exited_at=now)
    )
    conn.execute(
        update(segment_history)
        .where(segment_history.c.workspace_id == ws, segment_history.c.profile_id == from_id)
        .values(profile_id=into_id)
    )
    forget(conn, ws, [from_id])


def forget(conn: Connection, ws: str, profile_ids: list[str]) -> None:
    """Delete every trace of the profiles: memberships, timers and history."""
    for table in (segment_members, segment_timers, segment_history):
        conn.execute(delete(table).where(table.c.workspace_id == ws, table.c.profile_id.in_(profile_ids)))
