"""Processing the event log behind the hot path, partition by partition.

Every call is appended to ``events`` with a partition chosen from the person's routing
key (userId, else anonymousId). A worker leases partitions; for each one it takes the
pending events in ``seq`` order, applies them to profiles, and marks them processed, all
in one transaction. One partition is handled by one worker at a time, so the calls of
one person are applied in order. See docs/adr/0002-event-log-pipeline.md.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from whenthen import journeys, profiles, scoring, tagging, tracking
from whenthen.pipeline.tables import pipeline_leases
from whenthen.segments import service as segments
from whenthen.segments.definition import to_us
from whenthen.segments.evaluator import DecaySpec
from whenthen.segments.membership import HeldWrites
from whenthen.segments.views import HeldViews
from whenthen.storage import locks
from whenthen.tracking import StoredEvent


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    processed: int
    suppressed: int
    failed: int = 0


@dataclass(frozen=True, slots=True)
class _Setup:
    """What a batch needs to know about a workspace: looked up once per transaction, not
    once per event or per partition."""

    erasures: bool
    active: list[Any]
    models: list[scoring.ScoringModel]
    lifecycle: scoring.Lifecycle | None
    index: segments.SegmentIndex  # before the field called ``segments``, which hides the module
    segments: list[segments.Segment]
    half_lives: dict[str, DecaySpec]
    tag_rules: list[tagging.TagRule]
    #: Something reads the person's past events (a segment, a tag rule's condition, a
    #: journey's condition): each event is attributed to its person as it is applied.
    history: bool
    #: A journey's condition reads the person's past events.
    journeys_history: bool


def _setup(conn: Connection, ws: str) -> _Setup:
    active = journeys.active_journeys(conn, ws)
    workspace_segments = segments.all_segments(conn, ws)
    rules = tagging.rules(conn, ws)
    journeys_history = journeys.history_needed(conn, active)
    return _Setup(
        erasures=profiles.has_erasures(conn, ws),
        active=active,
        models=scoring.models(conn, ws),
        lifecycle=scoring.lifecycle_of(conn, ws),
        index=segments.SegmentIndex(workspace_segments),
        segments=workspace_segments,
        half_lives=segments.half_lives_of(conn, ws) if workspace_segments else {},
        tag_rules=rules,
        history=bool(workspace_segments or rules) or journeys_history,
        journeys_history=journeys_history,
    )


def claim(
    conn: Connection,
    owner: str,
    partitions: range,
    *,
    now: datetime,
    lease: timedelta,
    max_partitions: int | None = None,
) -> list[int]:
    """Take (or renew) leases on free or expired partitions; return those now owned.

    A lease is a row per partition; a worker that stops renewing loses its partitions
    after ``lease`` and another worker takes them over. Updates are guarded by the row's
    previous owner and expiry, so two workers racing for one partition cannot both win.
    """
    rows = {
        r.partition: r
        for r in conn.execute(
            select(pipeline_leases).where(pipeline_leases.c.partition.in_(list(partitions)))
        )
    }
    owned: list[int] = []
    expires = now + lease
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    for p in partitions:
        if max_partitions is not None and len(owned) >= max_partitions:
            break
        row = rows.get(p)
        if row is None:
            inserted = conn.execute(
                dialect.insert(pipeline_leases)
                .values(partition=p, owner=owner, expires_at=expires)
                .on_conflict_do_nothing(index_elements=["partition"])
                .returning(pipeline_leases.c.partition)
            ).first()
            if inserted is not None:
                owned.append(p)
            continue
        elif row.owner == owner or row.expires_at <= now:
            result = conn.execute(
                update(pipeline_leases)
                .where(
                    pipeline_leases.c.partition == p,
                    pipeline_leases.c.owner == row.owner,
                    pipeline_leases.c.expires_at == row.expires_at,
                )
                .values(owner=owner, expires_at=expires)
            )
        else:
            continue
        if result.rowcount:
            owned.append(p)
    return owned


def release(conn: Connection, owner: str) -> None:
    conn.execute(delete(pipeline_leases).where(pipeline_leases.c.owner == owner))


def owned(conn: Connection, owner: str, candidates: Sequence[int], now: datetime) -> list[int]:
    """Those of ``candidates`` whose lease ``owner`` holds and has not let expire."""
    if not candidates:
        return []
    wanted = set(candidates)
    rows = conn.execute(_OWNED, {"owner": owner, "now": now})
    return sorted(r[0] for r in rows if r[0] in wanted)


#: Built once (every batch asks): the owner's live leases, the candidates picked in
#: Python (an expanding ``IN`` would be re-rendered at every execution).
_OWNED = select(pipeline_leases.c.partition).where(
    pipeline_leases.c.owner == bindparam("owner"), pipeline_leases.c.expires_at > bindparam("now")
)


def process_partitions(
    conn: Connection,
    owner: str,
    candidates: Sequence[int],
    *,
    limit: int,
    secret: bytes,
    now: datetime,
    partitions: int,
) -> BatchOutcome:
    """Apply, in one transaction, the oldest ``limit`` pending events of those
    ``candidates`` that ``owner`` still holds the lease of.

    The events are taken in log order across the partitions: each partition's share is
    the oldest of its pending events, so every person's calls are still applied in order;
    under light load one statement reads the events of many partitions, and the
    workspaces' set-up is read once for all of them."""
    held = owned(conn, owner, candidates, now)
    if not held:
        return BatchOutcome(processed=0, suppressed=0)
    events = tracking.pending_events(conn, held, limit)
    return process_events(conn, events, secret=secret, now=now, partitions=partitions)


