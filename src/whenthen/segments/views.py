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

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select

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
from whenthen.tracking.tables import events

#: Profile ids per ``IN (...)`` list: far below SQLite's 32,766 variables, large enough
#: that a million profiles take a few hundred round trips.
CHUNK = 2000


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


def load_views(
    conn: Connection,
    ws: str,
    profile_ids: Sequence[str],
    half_lives: Mapping[str, DecaySpec],
    reads: Reads = EVERYTHING,
) -> dict[str, ProfileView]:
    """The views of many profiles, by id: a few queries per :data:`CHUNK` of ids.

    Events are the profile's ``track`` rows (of ``reads.names`` when given), whatever their
    time (``first_performed`` of all time counts events after ``now`` too, as the compiler
    does). A profile id that does not exist gets an empty view."""
    out: dict[str, ProfileView] = {}
    for chunk in chunks(list(dict.fromkeys(profile_ids))):
        out.update(_load_chunk(conn, ws, chunk, half_lives, reads))
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


# Built once: the pipeline reads one profile's view for every event, and building a
# statement costs more than running it. ``pids``/``names`` are expanding IN parameters.
_PIDS = "pids"
_TRAITS = select(profiles.c.id, profiles.c.traits).where(
    profiles.c.workspace_id == bindparam("ws"), profiles.c.id.in_(bindparam(_PIDS, expanding=True))
)
# The workspace is checked on each event row rather than in the WHERE: with
# ``workspace_id = ?`` there, SQLite (no statistics) walks the workspace's whole
# (workspace, message id) index instead of the profiles' events.
_EVENT_COLUMNS = (events.c.profile_id, events.c.event, events.c.timestamp, events.c.workspace_id)
_EVENT_WHERE = (events.c.profile_id.in_(bindparam(_PIDS, expanding=True)), events.c.type == "track")
_NAMED = events.c.event.in_(bindparam("names", expanding=True))
_EVENTS = {
    (named, props): select(*_EVENT_COLUMNS, *([events.c.payload["properties"]] if props else [])).where(
        *_EVENT_WHERE, *([_NAMED] if named else [])
    )
    for named in (False, True)
    for props in (False, True)
}
_LISTS = select(list_members.c.profile_id, list_members.c.list_key).where(
    list_members.c.workspace_id == bindparam("ws"),
    list_members.c.profile_id.in_(bindparam(_PIDS, expanding=True)),
)
_TAGS = select(profile_tags.c.profile_id, profile_tags.c.tag).where(
    profile_tags.c.workspace_id == bindparam("ws"),
    profile_tags.c.profile_id.in_(bindparam(_PIDS, expanding=True)),
)
_SCORES = select(
    profile_scores.c.profile_id, profile_scores.c.model_key, profile_scores.c.points, profile_scores.c.as_of
).where(
    profile_scores.c.workspace_id == bindparam("ws"),
    profile_scores.c.profile_id.in_(bindparam(_PIDS, expanding=True)),
)
_STAGES = select(profile_stages.c.profile_id, profile_stages.c.stage).where(
    profile_stages.c.workspace_id == bindparam("ws"),
    profile_stages.c.profile_id.in_(bindparam(_PIDS, expanding=True)),
)


def _load_chunk(
    conn: Connection,
    ws: str,
    ids: Sequence[str],
    half_lives: Mapping[str, DecaySpec],
    reads: Reads,
) -> dict[str, ProfileView]:
    params: dict[str, Any] = {"ws": ws, _PIDS: list(ids)}
    traits: dict[str, dict[str, Any]] = {}
    if reads.traits:
        for pid, doc in conn.execute(_TRAITS, params):
            traits[pid] = doc if isinstance(doc, dict) else {}
    evs: dict[str, list[EventTuple]] = defaultdict(list)
    if reads.names is None or reads.names:
        with_props = reads.needs_properties()
        stmt = _EVENTS[(reads.names is not None, with_props)]
        args = params if reads.names is None else {**params, "names": sorted(reads.names)}
        empty: dict[str, Any] = {}
        for row in conn.execute(stmt, args):
            if row[3] != ws:
                continue
            props = row[4] if with_props else empty
            evs[row[0]].append((row[1] or "", props if isinstance(props, dict) else empty, row[2]))
    lists: dict[str, set[str]] = defaultdict(set)
    if reads.lists:
        for pid, key in conn.execute(_LISTS, params):
            lists[pid].add(key)
    tags: dict[str, set[str]] = defaultdict(set)
    if reads.tags:
        for pid, tag in conn.execute(_TAGS, params):
            tags[pid].add(tag)
    scores: dict[str, dict[str, tuple[float, datetime]]] = defaultdict(dict)
    if reads.scores:
        for pid, model, points, as_of in conn.execute(_SCORES, params):
            scores[pid][model] = (float(points), as_of)
    stages: dict[str, str] = {}
    if reads.stage:
        for pid, stage in conn.execute(_STAGES, params):
            stages[pid] = stage
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
