"""Segments stored, and their membership maintained. Never commits.

Membership is kept in ``segment_members`` (with every entry and exit in
``segment_history``) three ways (see ``docs/design/segments.md``, "Membership"):

* saving a segment recomputes it for the whole workspace with the SQL compiler, set-based:
  the compiler's members diffed against the stored ones, written in bulk;
* :func:`on_change` re-evaluates one profile with the evaluator after the pipeline applied
  one of its events, for the segments that event can affect;
* :func:`fire_due_timers` re-evaluates, in batches, the profiles whose answer
  ``next_change`` said may change by the passage of time alone (a window ends).

Entries and exits are announced through an ``emit`` callback (the pipeline's, which appends
``Segment Entered`` / ``Segment Exited`` to the person's log), or many at once through an
``announce`` callback: this layer may not import the pipeline.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from whenthen import scoring
from whenthen.kernel.clock import Clock
from whenthen.kernel.errors import DomainError, NotFound
from whenthen.kernel.memo import ByDocument
from whenthen.profiles import Emit
from whenthen.profiles.tables import identities, profiles
from whenthen.segments.compiler import members_query, timer_candidates_query
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
from whenthen.segments.evaluator import DecaySpec, evaluate, next_change
from whenthen.segments.membership import (
    DELETE_TIMERS,
    ENTERED,
    EXITED,
    Announce,
    Announcement,
    HeldWrites,
    Moves,
    ProfileChanges,
    announce_moves,
    memberships_and_timers,
    no_emit,
    one_by_one,
    write_moves,
    write_profile,
    write_timers,
)
from whenthen.segments.tables import segment_history, segment_members, segment_timers, segments
from whenthen.segments.views import CHUNK, HeldViews, Reads, chunks, load_view, load_views, of_segment
from whenthen.storage import Database
from whenthen.storage.driver import DriverQuery
from whenthen.storage.id_lists import by_ids, per_dialect

__all__ = [
    "ENTERED",
    "EXITED",
    "Announce",
    "Announcement",
    "Change",
    "Emit",
    "Reads",
    "Segment",
    "SegmentIndex",
    "load_view",
    "load_views",
    "no_emit",
    "one_by_one",
]


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
    # What the definition reads and whether time alone changes it: worked out once here,
    # since the pipeline asks for every event.
    reads: Reads = field(init=False, repr=False, compare=False)
    score_models: frozenset[str] = field(init=False, repr=False, compare=False)
    timed: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", Reads.of([self.definition]))
        object.__setattr__(
            self,
            "score_models",
            frozenset(c.model for c in walk(self.definition.condition) if isinstance(c, ScoreCondition)),
        )
        object.__setattr__(self, "timed", time_dependent(self.definition))

    @property
    def event_names(self) -> frozenset[str]:
        names = self.reads.names
        assert names is not None
        return names

    @property
    def has_state(self) -> bool:
        r = self.reads
        return r.traits or r.lists or r.tags or r.scores or r.stage

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
    have changed through the profile or scoring. (The pipeline knows more about what an
    event changed and uses :class:`Change` instead.)"""
    if event_name is None:
        return True
    return segment.has_state or event_name in segment.event_names


@dataclass(frozen=True, slots=True)
class Change:
    """What one processed call may have changed for its person.

    ``everything``: anything (a call other than ``track``, a merge). Otherwise the call was
    a ``track`` event named ``event`` (now one of the person's events); ``traits``: the
    traits differ from before; ``scores``: the scoring models whose stored score the event
    changed; ``stage``: whether the lifecycle stage moved."""

    everything: bool = False
    event: str | None = None
    traits: bool = False
    scores: frozenset[str] = frozenset()
    stage: bool = False

    def affects(self, segment: Segment) -> bool:
        """Whether the segment reads something this change may have changed. Lists and
        tags are not changed by processing a track event (changes made elsewhere reach
        segments through rechecks, see ``segments.rechecks``)."""
        if self.everything:
            return True
        r = segment.reads
        if self.event is not None and self.event in segment.event_names:
            return True
        return (
            (self.traits and r.traits) or (self.stage and r.stage) or bool(self.scores & segment.score_models)
        )


EVERYTHING_CHANGED = Change(everything=True)