class _HeldAnnouncements:
    """The system events a batch announces while it is applied (entries and exits, score
    thresholds, stage moves), appended to the log together when its events are done, in
    the order they were announced: one look-up of senders and one insert per workspace
    instead of per event. Nothing in the batch reads them back before then: the log's
    pending events are not anyone's yet (they count once processed, in a later batch),
    and a message id derived from the cause dedupes them as before."""

    def __init__(self) -> None:
        self.items: list[tuple[str, segments.Announcement]] = []

    def announce(
        self, conn: Connection, ws: str, announcements: Sequence[segments.Announcement], *, now: datetime
    ) -> None:
        self.items.extend((ws, a) for a in announcements)

    def flush(self, conn: Connection, now: datetime, partitions: int) -> None:
        for ws, group in itertools.groupby(self.items, key=lambda item: item[0]):
            announce(conn, ws, [a for _, a in group], now=now, partitions=partitions)
        self.items.clear()


def process_events(
    conn: Connection,
    events: list[StoredEvent],
    *,
    secret: bytes,
    now: datetime,
    partitions: int,
) -> BatchOutcome:
    """Apply events in order. ``partitions`` is the log's partition count, for the events
    this batch emits (score thresholds, stage moves)."""
    locks.pipeline_batch(conn)  # an erasure waits for this batch (storage/locks.py)
    processed: dict[int, str | None] = {}
    suppressed: list[int] = []
    # Events are marked with their profile at the end of the batch; a merge later in the
    # same batch must redirect the ones applied before it.
    redirects: dict[str, str] = {}
    setups: dict[str, _Setup] = {}
    # The batch's journal rows and messages, written together at its end; and so are the
    # system events it announces.
    writes = journeys.Writes()
    announced = _HeldAnnouncements()
    memberships = HeldWrites()  # and so are the membership rows and timers
    # The people its events name read and locked together, their activity written once.
    people = profiles.HeldProfiles()
    people.prefetch(conn, events)
    # Events attributed to their person but not yet written: written together when
    # something is about to read the person's events (``attribute_held``), else by
    # ``finish_events`` at the batch's end, which writes every event's person anyway.
    # Those of a person merged away since go to the survivor (``redirects``), as the
    # merge moved the ones already written. A merge needs no flush of its own: its
    # segment re-evaluation reads only names some segment reads, and an event of such a
    # name was written when it was applied (its segments were about to read it).
    held_attributions: dict[int, str] = {}

    def attribute_held() -> None:
        if held_attributions:
            tracking.attribute_events(
                conn, {seq: _follow(redirects, pid) or pid for seq, pid in held_attributions.items()}
            )
            held_attributions.clear()

    # Their score rows too, where the workspace scores; and, where it has segments, their
    # memberships and what the segments see of them (ADR 0020), kept current through the
    # batch. On PostgreSQL only: there a read per person is a round trip (~0.3 ms at
    # 10,000 people); on SQLite the reads are cheap, and holding cost more than the reads
    # it saved (memberships 6-12 %, views 6-10 % at 40 events a person).
    scores = scoring.HeldScores()
    views: dict[str, HeldViews] = {}
    postgres = conn.dialect.name == "postgresql"
    for ws, ids in people.prefetched().items():
        known = setups[ws] = _setup(conn, ws)
        if known.models:
            scores.prefetch(conn, ws, ids)
        if known.segments and postgres:
            views[ws] = HeldViews(known.index.reads, known.half_lives)
            views[ws].prefetch(conn, ws, ids)
            memberships.prefetch(conn, ws, ids)
    for event in events:
        ws = event.workspace_id
        setup = setups.get(ws)
        if setup is None:
            setup = setups[ws] = _setup(conn, ws)
            if setup.segments and postgres:
                views[ws] = HeldViews(setup.index.reads, setup.half_lives)
        applied = profiles.apply_event(
            conn, event, secret=secret, now=now, check_erasures=setup.erasures, held=people
        )
        if applied.suppressed:
            suppressed.append(event.seq)
            continue
        processed[event.seq] = applied.profile_id
        assert applied.profile_id is not None
        if applied.merged_from is not None:
            redirects[applied.merged_from] = applied.profile_id
            # The survivor's view is read again (with the merged-away person's events);
            # the read writes the held attributions first (to the survivor, ``redirects``).
            for kept in views.values():
                kept.clear()
            writes.write(conn, now)  # rows held for the merged-away profile move with it
            memberships.flush(conn)
            announced.flush(conn, now, partitions)
            journeys.on_merge(conn, event.workspace_id, applied.merged_from, applied.profile_id)
            scoring.move_to(conn, ws, applied.merged_from, applied.profile_id, now)
            scores.forget()
            if setup.segments:
                segments.on_merge(conn, ws, applied.merged_from, applied.profile_id, now)
        scored = None
        if setup.models or setup.lifecycle is not None:
            scored = _score(
                conn,
                event,
                applied.profile_id,
                applied.traits_after,
                now,
                setup.models,
                setup.lifecycle,
                announced,
                scores,
            )
            if ws in views:
                views[ws].scored(
                    ws,
                    applied.profile_id,
                    scores.values(ws, applied.profile_id, scored.stored),
                    scored.stage_change,
                )
        if setup.history:
            # Journeys' conditions, segments and tag rules' conditions count the person's
            # events: this one (and the batch's earlier ones) must be theirs before any of
            # them reads the person's events. Held until then: most events (the system
            # events a batch announces, above all) are read by none of them.
            held_attributions[event.seq] = applied.profile_id
        if setup.tag_rules and event.type.value == "track" and event.event is not None:
            attribute_held()
            tagged = tagging.on_event(
                conn,
                ws,
                applied.profile_id,
                event=event.event,
                properties=event.payload.get("properties") or {},
                now=now,
                workspace_rules=setup.tag_rules,
                half_lives=setup.half_lives or None,
            )
            if tagged and ws in views:
                views[ws].drop(ws, applied.profile_id)
        if setup.segments:
            change = _change(event, applied, scored)
            held_views = views.get(ws)
            if held_views is None:
                if _reads_events(setup.index, change):
                    attribute_held()  # the view is read now: the event must be theirs
            elif held_views.holds(ws, applied.profile_id):
                if event.type.value == "track":
                    properties = event.payload.get("properties")
                    held_views.add_event(
                        ws, applied.profile_id, event.event or "", properties, event.timestamp
                    )
            elif _reads_any_events(setup.index):
                # The view is read now, and kept: every event of the person it reads
                # must be theirs in the database first.
                attribute_held()
            _segments(
                conn,
                event,
                applied.profile_id,
                change,
                now,
                announced,
                memberships,
                setup.index,
                setup.half_lives,
                applied.traits_after,
                held_views,
            )
        if setup.journeys_history:
            attribute_held()
        journeys.on_event(
            conn,
            event,
            applied.profile_id,
            traits_before=applied.traits_before,
            traits_after=applied.traits_after,
            now=now,
            partitions=partitions,
            active_journeys=setup.active,
            writes=writes,
        )
        if writes.touched:
            for pid in writes.touched:
                people.changed(pid)
            writes.touched.clear()
        if writes.audience:
            # A journey step wrote tags, lists or a stage: read those people again.
            if ws in views:
                for pid in writes.audience:
                    views[ws].drop(ws, pid)
            writes.audience.clear()
    writes.write(conn, now)
    memberships.flush(conn)
    announced.flush(conn, now, partitions)
    people.flush(conn, now)
    if redirects:
        processed = {seq: _follow(redirects, pid) for seq, pid in processed.items()}
    tracking.finish_events(conn, processed, suppressed)
    return BatchOutcome(processed=len(processed), suppressed=len(suppressed))


