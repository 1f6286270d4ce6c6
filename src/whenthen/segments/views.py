"""What the evaluator sees of profiles, read from the database: one profile, or many at once.

A :class:`Reads` says which parts of a profile a set of definitions looks at (traits,
which track events and whether their properties, lists, tags, scores, stage); the loaders
read only those parts. Parts a definition does not read are left empty in the view, which
changes no answer: the evaluator only looks at what the definition names.

:func:`load_views` reads many profiles with a few queries per chunk of ids (one per part,
``profile_id IN (...)``), for recomputes and timer batches; :func:`load_view` is the same
for one profile.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Connection,
    Select,
    Table,
    bindparam,
    cast,
    func,
    literal,
    literal_column,
    null,
    select,
    text,
    true,
    union_all,
)

from whenthen.lists.tables import list_members
from whenthen.profiles.tables import profile_tags, profiles
from whenthen.scoring.tables import profile_scores, profile_stages
from whenthen.segments.definition import (
    EngagementCondition,
    EventCondition,
    ListCondition,
    PerformedTimeCondition,
    ScoreCondition,
    SegmentDefinition,
    SequenceCondition,
    StageCondition,
    TagCondition,
    TraitCondition,
    walk,
)
from whenthen.segments.evaluator import DecaySpec, EventTuple, ProfileView
from whenthen.storage.driver import DriverQuery
from whenthen.storage.id_lists import DIALECTS, ArrayLiteral, array_param, by_ids, ids_in, per_dialect
from whenthen.tracking.tables import events

#: Profile ids per statement (one list parameter, ``storage.id_lists.ids_in``): a million
#: profiles take a few hundred round trips, and memory per statement stays small.
CHUNK = 5000


@dataclass(frozen=True, slots=True)
class Reads:
    """The parts of a profile some definitions read. ``names``: the track events read
    (``None``: all of them); ``properties``: the names whose properties some filter reads
    (``None``: all)."""

    traits: bool = True
    names: frozenset[str] | None = None
    properties: frozenset[str] | None = None
    lists: bool = True
    tags: bool = True
    scores: bool = True
    stage: bool = True

    @staticmethod
    def of(definitions: Iterable[SegmentDefinition]) -> Reads:
        traits = lists = tags = scores = stage = False
        names: set[str] = set()
        props: set[str] = set()
        for definition in definitions:
            for c in walk(definition.condition):
                if isinstance(c, TraitCondition):
                    traits = True
                elif isinstance(c, EventCondition | PerformedTimeCondition):
                    names.add(c.event)
                    if c.where:
                        props.add(c.event)
                elif isinstance(c, SequenceCondition):
                    for spec in (c.first, c.then, c.then_not):
                        if spec is not None:
                            names.add(spec.event)
                            if spec.where:
                                props.add(spec.event)
                elif isinstance(c, EngagementCondition):
                    for e in c.as_events():
                        names.add(e.event)
                        if e.where:
                            props.add(e.event)
                elif isinstance(c, ListCondition):
                    lists = True
                elif isinstance(c, TagCondition):
                    tags = True
                elif isinstance(c, ScoreCondition):
                    scores = True
                elif isinstance(c, StageCondition):
                    stage = True
        return Reads(traits, frozenset(names), frozenset(props), lists, tags, scores, stage)

    @staticmethod
    def union(many: Iterable[Reads]) -> Reads:
        """What all of them read together."""
        out = Reads(False, frozenset(), frozenset(), False, False, False, False)
        for r in many:
            out = Reads(
                out.traits or r.traits,
                None if out.names is None or r.names is None else out.names | r.names,
                None if out.properties is None or r.properties is None else out.properties | r.properties,
                out.lists or r.lists,
                out.tags or r.tags,
                out.scores or r.scores,
                out.stage or r.stage,
            )
        return out

    def needs_properties(self) -> bool:
        return self.properties is None or bool(self.properties)


#: Every part of the profile (what :func:`load_view` reads without ``names``).
EVERYTHING = Reads()


def chunks(ids: Sequence[str], size: int = CHUNK) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def of_segment(dialect_name: str, table: Table, *, open_only: bool = False) -> list[ColumnElement[bool]]:
    """WHERE terms for the rows of ``table`` (``segment_members``, ``segment_timers``,
    ``segment_history``) of segment ``:seg`` and the profiles of list ``:pids``
    (``open_only``: open stays only).

    On PostgreSQL the rows are found one index probe per id (a ``LATERAL`` subquery on
    both key columns, kept apart by ``OFFSET 0``) and then taken by ``ctid``. The plain
    ``segment_id = :seg AND profile_id = ANY(:pids)`` lets the planner choose, and
    right after a segment gains its members (a save, before autovacuum's ANALYZE) it
    believes the segment has a few dozen rows and scans all of them for every batch:
    200 ms per statement at 200,000 members, growing with the segment. The probes cost
    the same whatever the statistics. The outer query re-checks nothing but ``ctid``
    (and ``exited_at IS NULL``): a row changed meanwhile by another transaction has a
    new ``ctid`` and is left alone, as the plain statement would leave it after
    re-checking."""
    c = table.c
    if dialect_name == "postgresql":
        open_sql = " AND x.exited_at IS NULL" if open_only else ""
        # Only names of this package's own tables and fixed text go into the SQL.
        sql = (
            f"{table.name}.ctid = ANY(ARRAY(SELECT p.ctid FROM unnest(CAST(:pids AS VARCHAR[])) AS u(pid)"  # noqa: S608
            f" CROSS JOIN LATERAL (SELECT x.ctid FROM {table.name} AS x WHERE x.segment_id = :seg"
            f" AND x.profile_id = u.pid{open_sql} OFFSET 0) AS p))"
        )
        probe = text(sql).bindparams(bindparam("pids", type_=ArrayLiteral()))
        terms: list[ColumnElement[bool]] = [probe.self_group()]  # type: ignore[list-item]
    else:
        terms = [c.segment_id == bindparam("seg"), ids_in(dialect_name, c.profile_id, "pids")]
    if open_only:
        terms.append(c.exited_at.is_(None))
    return terms


def load_views(
    conn: Connection,
    ws: str,
    profile_ids: Sequence[str],
    half_lives: Mapping[str, DecaySpec],
    reads: Reads = EVERYTHING,
    *,
    traits: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, ProfileView]:
    """The views of many profiles, by id: a few queries per :data:`CHUNK` of ids.
    ``traits`` (by id), when the caller holds the profiles' current traits (the pipeline,
    right after applying an event), spares reading them.

    Events are the profile's ``track`` rows (of ``reads.names`` when given), whatever their
    time (``first_performed`` of all time counts events after ``now`` too, as the compiler
    does). A profile id that does not exist gets an empty view."""
    out: dict[str, ProfileView] = {}
    for chunk in chunks(list(dict.fromkeys(profile_ids))):
        out.update(_load_chunk(conn, ws, chunk, half_lives, reads, traits))
    return out


def load_view(
    conn: Connection,
    ws: str,
    profile_id: str,
    now: datetime,
    half_lives: Mapping[str, DecaySpec],
    *,
    names: Sequence[str] | None = None,
) -> ProfileView:
    """What the evaluator sees of one profile (every part; only the events named ``names``
    when given). ``now`` is not used to filter: kept for callers."""
    reads = EVERYTHING if names is None else Reads(names=frozenset(names))
    return load_views(conn, ws, [profile_id], half_lives, reads)[profile_id]


# Built once per dialect: the pipeline reads one profile's view for every event, and
# building a statement costs more than running it. ``pids`` is a list parameter
# (``storage.id_lists.ids_in``), and so is ``names``; they run at the driver's level
# (``storage.driver.DriverQuery``). The workspace is checked on
# each row of ``profiles`` and ``events`` rather than in the WHERE: with
# ``workspace_id = ?`` there, SQLite (no statistics) walks the workspace's whole index
# ((workspace, last seen) for profiles, (workspace, message id) for events) instead of
# probing the ids.
_PIDS = "pids"
_TRAITS = per_dialect(
    lambda d: DriverQuery(
        by_ids(d, profiles, "id", _PIDS, [profiles.c.id, profiles.c.workspace_id, profiles.c.traits])
    )
)
_EVENT_COLUMNS = (events.c.profile_id, events.c.event, events.c.timestamp, events.c.workspace_id)


def _events_read(d: str, named: bool, props: bool) -> Select[Any]:
    """The profiles' ``track`` rows. On PostgreSQL one index probe per id (a ``LATERAL``
    subquery per element of the id array, kept apart by ``OFFSET 0``), as
    :func:`of_segment` does: with the ids as ``profile_id = ANY(:pids)`` the planner
    chose a parallel scan of the whole log for 5,000 ids, comparing every row with the
    array (over a minute a statement at 2,000,000 events; the probes take milliseconds)."""
    if d != "postgresql":
        return select(*_EVENT_COLUMNS, *([events.c.payload["properties"]] if props else [])).where(
            ids_in(d, events.c.profile_id, _PIDS),
            events.c.type == "track",
            *([ids_in(d, events.c.event, "names")] if named else []),
        )
    ids = func.unnest(array_param(_PIDS)).table_valued("pid").render_derived(name="u")
    x = events.alias("x")
    probe = (
        select(
            x.c.profile_id,
            x.c.event,
            x.c.timestamp,
            x.c.workspace_id,
            *([x.c.payload["properties"].label("properties")] if props else []),
        )
        .where(
            x.c.profile_id == ids.c.pid,
            x.c.type == "track",
            *([ids_in(d, x.c.event, "names")] if named else []),
        )
        .offset(literal_column("0"))
        .lateral("e")
    )
    return select(
        probe.c.profile_id,
        probe.c.event,
        probe.c.timestamp,
        probe.c.workspace_id,
        *([probe.c.properties] if props else []),
    ).select_from(ids.join(probe, true()))


_EVENTS = {
    (d, named, props): DriverQuery(_events_read(d, named, props))
    for d in DIALECTS
    for named in (False, True)
    for props in (False, True)
}
_LIST, _TAG, _SCORE, _STAGE = range(4)


def _others_read(
    d: str, lists: bool, tags: bool, scores: bool, stage: bool
) -> Select[Any] | CompoundSelect[Any]:
    """The profiles' lists, tags, scores and stage (those asked for) in one statement:
    rows of (kind, profile id, list key / tag / model key / stage, points, as of). The
    scores come first, so the last two columns have their types (the other parts leave
    them NULL)."""

    def part(kind: int, table: Any, key: Any, *more: Any) -> Select[Any]:
        return by_ids(
            d,
            table,
            "profile_id",
            _PIDS,
            [literal(kind).label("kind"), table.c.profile_id, key, *more],
            table.c.workspace_id == bindparam("ws"),
        )

    parts = []
    if scores:
        t = profile_scores
        parts.append(part(_SCORE, t, t.c.model_key, t.c.points, t.c.as_of))
    for wanted, kind, table, key in (
        (lists, _LIST, list_members, list_members.c.list_key),
        (tags, _TAG, profile_tags, profile_tags.c.tag),
        (stage, _STAGE, profile_stages, profile_stages.c.stage),
    ):
        if wanted:
            # Typed and named: on PostgreSQL each part is read through a subquery, where
            # an untyped NULL would be text and two unnamed ones one column.
            points = cast(null(), profile_scores.c.points.type).label("points")
            as_of = cast(null(), profile_scores.c.as_of.type).label("as_of")
            parts.append(part(kind, table, key, points, as_of))
    return parts[0] if len(parts) == 1 else union_all(*parts)


#: By dialect and (lists, tags, scores, stage), for the combinations that read something.
_OTHERS = {
    (d, *parts): DriverQuery(_others_read(d, *parts))
    for d in DIALECTS
    for parts in itertools.product((False, True), repeat=4)
    if any(parts)
}


def _load_chunk(
    conn: Connection,
    ws: str,
    ids: Sequence[str],
    half_lives: Mapping[str, DecaySpec],
    reads: Reads,
    known: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, ProfileView]:
    d = conn.dialect.name
    params: dict[str, Any] = {"ws": ws, _PIDS: list(ids)}
    traits: dict[str, Mapping[str, Any]] = {}
    if reads.traits and known is not None and all(pid in known for pid in ids):
        traits = {pid: known[pid] for pid in ids}
    elif reads.traits:
        for pid, row_ws, doc in _TRAITS[d].all(conn, params):
            if row_ws == ws:
                traits[pid] = doc if isinstance(doc, dict) else {}
    evs: dict[str, list[EventTuple]] = defaultdict(list)
    if reads.names is None or reads.names:
        with_props = reads.needs_properties()
        stmt = _EVENTS[(d, reads.names is not None, with_props)]
        args = params if reads.names is None else {**params, "names": sorted(reads.names)}
        empty: dict[str, Any] = {}
        for row in stmt.all(conn, args):
            if row[3] != ws:
                continue
            props = row[4] if with_props else empty
            evs[row[0]].append((row[1] or "", props if isinstance(props, dict) else empty, row[2]))
    lists: dict[str, set[str]] = defaultdict(set)
    tags: dict[str, set[str]] = defaultdict(set)
    scores: dict[str, dict[str, tuple[float, datetime]]] = defaultdict(dict)
    stages: dict[str, str] = {}
    wanted = (reads.lists, reads.tags, reads.scores, reads.stage)
    if any(wanted):
        for kind, pid, key, points, as_of in _OTHERS[(d, *wanted)].all(conn, params):
            if kind == _SCORE:
                scores[pid][key] = (float(points), as_of)
            elif kind == _LIST:
                lists[pid].add(key)
            elif kind == _TAG:
                tags[pid].add(key)
            else:
                stages[pid] = key
    return {
        pid: ProfileView(
            traits=traits.get(pid, {}),
            events=tuple(evs.get(pid, ())),
            lists=frozenset(lists.get(pid, ())),
            tags=frozenset(tags.get(pid, ())),
            scores=scores.get(pid, {}),
            half_lives=half_lives,
            stage=stages.get(pid),
        )
        for pid in ids
    }


class HeldViews:
    """A pipeline batch's segment views (ADR 0020): read for the batch's people together
    at its start (:meth:`prefetch`), or at a person's first need, with everything the
    workspace's segments read (``reads``), then kept current as the batch applies the
    person's events, so a person's later events read nothing.

    What keeps a held view current, and what drops it (the next need reads it again):

    * the person's track events, appended by :meth:`add_event` (the pipeline, before it
      re-evaluates the person: the event itself must be in the view);
    * their traits, given with each need (the pipeline holds the applied profile);
    * the scores the batch stored and the stage it moved (:meth:`scored`);
    * anything else written about the person inside the batch (a tag rule, a journey's
      tags, lists or stage; a merge clears every view): :meth:`drop`.

    A reader must not hold a person's view unless the database holds every event of the
    person the view would read: the pipeline writes its held attributions before a view
    is (re)read. Changes from outside the batch (the API adding the person to a list)
    are not seen by a held view, as by the batch's held memberships; they mark the person
    for a recheck (ADR 0004), which re-evaluates them from the database."""

    def __init__(self, reads: Reads, half_lives: Mapping[str, DecaySpec]) -> None:
        self.reads = reads
        self.half_lives = half_lives
        self._views: dict[tuple[str, str], ProfileView] = {}
        names = reads.names
        self._all_names = names is None
        self._names: frozenset[str] = names or frozenset()

    def prefetch(self, conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
        if not profile_ids:
            return
        for pid, view in load_views(conn, ws, profile_ids, self.half_lives, self.reads).items():
            self._views[(ws, pid)] = view

    def holds(self, ws: str, profile_id: str) -> bool:
        return (ws, profile_id) in self._views

    def view(
        self, conn: Connection, ws: str, profile_id: str, traits: Mapping[str, Any] | None
    ) -> ProfileView:
        """The person's view, with ``traits`` (when given) as their traits now."""
        key = (ws, profile_id)
        found = self._views.get(key)
        if found is None:
            known = None if traits is None else {profile_id: traits}
            found = load_views(conn, ws, [profile_id], self.half_lives, self.reads, traits=known)[profile_id]
        elif traits is not None and self.reads.traits and found.traits is not traits:
            found = replace(found, traits=traits)
        self._views[key] = found
        return found

    def add_event(self, ws: str, profile_id: str, name: str, properties: Any, timestamp: datetime) -> bool:
        """A track event of the person, applied in this batch: into their held view if
        the segments read its name. False when no view of the person is held."""
        key = (ws, profile_id)
        found = self._views.get(key)
        if found is None:
            return False
        if self._all_names or name in self._names:
            props = properties if isinstance(properties, dict) else {}
            self._views[key] = replace(found, events=(*found.events, (name, props, timestamp)))
        return True

    def scored(
        self,
        ws: str,
        profile_id: str,
        scores: Mapping[str, tuple[float, datetime]],
        stage: tuple[str | None, str] | None,
    ) -> None:
        """The scores the batch stored for the person (model key -> points, as of) and
        the stage it moved them to (``(before, after)``), into their held view."""
        key = (ws, profile_id)
        found = self._views.get(key)
        if found is None or (not scores and stage is None):
            return
        self._views[key] = replace(
            found,
            scores={**found.scores, **scores} if scores else found.scores,
            stage=stage[1] if stage is not None else found.stage,
        )

    def drop(self, ws: str, profile_id: str) -> None:
        self._views.pop((ws, profile_id), None)

    def clear(self) -> None:
        self._views.clear()