class SegmentIndex:
    """A workspace's segments by what they read, so the segments a change affects are
    found without asking each of them (the pipeline asks for every event): the same
    answer as ``[s for s in segments if change.affects(s)]``, in the same order."""

    def __init__(self, workspace_segments: Sequence[Segment]) -> None:
        self.segments = list(workspace_segments)
        self._by_event: dict[str, list[int]] = defaultdict(list)
        self._by_model: dict[str, list[int]] = defaultdict(list)
        self._traits: list[int] = []
        self._stage: list[int] = []
        self._memo: dict[Change, tuple[Sequence[Segment], Reads]] = {}
        #: What the segments read together (a batch's held views read all of it).
        self.reads = Reads.union(s.reads for s in self.segments)
        for i, seg in enumerate(self.segments):
            for name in seg.event_names:
                self._by_event[name].append(i)
            for model in seg.score_models:
                self._by_model[model].append(i)
            if seg.reads.traits:
                self._traits.append(i)
            if seg.reads.stage:
                self._stage.append(i)

    def affected_with_reads(self, change: Change) -> tuple[Sequence[Segment], Reads]:
        """:meth:`affected` and what they read together (``Reads.union``), worked out
        once per kind of change: a batch's events share a few (their names, whether
        traits, stage or scores moved)."""
        found = self._memo.get(change)
        if found is None:
            affected = tuple(self.affected(change))
            found = self._memo[change] = (affected, Reads.union(s.reads for s in affected))
        return found

    def affected(self, change: Change) -> list[Segment]:
        if change.everything:
            return list(self.segments)
        hits: set[int] = set()
        if change.event is not None:
            hits.update(self._by_event.get(change.event, ()))
        if change.traits:
            hits.update(self._traits)
        if change.stage:
            hits.update(self._stage)
        for model in change.scores:
            hits.update(self._by_model.get(model, ()))
        return [self.segments[i] for i in sorted(hits)]


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


#: Parsed definitions by their document (``parse_segment`` is a function of it alone):
#: the pipeline reads a workspace's segments for every batch, and parsing 100
#: definitions cost more than reading them.
_parsed = ByDocument(parse_segment)


#: Segments as built from their rows, by (id, version): building one works out what its
#: definition reads and whether it is timed (``Segment.__post_init__``), which for the
#: pipeline's every batch cost more than reading the rows. A hit is used only when the
#: row is the same (a rolled-back update may have left another row of that version).
_BUILT: dict[tuple[str, int], Segment] = {}


def _row_to_segment(row: Any) -> Segment:
    hit = _BUILT.get((row.id, row.version))
    if (
        hit is not None
        and hit.updated_at == row.updated_at
        and hit.key == row.key
        and hit.name == row.name
        and hit.workspace_id == row.workspace_id
        and hit.created_at == row.created_at
        and hit.document == row.definition
    ):
        return hit
    if len(_BUILT) > 10_000:
        _BUILT.clear()
    built = _BUILT[(row.id, row.version)] = _build(row)
    return built