def _segments(
    conn: Connection,
    event: StoredEvent,
    profile_id: str,
    change: segments.Change,
    now: datetime,
    announced: _HeldAnnouncements,
    memberships: HeldWrites,
    index: segments.SegmentIndex,
    half_lives: dict[str, DecaySpec],
    traits: Mapping[str, Any],
    views: HeldViews | None,
) -> None:
    """Re-evaluate the person in the segments this event can affect (all of them after a
    merge or a call other than track); entries and exits become events in their log."""
    segments.on_change(
        conn,
        event.workspace_id,
        profile_id,
        now,
        segments=index.segments,
        index=index,
        announce=announced.announce,
        held=memberships,
        cause=event.message_id,
        at=event.received_at,
        half_lives=half_lives,
        change=change,
        traits=traits,
        views=views,
    )


def _reads_events(index: segments.SegmentIndex, change: segments.Change) -> bool:
    """Whether the segments this change affects read any of the person's events."""
    _, reads = index.affected_with_reads(change)
    return reads.names is None or bool(reads.names)


def _reads_any_events(index: segments.SegmentIndex) -> bool:
    """Whether any of the workspace's segments reads the person's events."""
    names = index.reads.names
    return names is None or bool(names)


def _change(event: StoredEvent, applied: profiles.Applied, scored: scoring.Scored | None) -> segments.Change:
    """What processing this event changed for the person, for the segments' relevance
    rule. A track event changes the person's events (its own name), their traits only if
    they differ, the scores the scoring step stored anew (``scored.stored``: a score it
    left alone reads as before, its decay being the segments' timers' business) and the
    stage only if it moved. Anything else, a merge and a person's first event (nothing was
    evaluated for them yet) may change any segment."""
    if event.type.value != "track" or event.event is None or applied.merged_from is not None or applied.first:
        return segments.EVERYTHING_CHANGED
    return segments.Change(
        event=event.event,
        traits=applied.traits_before != applied.traits_after,
        scores=scored.stored if scored is not None else frozenset(),
        stage=scored is not None and scored.stage_change is not None,
    )


def _score(
    conn: Connection,
    event: StoredEvent,
    profile_id: str,
    traits_after: Mapping[str, Any],
    now: datetime,
    models: list[scoring.ScoringModel],
    lifecycle: scoring.Lifecycle | None,
    announced: _HeldAnnouncements,
    scores: scoring.HeldScores,
) -> scoring.Scored:
    """Scores and stage for this event; threshold crossings and stage moves become events
    in the person's log (``announced`` holds them until the batch's end), so journeys can
    trigger on them, in order, behind this batch."""
    ws = event.workspace_id
    scored = scoring.on_event(
        conn,
        ws,
        profile_id,
        event=event.event or event.type.value,
        properties=event.payload.get("properties") or {},
        traits_after=traits_after,
        now=now,
        workspace_models=models,
        lifecycle=lifecycle,
        held=scores,
    )
    system_events = [
        segments.Announcement(
            profile_id,
            "Score Threshold Crossed",
            scoring.crossing_properties(model_key, crossing),
            event.message_id,
            event.received_at,
        )
        for model_key, crossing in scored.crossings
    ]
    if scored.stage_change is not None:
        before, after = scored.stage_change
        system_events.append(
            segments.Announcement(
                profile_id,
                "Lifecycle Stage Changed",
                {"from": before, "to": after},
                event.message_id,
                event.received_at,
            )
        )
    if system_events:
        announced.announce(conn, ws, system_events, now=now)
    return scored