def _build(row: Any) -> Segment:
    return Segment(
        id=row.id,
        workspace_id=row.workspace_id,
        key=row.key,
        name=row.name,
        definition=_parsed(row.definition),
        document=dict(row.definition),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


#: The workspace's segments' heads: the pipeline asks for its segments at every batch,
#: and reading (and decoding) every definition again cost more than the batch's own work.
_HEADS = (
    select(segments.c.id, segments.c.version, segments.c.updated_at, segments.c.key)
    .where(segments.c.workspace_id == bindparam("ws"))
    .order_by(segments.c.key)
)


def all_segments(conn: Connection, ws: str) -> list[Segment]:
    """The workspace's segments by key. Those already built at their version (each
    update bumps it) are taken from memory; only the others' rows are read whole."""
    heads = list(conn.execute(_HEADS, {"ws": ws}))
    built: dict[str, Segment] = {}
    for seg_id, version, updated_at, key in heads:
        hit = _BUILT.get((seg_id, version))
        if hit is not None and hit.updated_at == updated_at and hit.key == key and hit.workspace_id == ws:
            built[seg_id] = hit
    missing = [h[0] for h in heads if h[0] not in built]
    if missing:
        built.update((i, s) for i, s in _segments_by_id(conn, missing).items() if s.workspace_id == ws)
    # In the heads' order (by key); one deleted between the two reads is left out.
    return [built[h[0]] for h in heads if h[0] in built]


def get_segment(conn: Connection, ws: str, key: str) -> Segment:
    row = conn.execute(select(segments).where(segments.c.workspace_id == ws, segments.c.key == key)).first()
    if row is None:
        raise NotFound("segment")
    return _row_to_segment(row)


def half_lives_of(conn: Connection, ws: str) -> dict[str, DecaySpec]:
    return {m.key: m.decay.spec for m in scoring.models(conn, ws)}


def save_segment(
    conn: Connection,
    ws: str,
    key: str,
    name: str,
    data: Any,
    now: datetime,
    *,
    emit: Emit = no_emit,
    announce: Announce | None = None,
) -> tuple[Segment, dict[str, int]]:
    """Create or update a segment (bumping its version) and recompute its membership over
    the whole workspace (:func:`recompute`). Returns the segment and ``{"entered": n,
    "exited": m}``."""
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
    counts = recompute(conn, segment, now, emit=emit, announce=announce)
    return segment, counts


#: PostgreSQL's ``work_mem`` for the whole-population queries of a segment (recompute,
#: timer candidates, preview), set for their transaction. Their event conditions are
#: ``profiles.id IN (subquery)`` under ``OR`` / ``NOT`` (ADR 0008), which PostgreSQL runs
#: as a *hashed* subplan (the set built once, probed per profile) only when it expects
#: the set to fit in ``work_mem`` times ``hash_mem_multiplier`` (8 MB with the defaults:
#: about 150,000 people); past that it rescans the set for every profile, hours at a
#: million. 256 MB (512 MB for a hash with the default multiplier) holds sets of about
#: nine million people. It is a limit per sort or hash node, taken only while such a
#: query runs.
POPULATION_WORK_MEM = "256MB"


def for_population(conn: Connection) -> None:
    """Prepare the transaction for whole-population segment queries (PostgreSQL: see
    :data:`POPULATION_WORK_MEM`; nothing to do on SQLite, whose ``IN (subquery)`` is
    always built once)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{POPULATION_WORK_MEM}'")


def recompute(
    conn: Connection,
    segment: Segment,
    now: datetime,
    *,
    emit: Emit = no_emit,
    announce: Announce | None = None,
) -> dict[str, int]:
    """Membership of the whole workspace from the SQL compiler, diffed against the stored
    one and written in bulk; timers rebuilt when the definition depends on time, for the
    profiles whose answer may change by time alone (:func:`timer_candidates_query`, a
    superset), from their views read in chunks. Entries and exits are announced through
    ``announce`` when given (many at once), else ``emit`` one by one."""
    ws = segment.workspace_id
    half_lives = half_lives_of(conn, ws)
    for_population(conn)
    query = members_query(
        segment.definition,
        workspace_id=ws,
        now=now,
        dialect_name=conn.dialect.name,
        half_lives=half_lives,
    )
    wanted = set(conn.execute(query).scalars())
    current = set(
        conn.execute(
            select(segment_members.c.profile_id).where(segment_members.c.segment_id == segment.id)
        ).scalars()
    )
    cause = f"segment:{segment.id}:v{segment.version}"
    moves = Moves(segment.id, ws, segment.key)
    for pid in sorted(wanted - current):
        moves.enter(pid, f"{cause}:{pid}")
    for pid in sorted(current - wanted):
        moves.exit(pid, f"{cause}:{pid}")
    write_moves(conn, moves, now, announce or one_by_one(emit))
    conn.execute(delete(segment_timers).where(segment_timers.c.segment_id == segment.id))
    if segment.timed:
        rebuild_timers(conn, segment, now, half_lives)
    return {"entered": len(moves.entered), "exited": len(moves.exited)}


def rebuild_timers(
    conn: Connection, segment: Segment, now: datetime, half_lives: dict[str, DecaySpec]
) -> int:
    """Insert the segment's timers (none may exist): ``next_change`` for every profile that
    :func:`timer_candidates_query` names, a chunk of views at a time. Returns how many.
    Part of :func:`recompute`, whose transaction :func:`for_population` has prepared."""
    ws = segment.workspace_id
    stmt = timer_candidates_query(
        segment.definition, workspace_id=ws, now=now, dialect_name=conn.dialect.name, half_lives=half_lives
    )
    if stmt is None:
        return 0
    candidates = sorted(conn.execute(stmt).scalars())
    written = 0
    for chunk in chunks(candidates, CHUNK):
        views = load_views(conn, ws, chunk, half_lives, segment.reads)
        rows = []
        for pid in chunk:
            due = next_change(segment.definition, views[pid], now)
            if due is not None:
                rows.append({"segment_id": segment.id, "profile_id": pid, "workspace_id": ws, "due_at": due})
        if rows:
            conn.execute(insert(segment_timers), rows)
            written += len(rows)
    return written


def delete_segment(conn: Connection, ws: str, key: str) -> None:
    segment = get_segment(conn, ws, key)
    conn.execute(delete(segments).where(segments.c.id == segment.id))
    conn.execute(delete(segment_members).where(segment_members.c.segment_id == segment.id))
    conn.execute(delete(segment_timers).where(segment_timers.c.segment_id == segment.id))
    conn.execute(delete(segment_history).where(segment_history.c.segment_id == segment.id))


def preview(conn: Connection, ws: str, data: Any, now: datetime, *, sample: int = 10) -> dict[str, Any]:
    """How many profiles a definition selects now, and a few of them; nothing is saved."""
    definition = _parse(data)
    for_population(conn)
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


# ---- one profile ----------------------------------------------------------------------


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
    half_lives: dict[str, DecaySpec] | None = None,
    change: Change | None = None,
    announce: Announce | None = None,
    traits: Mapping[str, Any] | None = None,
    index: SegmentIndex | None = None,
    at: datetime | None = None,
    held: HeldWrites | None = None,
    views: HeldViews | None = None,
) -> int:
    """Re-evaluate the profile in the segments the change can affect (``change`` when
    given, through ``index`` when given (built over ``segments``), else :func:`relevant`
    for ``event_name``): update membership, history and
    timers (only those that differ), announce entries and exits. Returns the number of
    entries and exits. ``traits``: the profile's traits as they are now, when the caller
    holds them (not read again).

    The entries and exits of all the segments are announced together at the end, in the
    order they happened (through ``announce`` when given, else ``emit`` one by one): one
    look-up of the person's ids and one append for all of them, rather than one of each
    per entry or exit. ``at``: the cause's own time, leading the announcements' message
    ids (see :class:`~whenthen.segments.membership.Announcement`). ``held``: a batch's
    :class:`~whenthen.segments.membership.HeldWrites`, which reads and keeps the
    person's memberships and timers until the batch writes them all at its end (the
    pipeline's); without it they are read and written here. ``views``: a batch's
    :class:`~whenthen.segments.views.HeldViews`, which holds the person's view (with
    ``traits`` as their traits now) rather than reading it here."""
    affected: Sequence[Segment]
    if change is not None and index is not None:
        affected, reads = index.affected_with_reads(change)
    else:
        if change is not None:
            affected = [s for s in segments if change.affects(s)]
        else:
            affected = [s for s in segments if relevant(s, event_name)]
        reads = Reads.union(s.reads for s in affected)
    if not affected:
        return 0
    if half_lives is None:
        half_lives = half_lives_of(conn, ws)
    if views is not None:
        view = views.view(conn, ws, profile_id, traits)
    else:
        known = None if traits is None else {profile_id: traits}
        view = load_views(conn, ws, [profile_id], half_lives, reads, traits=known)[profile_id]
    if held is None:
        current, timers = memberships_and_timers(conn, ws, profile_id)
    else:
        current, timers = held.state(
            conn, ws, profile_id, now, lambda: memberships_and_timers(conn, ws, profile_id)
        )
    why = cause or f"change:{now.isoformat()}"
    changes = ProfileChanges(ws, profile_id, at=at)
    for seg in affected:
        was_member = seg.id in current
        if evaluate(seg.definition, view, now) != was_member:
            changes.move(seg.id, seg.key, not was_member, why)
        if seg.timed:
            due = next_change(seg.definition, view, now)
            if due != timers.get(seg.id):
                changes.timers[seg.id] = due
    if changes.moves or changes.timers:
        if held is None:
            write_profile(conn, changes, timers, now, announce or one_by_one(emit))
        else:
            held.record(changes)
            announce_moves(conn, changes, now, announce or one_by_one(emit))
    return len(changes.moves)


def _segments_by_id(conn: Connection, ids: Iterable[str]) -> dict[str, Segment]:
    out: dict[str, Segment] = {}
    for chunk in chunks(sorted(set(ids))):
        for row in conn.execute(select(segments).where(segments.c.id.in_(list(chunk)))):
            out[row.id] = _row_to_segment(row)
    return out


# Built once per dialect (a timer batch runs each per chunk). ``profiles`` is read by id
# with the workspace and merge checked per row: with ``workspace_id = ?`` in the WHERE,
# SQLite (no statistics) walks the workspace's whole (workspace, last seen) index: a
# scan of every profile per chunk.
_PROFILE_STATE_COLUMNS = (profiles.c.id, profiles.c.workspace_id, profiles.c.merged_into)
_PROFILE_STATE = per_dialect(lambda d: by_ids(d, profiles, "id", "pids", _PROFILE_STATE_COLUMNS))
_PROFILE_STATE_LOCKED = {
    "sqlite": _PROFILE_STATE["sqlite"],  # one writer at a time
    "postgresql": by_ids("postgresql", profiles, "id", "pids", _PROFILE_STATE_COLUMNS, lock=True),
}
_MEMBERS_AMONG = per_dialect(
    lambda d: select(segment_members.c.profile_id).where(*of_segment(d, segment_members))
)
_DUE = (
    select(
        segment_timers.c.segment_id,
        segment_timers.c.profile_id,
        segment_timers.c.workspace_id,
        segment_timers.c.due_at,
    )
    .where(segment_timers.c.due_at <= bindparam("now"))
    .order_by(segment_timers.c.due_at)
    .limit(bindparam("limit"))
)
_DUE_CLAIMED = _DUE.with_for_update(skip_locked=True)
#: Read at the driver's level: a batch of expiring windows reads thousands of timers.
_DUE_ROWS = {"sqlite": DriverQuery(_DUE), "postgresql": DriverQuery(_DUE_CLAIMED)}


class _DueTimer(NamedTuple):
    segment_id: str
    profile_id: str
    workspace_id: str
    due_at: datetime


def _alive(conn: Connection, ws: str, profile_ids: Sequence[str]) -> tuple[set[str], set[str]]:
    """(those of the profiles that exist in the workspace and are not merged away, those
    another transaction holds). On PostgreSQL the alive ones are locked (``FOR UPDATE
    SKIP LOCKED``): a pipeline worker applying a person's events holds their profile row
    for its batch, and a timer step deciding on their memberships at the same moment would
    decide on what it can see, without the events being applied, and the two would write
    over each other's entries, exits and timers. A profile held elsewhere is left for a
    later step (its timer stays due); the step never waits for one, so it cannot deadlock
    with the holder, which may be waiting for the timer row this step claimed."""
    out: set[str] = set()
    held: set[str] = set()
    d = conn.dialect.name
    stmt = _PROFILE_STATE_LOCKED[d]
    for chunk in chunks(profile_ids):
        ids = list(chunk)
        seen: set[str] = set()
        for pid, row_ws, merged_into in conn.execute(stmt, {"pids": ids}):
            seen.add(pid)
            if row_ws == ws and merged_into is None:
                out.add(pid)
        missing = [p for p in ids if p not in seen]
        if missing and d == "postgresql":
            # Skipped as locked, or gone: a plain read tells which.
            held.update(pid for pid, _, _ in conn.execute(_PROFILE_STATE[d], {"pids": missing}))
    return out, held


def _members_among(conn: Connection, segment_id: str, profile_ids: Sequence[str]) -> set[str]:
    out: set[str] = set()
    stmt = _MEMBERS_AMONG[conn.dialect.name]
    for chunk in chunks(profile_ids):
        out.update(conn.execute(stmt, {"seg": segment_id, "pids": list(chunk)}).scalars())
    return out


def _answers_among(
    conn: Connection,
    seg: Segment,
    profile_ids: Sequence[str],
    now: datetime,
    half_lives: dict[str, DecaySpec],
) -> tuple[set[str], set[str]]:
    """(members at ``now``, timer candidates) among the profiles, from the compiler's
    queries restricted to them (``among``): the same answers as :func:`evaluate` and a
    superset of those whose :func:`next_change` is not ``None``, each kept in agreement
    with the evaluator by the differential tests, without reading anyone's events into
    Python."""
    d = conn.dialect.name
    ws = seg.workspace_id
    members = members_query(
        seg.definition, workspace_id=ws, now=now, dialect_name=d, half_lives=half_lives, among=True
    )
    candidates = timer_candidates_query(
        seg.definition, workspace_id=ws, now=now, dialect_name=d, half_lives=half_lives, among=True
    )
    matching: set[str] = set()
    named: set[str] = set()
    for chunk in chunks(profile_ids):
        params = {"pids": list(chunk)}
        matching.update(conn.execute(members, params).scalars())
        if candidates is not None:
            named.update(conn.execute(candidates, params).scalars())
    return matching, named


def fire_due_timers(
    conn: Connection,
    now: datetime,
    *,
    limit: int = 5000,
    emit: Emit = no_emit,
    announce: Announce | None = None,
) -> int:
    """Re-evaluate the (segment, profile) pairs whose timer is due (the ``limit`` earliest;
    on PostgreSQL those not claimed by another worker), and reschedule them. Per segment,
    the due profiles' answers come from the SQL compiler restricted to them (a chunk of
    ids a statement, :func:`_answers_among`), the entries and exits are written in bulk,
    and the next timers come from ``next_change`` on the views of those the compiler's
    timer candidates name (the others' answer can no longer change by time alone).
    Timers of deleted segments, and of profiles merged away or erased, are dropped. On
    PostgreSQL the due profiles are locked, and the timers of those another transaction
    holds (a pipeline worker applying their events) are left due for a later step
    (:func:`_alive`). Returns how many timers were handled (not those left)."""
    due = [_DueTimer(*row) for row in _DUE_ROWS[conn.dialect.name].all(conn, {"now": now, "limit": limit})]
    if not due:
        return 0
    by_segment: dict[str, list[Any]] = defaultdict(list)
    for t in due:
        by_segment[t.segment_id].append(t)
    found = _segments_by_id(conn, by_segment)
    announcer = announce or one_by_one(emit)
    lives: dict[str, dict[str, DecaySpec]] = {}
    left = 0  # timers of profiles another transaction holds: left due, for a later step
    for seg_id, rows in by_segment.items():
        seg = found.get(seg_id)
        if seg is None:
            conn.execute(delete(segment_timers).where(segment_timers.c.segment_id == seg_id))
            continue
        ws = seg.workspace_id
        pids = [t.profile_id for t in rows if t.workspace_id == ws]
        alive, held = _alive(conn, ws, pids)
        if held:
            left += sum(1 for t in rows if t.profile_id in held)
        dropped = [t.profile_id for t in rows if t.profile_id not in alive and t.profile_id not in held]
        for chunk in chunks(dropped):
            conn.execute(DELETE_TIMERS[conn.dialect.name], {"seg": seg_id, "pids": list(chunk)})
        live = [t for t in rows if t.profile_id in alive]
        if not live:
            continue
        if ws not in lives:
            lives[ws] = half_lives_of(conn, ws)
        live_ids = [t.profile_id for t in live]
        current = _members_among(conn, seg.id, live_ids)
        matching, candidates = _answers_among(conn, seg, live_ids, now, lives[ws])
        moves = Moves(seg.id, ws, seg.key)
        for t in live:
            pid = t.profile_id
            is_member = pid in matching
            if is_member != (pid in current):
                cause = f"segment-timer:{seg.id}:v{seg.version}:{pid}:{t.due_at.isoformat()}"
                if is_member:
                    moves.enter(pid, cause, t.due_at)
                else:
                    moves.exit(pid, cause, t.due_at)
        # Only a candidate's answer can change by time alone from here: only their views
        # are read (for a window that closed on everyone at once, none at all).
        wanted = [pid for pid in live_ids if pid in candidates]
        views = load_views(conn, ws, wanted, lives[ws], seg.reads)
        next_due: dict[str, datetime | None] = dict.fromkeys(live_ids)
        for pid in wanted:
            next_due[pid] = next_change(seg.definition, views[pid], now)
        write_moves(conn, moves, now, announcer)
        write_timers(conn, seg.id, ws, next_due, {t.profile_id: t.due_at for t in live})
    return len(due) - left


def timer_step(
    db: Database, clock: Clock, emit: Emit, *, limit: int = 5000, announce: Announce | None = None
) -> int:
    """A worker step: fire the due segment timers in one transaction. The batch is large
    (5,000: a few hundred milliseconds of write lock at most) because a batch's cost is
    mostly per statement and per commit, not per timer; the worker runs the step again at
    once while it finds work."""
    with db.write() as conn:
        return fire_due_timers(conn, clock.now(), limit=limit, emit=emit, announce=announce)


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