def emit(
    conn: Connection,
    ws: str,
    profile_id: str,
    name: str,
    properties: dict[str, Any],
    *,
    now: datetime,
    cause: str,
    at: datetime | None = None,
    partitions: int,
) -> None:
    """Append an event the system observed about a person to their log. Its message id is
    derived from the cause (and ``at``, the cause's own time), so reprocessing the cause
    cannot emit it twice."""
    announce(
        conn,
        ws,
        [segments.Announcement(profile_id, name, properties, cause, at)],
        now=now,
        partitions=partitions,
    )


def announce(
    conn: Connection,
    ws: str,
    announcements: Sequence[segments.Announcement],
    *,
    now: datetime,
    partitions: int,
) -> int:
    """Append many system events at once, each as :func:`emit` would. Returns how many
    were newly stored."""
    # The announcements of a batch share a few (name, properties) pairs (a segment's
    # entries and exits share one properties object): their part of the hashed text is
    # worked out once per pair.
    suffixes: dict[tuple[str, int], bytes] = {}
    items = []
    for a in announcements:
        suffix = suffixes.get((a.name, id(a.properties)))
        if suffix is None:
            suffix = suffixes[(a.name, id(a.properties))] = _hashed_suffix(a.name, a.properties)
        items.append(
            profiles.SystemEvent(a.profile_id, a.name, a.properties, _message_id(a.cause, suffix, a.at))
        )
    return profiles.emit_events(conn, ws, items, library="whenthen", now=now, partitions=partitions)


def system_message_id(cause: str, name: str, properties: dict[str, Any], at: datetime | None = None) -> str:
    """The message id of a system event: a function of its cause, name and properties
    (and ``at``), so announcing the same cause again finds it in the log.

    With ``at`` (a time that belongs to the cause: a timer's due time, the cause event's
    receipt), the id starts with that time as 13 hex digits of microseconds since 1970
    (fixed width, so the ids sort by it until 2112): ``wt-sys-<time><hash>``. The log's
    unique (workspace, message id) index then receives a batch of such events at its
    right-hand edge, a few pages, rather than at random places across every system event
    ever stored, a page each (a million expiring windows dirtied a page per exit: ADR
    0010). Without ``at``: ``wt-sys-<hash>``."""
    return _message_id(cause, _hashed_suffix(name, properties), at)


def _hashed_suffix(name: str, properties: dict[str, Any]) -> bytes:
    return f"\x1f{name}\x1f{sorted(properties.items())}".encode()


def _message_id(cause: str, suffix: bytes, at: datetime | None) -> str:
    key = hashlib.sha256(cause.encode() + suffix).hexdigest()[:32]
    if at is None:
        return f"wt-sys-{key}"
    return f"wt-sys-{max(0, to_us(at)):013x}{key}"


def _follow(redirects: dict[str, str], profile_id: str | None) -> str | None:
    seen: set[str] = set()
    while profile_id is not None and profile_id in redirects and profile_id not in seen:
        seen.add(profile_id)
        profile_id = redirects[profile_id]
    return profile_id


def park(conn: Connection, event: StoredEvent) -> BatchOutcome:
    """Set aside an event that fails on its own, so it cannot block its partition."""
    tracking.finish_events(conn, {}, (), [event.seq])
    return BatchOutcome(processed=0, suppressed=0, failed=1)


def pending_partitions(conn: Connection, candidates: Sequence[int]) -> list[int]:
    return tracking.pending_partitions(conn, candidates)


def count_pending(conn: Connection) -> int:
    return tracking.count_pending(conn)
