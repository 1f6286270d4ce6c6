"""Running journeys: entries from events, signals, dates and the API; timers; effects.

Everything here runs inside the caller's transaction (the pipeline's partition batch, a
timer batch, an API request) and never commits. Effects that leave the database (email,
webhooks) are queued in the outbox in the same transaction; effects inside the database
(traits, tags, lists, entering another journey) are applied at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from whenthen import lists, messaging, profiles, scoring, tracking
from whenthen.journeys import repository as repo
from whenthen.journeys.calendar import next_anniversary, trait_instant
from whenthen.journeys.definition import (
    DateTrigger,
    EventTrigger,
    Frequency,
    JourneyDefinition,
    SignalTrigger,
    TraitChangeTrigger,
    reacts_to_events,
    reads_history,
)
from whenthen.journeys.engine import advance, start
from whenthen.journeys.management import definition_of
from whenthen.journeys.matching import event_matches, holds, trait_holds
from whenthen.journeys.model import (
    CallWebhook,
    ChangeList,
    EnrollElsewhere,
    EventFacts,
    EventSeen,
    JournalEntry,
    SendEmail,
    State,
    Stimulus,
    Transition,
    UpdateProfile,
    Wake,
)
from whenthen.kernel.durations import parse_duration
from whenthen.kernel.errors import DomainError, NotFound
from whenthen.kernel.filters import MISSING as _MISSING
from whenthen.kernel.filters import Filter, lookup_path
from whenthen.kernel.ids import new_secret
from whenthen.tracking import StoredEvent

log = logging.getLogger("whenthen.journeys")
ENGAGEMENT_EVENTS = {"opened": "Email Opened", "clicked": "Email Link Clicked"}
MAX_FAILURES = 5


class NoFacts:
    """Facts for stimuli that need none (cancellation)."""

    def traits(self) -> Mapping[str, Any]:
        return {}

    def timezone(self) -> str | None:
        return None

    def count_events(self, name: str, where: tuple[Filter, ...], since: datetime | None) -> int:
        return 0

    def engaged(self, kind: str, message_ids: tuple[str, ...], link: str | None) -> bool:
        return False


class DbFacts:
    """What the engine may know about a person, read from the database on demand."""

    def __init__(self, conn: Connection, ws: str, profile_id: str) -> None:
        self.conn = conn
        self.ws = ws
        self.profile_id = profile_id
        self._profile: profiles.Profile | None = None

    def _get(self) -> profiles.Profile:
        if self._profile is None:
            self._profile = profiles.get_profile(self.conn, self.ws, self.profile_id)
        return self._profile

    def traits(self) -> Mapping[str, Any]:
        return self._get().traits

    def timezone(self) -> str | None:
        return self._get().timezone

    def count_events(self, name: str, where: tuple[Filter, ...], since: datetime | None) -> int:
        found = tracking.named_events(self.conn, self._get().id, [name], since=since)
        return sum(1 for e in found if event_matches(facts_of(e), name, where))

    def engaged(self, kind: str, message_ids: tuple[str, ...], link: str | None) -> bool:
        name = ENGAGEMENT_EVENTS[kind]
        for e in tracking.named_events(self.conn, self._get().id, [name], since=None):
            props = e.payload.get("properties") or {}
            if props.get("message_id") in message_ids and (link is None or link in str(props.get("url", ""))):
                return True
        return False


def facts_of(event: StoredEvent) -> EventFacts:
    return EventFacts(
        name=event.event or event.type.value,
        properties=event.payload.get("properties") or event.payload.get("traits") or {},
        timestamp=event.timestamp,
        message_id=event.message_id,
        context=event.payload.get("context") or {},
    )


def _new_enrollment_id() -> str:
    return "enr_" + new_secret(12).replace("-", "a").replace("_", "b")


# ---- persisting transitions -----------------------------------------------------------


def _persist(
    conn: Connection,
    *,
    ws: str,
    journey: Any,
    version: int,
    profile_id: str,
    transition: Transition,
    now: datetime,
    new: bool,
    partitions: int,
    entry_key: str | None = None,
    depth: int = 0,
    writes: Writes | None = None,
) -> None:
    """Write a transition: the enrollment's state, its journal and its effects. With
    ``writes``, the journal rows and the queued messages are held there, to be written
    with the rest of the batch's (nothing in a batch reads them back), and so is a new
    enrollment whose only effects are messages (ADR 0014)."""
    state = transition.state
    eid = state.enrollment_id
    journal = repo.journal_rows(
        ws=ws, journey_id=journey.id, enrollment_id=eid, profile_id=profile_id, entries=transition.journal
    )
    # Without ``writes``, the journal is chained first, so that the enrollment's row is
    # written once with its new journal tail (ADR 0018).
    chained = None
    if writes is None and journal:
        chained = repo.chain_journal(conn, journal, tails={eid: None} if new else None)
    tails = chained.tails if chained is not None else {}
    if new:
        row = repo.enrollment_values(
            conn,
            ws=ws,
            journey_id=journey.id,
            version=version,
            profile_id=profile_id,
            state=state,
            entry_key=entry_key,
            now=now,
        )
        if writes is not None and all(isinstance(e, SendEmail | CallWebhook) for e in transition.effects):
            # Nothing else happens in the database for this transition: the row waits for
            # the batch's other writes (``Writes.ready_for`` writes it before the person's
            # enrollments are read again in the batch).
            writes.enter(profile_id, row)
        else:
            # With ``writes``, its journal rows are held, and a direct journal write (a
            # refused jump) may come first: their chain starts from the stored tail.
            repo.insert_enrollments(conn, [repo.with_tail(row, tails)])
    else:
        repo.save_states(conn, [repo.state_params(state, now)], tails)
    if chained is not None:
        repo.write_chained(conn, chained, leave={eid})
    elif writes is not None:
        writes.journal.extend(journal)
    for effect in transition.effects:
        if isinstance(effect, SendEmail | CallWebhook):
            queued = _queued(ws, journey, version, state, profile_id, effect)
            if writes is None:
                messaging.enqueue(conn, queued, now)
            else:
                writes.queued.append(queued)
        elif isinstance(effect, UpdateProfile):
            if effect.set or effect.unset:
                if writes is not None:
                    writes.touched.add(profile_id)
                change = profiles.update_traits(
                    conn, ws, profile_id, set_=effect.set, unset=effect.unset, now=now
                )
                if change is not None and change[0] != change[1] and depth < 5:
                    # As an identify's change would: trait-change journeys, date triggers.
                    _on_traits_changed(
                        conn,
                        ws,
                        repo.active_journeys(conn, ws),
                        profile_id,
                        change[0],
                        change[1],
                        at=now,
                        cause=f"{state.enrollment_id}:{effect.node}",
                        now=now,
                        partitions=partitions,
                        depth=depth + 1,
                        writes=writes,
                    )
            if effect.add_tags:
                profiles.add_tags(conn, ws, profile_id, effect.add_tags, now)
            if effect.remove_tags:
                profiles.remove_tags(conn, ws, profile_id, effect.remove_tags)
            if effect.stage:
                # Announced as the API's and the rules' moves are: journeys can trigger on it.
                scoring.move_stage(
                    conn,
                    ws,
                    profile_id,
                    effect.stage,
                    source=f"journey:{journey.key}",
                    now=now,
                    partitions=partitions,
                )
            # Segments reading traits, tags or the stage follow (the worker's recheck step).
            profiles.mark_for_recheck(conn, ws, [profile_id], "journey", now)
            if writes is not None and (effect.add_tags or effect.remove_tags or effect.stage):
                writes.audience.add(profile_id)
        elif isinstance(effect, ChangeList):
            if effect.add:
                lists.add_member(
                    conn, ws, effect.list_key, profile_id, source=f"journey:{journey.key}", now=now
                )
            else:
                lists.remove_member(conn, ws, effect.list_key, profile_id)
            profiles.mark_for_recheck(conn, ws, [profile_id], "journey", now)
            if writes is not None:
                writes.audience.add(profile_id)
        elif isinstance(effect, EnrollElsewhere) and depth < 5:
            _jump(conn, ws, journey, state, effect, profile_id, now, depth, partitions, writes)


def _render_context(journey: Any, state: State) -> dict[str, Any]:
    trigger = dict(state.context.get("trigger") or {})
    if "event" in trigger:
        trigger.setdefault("name", trigger["event"])  # templates say {{ event.name }}
    return {
        "event": trigger,
        "payload": state.context.get("payload") or {},
        "journey": {"key": journey.key, "name": journey.name},
    }


def _queued(
    ws: str, journey: Any, version: int, state: State, profile_id: str, effect: SendEmail | CallWebhook
) -> messaging.Queued:
    """The message (and outbox job) a send or webhook effect queues. An email's job names
    its template (the enrollment's published version and the node) rather than carrying
    a copy of it: the dispatcher reads it from the version (``management.JourneyTemplates``,
    ADR 0022)."""
    if isinstance(effect, SendEmail):
        channel = "email"
        payload: dict[str, Any] = {
            "template": {"journey": journey.id, "version": version, "node": effect.node},
            "marketing": effect.marketing,
        }
    else:
        channel = "webhook"
        payload = {
            "url": effect.url,
            "body": dict(effect.body) if effect.body is not None else None,
            "headers": dict(effect.headers),
            "map_response": dict(effect.map_response),
        }
    return messaging.Queued(
        ws=ws,
        channel=channel,
        message_id=effect.message_id,
        idempotency_key=effect.idempotency_key,
        profile_id=profile_id,
        journey_id=journey.id,
        enrollment_id=state.enrollment_id,
        node=effect.node,
        payload={**payload, "context": _render_context(journey, state)},
    )


def _jump(
    conn: Connection,
    ws: str,
    journey: Any,
    state: State,
    effect: EnrollElsewhere,
    profile_id: str,
    now: datetime,
    depth: int,
    partitions: int,
    writes: Writes | None = None,
) -> None:
    """Enter the person into the jump's target journey if it admits them. A target that
    is missing, paused or archived admits nobody (as for any entry): the refusal is
    journaled instead of raised, which would fail the whole event batch or timer."""
    target = repo.journey_by_key(conn, ws, effect.journey_key)
    entered = None
    if target is None:
        why = "no such journey"
    elif target.status != "active" or target.active_version is None:
        why = f"journey is {target.status}"
    else:
        why = "entry rules"
        entered = try_enter(
            conn,
            ws,
            target,
            profile_id,
            trigger=None,
            payload=state.context.get("payload"),
            now=now,
            depth=depth + 1,
            writes=writes,
            partitions=partitions,
        )
    if entered is None:
        repo.write_journal(
            conn,
            ws=ws,
            journey_id=journey.id,
            enrollment_id=state.enrollment_id,
            profile_id=profile_id,
            entries=[
                JournalEntry(
                    at=now,
                    kind="jump_refused",
                    node=effect.node,
                    detail={"journey": effect.journey_key, "reason": why},
                )
            ],
        )


# ---- entering -------------------------------------------------------------------------


def _entry_key(
    definition: JourneyDefinition, trigger: EventFacts | None, payload: Mapping[str, Any] | None
) -> Any:
    key = definition.entry.key
    if not key:
        return None
    if trigger is not None:
        value = lookup_path({"properties": trigger.properties, "context": trigger.context}, key)
        if value is _MISSING:
            value = lookup_path(trigger.properties, key)
    else:
        value = lookup_path(dict(payload or {}), key.removeprefix("payload."))
    return None if value is _MISSING else value


def _may_enter(
    conn: Connection,
    journey: Any,
    definition: JourneyDefinition,
    profile_id: str,
    entry_key: Any,
    now: datetime,
) -> str | None:
    """Why the person may not enter now, or ``None`` when they may."""
    entry = definition.entry
    if entry.frequency is Frequency.EVERY_TIME:
        return None  # concurrent enrollments allowed: the person's history does not matter
    previous = repo.previous_entries(conn, journey.id, profile_id)
    if entry.frequency is Frequency.ONCE and previous:
        return "already entered once"
    if entry.frequency is Frequency.ONCE_PER_KEY:
        if entry_key is None:
            return f"no value for entry key {entry.key}"
        if any(p.entry_key == str(entry_key) for p in previous):
            return "already entered for this key"
    if entry.frequency is Frequency.COOLDOWN and previous:
        assert entry.cooldown is not None
        if any(p.status == "active" for p in previous):
            return "already in the journey"
        last = max(p.entered_at for p in previous)
        if now - last < parse_duration(entry.cooldown):
            return "within the cooldown"
    return None


def try_enter(
    conn: Connection,
    ws: str,
    journey: Any,
    profile_id: str,
    *,
    trigger: EventFacts | None,
    payload: Mapping[str, Any] | None,
    now: datetime,
    partitions: int,
    depth: int = 0,
    writes: Writes | None = None,
) -> str | None:
    """Enter the person if the entry rules allow; returns the enrollment id or ``None``.
    ``partitions`` is the log's partition count, for the events a step appends (a stage
    move)."""
    if writes is not None:
        writes.ready_for(conn, profile_id, now)  # the entry rules read the person's enrollments
    version = journey.active_version
    definition = definition_of(conn, journey.id, version)
    entry_key = _entry_key(definition, trigger, payload)
    if _may_enter(conn, journey, definition, profile_id, entry_key, now) is not None:
        return None
    facts = DbFacts(conn, ws, profile_id)
    if definition.entry.condition is not None and not holds(
        definition.entry.condition, facts, now=now, messages={}
    ):
        return None
    enrollment_id = _new_enrollment_id()
    t = start(definition, enrollment_id, trigger=trigger, payload=payload, now=now, facts=facts)
    _persist(
        conn,
        ws=ws,
        journey=journey,
        version=version,
        profile_id=profile_id,
        transition=t,
        now=now,
        new=True,
        partitions=partitions,
        entry_key=None if entry_key is None else str(entry_key),
        depth=depth,
        writes=writes,
    )
    return enrollment_id


def enroll(
    conn: Connection,
    ws: str,
    key: str,
    profile_id: str,
    *,
    payload: Mapping[str, Any] | None,
    now: datetime,
    partitions: int,
    depth: int = 0,
) -> str | None:
    """Enter one profile through the API (or a jump), whatever the journey's trigger kind."""
    journey = repo.journey_by_key(conn, ws, key)
    if journey is None:
        raise NotFound("journey")
    if journey.status != "active":
        raise DomainError("journey_not_active", f"journey {key} is {journey.status}", status=409)
    return try_enter(
        conn,
        ws,
        journey,
        profile_id,
        trigger=None,
        payload=payload,
        now=now,
        partitions=partitions,
        depth=depth,
    )


# ---- reacting to events -----------------------------------------------------------------


def on_event(
    conn: Connection,
    event: StoredEvent,
    profile_id: str,
    *,
    traits_before: Mapping[str, Any],
    traits_after: Mapping[str, Any],
    now: datetime,
    partitions: int,
    active_journeys: list[Any] | None = None,
    writes: Writes | None = None,
) -> None:
    """Everything journeys do when a person's event has been applied to their profile:
    advance their active enrollments (waits, goals, exits), then enter them where the
    event, or the trait change it made, triggers a journey.

    ``active_journeys`` lets a batch look the workspace's active journeys up once;
    ``writes`` holds the journal rows and messages for the batch to write together
    (``Writes.write``, before a merge moves the person's rows and at the batch's end)."""
    ws = event.workspace_id
    if active_journeys is None:
        active_journeys = repo.active_journeys(conn, ws)
    if not active_journeys:
        return  # no active journey: nobody can enter or move
    if writes is not None:
        writes.ready_for(conn, profile_id, now)
    facts_event = facts_of(event)
    active = {j.id: j for j in active_journeys}
    if any(_needs(conn, j)[0] for j in active_journeys):
        for row in repo.active_for_profile(conn, ws, profile_id):
            journey = active.get(row.journey_id)
            if journey is None:
                continue  # paused: frozen
            _advance_row(conn, row, journey, EventSeen(facts_event), now, partitions, writes)
    for journey in active.values():
        definition = definition_of(conn, journey.id, journey.active_version)
        trigger = definition.trigger
        if isinstance(trigger, EventTrigger) and event_matches(facts_event, trigger.event, trigger.where):
            try_enter(
                conn,
                ws,
                journey,
                profile_id,
                trigger=facts_event,
                payload=None,
                now=now,
                partitions=partitions,
                writes=writes,
            )
    if traits_before != traits_after:
        _on_traits_changed(
            conn,
            ws,
            list(active.values()),
            profile_id,
            traits_before,
            traits_after,
            at=event.timestamp,
            cause=event.message_id,
            now=now,
            partitions=partitions,
            writes=writes,
        )


def _on_traits_changed(
    conn: Connection,
    ws: str,
    candidates: list[Any],
    profile_id: str,
    traits_before: Mapping[str, Any],
    traits_after: Mapping[str, Any],
    *,
    at: datetime,
    cause: str,
    now: datetime,
    partitions: int,
    depth: int = 0,
    writes: Writes | None = None,
) -> None:
    """Enter the person where the change triggers a journey, and (re)schedule the date
    triggers that read a changed trait: after an identify, and after a journey's own
    ``update_profile`` (``depth`` counts such steps, as for jumps)."""
    for journey in candidates:
        trigger = definition_of(conn, journey.id, journey.active_version).trigger
        if isinstance(trigger, TraitChangeTrigger):
            before = lookup_path(traits_before, trigger.trait)
            after = lookup_path(traits_after, trigger.trait)
            if after is _MISSING or before == after:
                continue
            if trigger.to is not None and after != trigger.to:
                continue
            if trigger.from_ is not None and before != trigger.from_:
                continue
            change = EventFacts(
                name="Trait Changed",
                properties={
                    "trait": trigger.trait,
                    "from": None if before is _MISSING else before,
                    "to": after,
                },
                timestamp=at,
                message_id=cause,
            )
            try_enter(
                conn,
                ws,
                journey,
                profile_id,
                trigger=change,
                payload=None,
                now=now,
                partitions=partitions,
                depth=depth,
                writes=writes,
            )
        elif isinstance(trigger, DateTrigger) and lookup_path(traits_before, trigger.trait) != lookup_path(
            traits_after, trigger.trait
        ):
            schedule_date(conn, ws, journey, trigger, profile_id, traits_after, now)


def _advance_row(
    conn: Connection,
    row: Any,
    journey: Any,
    stimulus: Stimulus,
    now: datetime,
    partitions: int,
    writes: Writes | None = None,
) -> None:
    definition = definition_of(conn, journey.id, row.version)
    facts = DbFacts(conn, row.workspace_id, row.profile_id)
    t = advance(definition, repo.to_state(row), stimulus, now=now, facts=facts)
    if t.state == repo.to_state(row) and not t.journal:
        return
    _persist(
        conn,
        ws=row.workspace_id,
        journey=journey,
        version=row.version,
        profile_id=row.profile_id,
        transition=t,
        now=now,
        new=False,
        partitions=partitions,
        writes=writes,
    )


def active_journeys(conn: Connection, ws: str) -> list[Any]:
    return repo.active_journeys(conn, ws)


def history_needed(conn: Connection, active_journeys: list[Any]) -> bool:
    """Whether a condition of these journeys (any version up to the active one) reads the
    person's past events: the pipeline then attributes each event before journeys see it."""
    return any(_needs(conn, j)[1] for j in active_journeys)


#: (journey id, active version) -> (an event can move its enrollments, a condition reads
#: the person's history), over every version up to the active one: published versions
#: never change, and enrollments stay on the version they entered.
_NEEDS: dict[tuple[str, int], tuple[bool, bool]] = {}


def _needs(conn: Connection, journey: Any) -> tuple[bool, bool]:
    key = (journey.id, journey.active_version)
    found = _NEEDS.get(key)
    if found is None:
        reacts = reads = False
        for number in range(1, journey.active_version + 1):
            try:
                definition = definition_of(conn, journey.id, number)
            except NotFound:
                continue  # a number never used
            reacts = reacts or reacts_to_events(definition)
            reads = reads or reads_history(definition)
        if len(_NEEDS) > 2000:
            _NEEDS.clear()
        found = _NEEDS[key] = (reacts, reads)
    return found


def on_merge(conn: Connection, ws: str, from_id: str, into_id: str) -> None:
    """Enrollments and messages of a merged-away profile follow it to the survivor."""
    repo.reassign_profile(conn, ws, from_id, into_id)
    messaging.reassign_profile(conn, ws, from_id, into_id)


def forget(conn: Connection, ws: str, profile_ids: list[str]) -> None:
    """Erasure: drop the person's enrollments, journal, schedules and messages."""
    repo.delete_for_profiles(conn, ws, profile_ids)
    messaging.delete_for(conn, ws, profile_ids)


# ---- timers ---------------------------------------------------------------------------


def fire_due(conn: Connection, now: datetime, *, limit: int, partitions: int, careful: bool = False) -> int:
    """Advance enrollments whose timers are due. An enrollment that keeps failing is
    retried with backoff and, after ``MAX_FAILURES``, dead-lettered with the reason.

    The transitions are computed one by one with the pure engine and written together, one
    executemany per table (enrollments, journal, messages, outbox); a transition with an
    effect inside the database (traits, tags, lists, a jump) is written on its own, in
    order, after the ones before it. A database error anywhere fails the whole call: the
    caller runs it again with ``careful=True``, which advances each enrollment in its own
    savepoint, so one bad row cannot hold the others back (``tasks.fire_timers``)."""
    rows = repo.due(conn, now, limit)
    fired = 0
    journeys: dict[str, Any] = {}
    batch = Writes()
    for row in rows:
        if row.journey_id not in journeys:
            journeys[row.journey_id] = repo.journey_by_id(conn, row.journey_id)
        journey = journeys[row.journey_id]
        if journey is None or journey.status != "active":
            # Paused: hold the timer; it fires once the journey resumes.
            repo.save_state(conn, repo.to_state(row), now)
            _hold(conn, row.id, now)
            continue
        if careful:
            savepoint = conn.begin_nested()
            try:
                _advance_row(conn, row, journey, Wake(row.wake_at), now, partitions)
                savepoint.commit()
                fired += 1
            except Exception as exc:
                savepoint.rollback()
                log.exception("enrollment %s failed on wake", row.id)
                _record_failure(conn, row, now, f"{type(exc).__name__}: {exc}")
            continue
        try:
            definition = definition_of(conn, journey.id, row.version)
            state = repo.to_state(row)
            t = advance(
                definition,
                state,
                Wake(row.wake_at),
                now=now,
                facts=DbFacts(conn, row.workspace_id, row.profile_id),
            )
        except DBAPIError:
            raise  # the transaction may be unusable: the careful pass takes over
        except Exception as exc:
            log.exception("enrollment %s failed on wake", row.id)
            _record_failure(conn, row, now, f"{type(exc).__name__}: {exc}")
            continue
        if t.state == state and not t.journal:
            fired += 1  # an early or stale wake: nothing to write
            continue
        if all(isinstance(e, SendEmail | CallWebhook) for e in t.effects):
            batch.add(row, journey, t, now)
            fired += 1
            continue
        batch.write(conn, now)  # the transitions before this one first, in order
        savepoint = conn.begin_nested()
        try:
            _persist(
                conn,
                ws=row.workspace_id,
                journey=journey,
                version=row.version,
                profile_id=row.profile_id,
                transition=t,
                now=now,
                new=False,
                partitions=partitions,
            )
            savepoint.commit()
            fired += 1
        except Exception as exc:
            savepoint.rollback()
            log.exception("enrollment %s failed on wake", row.id)
            _record_failure(conn, row, now, f"{type(exc).__name__}: {exc}")
    batch.write(conn, now)
    return fired


class Writes:
    """Rows written together, one executemany per table, rather than one statement
    each: enrollment states and journal rows, and messages with their outbox jobs. The
    timer step fills it with transitions whose only effects are messages (``add``); the
    pipeline hands it to :func:`on_event` for a batch's journal rows and messages."""

    def __init__(self) -> None:
        self.entered: list[tuple[Any, ...]] = []
        self.entering: set[str] = set()
        #: People whose profile row a journey step wrote (traits): the pipeline reads
        #: them again for their next event (``profiles.HeldProfiles.changed``).
        self.touched: set[str] = set()
        #: People whose tags, lists or stage a journey step changed: the pipeline drops
        #: its held segment views of them (``segments.HeldViews.drop``).
        self.audience: set[str] = set()
        self.states: list[dict[str, Any]] = []
        self.journal: list[dict[str, Any]] = []
        self.queued: list[messaging.Queued] = []
        #: Journal tails known from the rows the transitions were read from (the timer
        #: step's locked due rows), so that they are not read again to chain the journal.
        self.tails: dict[str, int | None] = {}

    def enter(self, profile_id: str, row: tuple[Any, ...]) -> None:
        """Hold a new enrollment's row (``repo.enrollment_values``)."""
        self.entered.append(row)
        self.entering.add(profile_id)
        self.tails[row[0]] = None  # a new enrollment's chain starts with its held rows

    def ready_for(self, conn: Connection, profile_id: str, now: datetime) -> None:
        """Write what is held before the person's enrollments are read (their entry
        rules, their active enrollments), if any of them is held."""
        if profile_id in self.entering:
            self.write(conn, now)

    def add(self, row: Any, journey: Any, t: Transition, now: datetime) -> None:
        self.states.append(repo.state_params(t.state, now))
        self.tails[row.id] = row.journal_tail
        self.journal.extend(
            repo.journal_rows(
                ws=row.workspace_id,
                journey_id=journey.id,
                enrollment_id=t.state.enrollment_id,
                profile_id=row.profile_id,
                entries=t.journal,
            )
        )
        for effect in t.effects:
            assert isinstance(effect, SendEmail | CallWebhook)
            self.queued.append(
                _queued(row.workspace_id, journey, row.version, t.state, row.profile_id, effect)
            )

    def write(self, conn: Connection, now: datetime) -> None:
        # The journal is chained first: new enrollments are inserted, and the states
        # saved, with their new journal tails (each enrollment row written once).
        chained = repo.chain_journal(conn, self.journal, tails=self.tails)
        written = {row[0] for row in self.entered} | {p["b_id"] for p in self.states}
        if self.entered:
            repo.insert_enrollments(conn, [repo.with_tail(row, chained.tails) for row in self.entered])
            self.entered, self.entering = [], set()
        if self.states:
            repo.save_states(conn, self.states, chained.tails)
        repo.write_chained(conn, chained, leave=written)
        messaging.enqueue_many(conn, self.queued, now)
        self.states, self.journal, self.queued, self.tails = [], [], [], {}


def _hold(conn: Connection, enrollment_id: str, now: datetime) -> None:
    from sqlalchemy import update

    from whenthen.journeys.tables import enrollments

    # Look again in a minute; the due index keeps this cheap.
    conn.execute(
        update(enrollments)
        .where(enrollments.c.id == enrollment_id)
        .values(wake_at=now + timedelta(minutes=1), updated_at=now)
    )


def _record_failure(conn: Connection, row: Any, now: datetime, reason: str) -> None:
    from sqlalchemy import update

    from whenthen.journeys.tables import enrollments

    failures = int(row.failures) + 1
    if failures >= MAX_FAILURES:
        values: dict[str, Any] = {
            "status": "failed",
            "reason": f"dead letter after {failures} failures: {reason}"[:2000],
            "wake_at": None,
            "ended_at": now,
        }
    else:
        values = {"wake_at": now + timedelta(seconds=30 * 2**failures), "reason": reason[:2000]}
    conn.execute(
        update(enrollments)
        .where(enrollments.c.id == row.id)
        .values(failures=failures, updated_at=now, **values)
    )
    if values.get("status") == "failed":
        # Journaled like any other end, so the enrollment's history and the stats show it.
        repo.write_journal(
            conn,
            ws=row.workspace_id,
            journey_id=row.journey_id,
            enrollment_id=row.id,
            profile_id=row.profile_id,
            entries=[JournalEntry(at=now, kind="failed", node=row.node, detail={"reason": values["reason"]})],
        )


# ---- date triggers --------------------------------------------------------------------


def _date_due(
    trigger: DateTrigger, traits: Mapping[str, Any], tz: str | None, now: datetime
) -> datetime | None:
    value = lookup_path(traits, trigger.trait)
    if value is _MISSING:
        return None
    offset = parse_duration(trigger.offset)
    if trigger.annual:
        return next_anniversary(value, tz, offset, trigger.at, now)
    due = trait_instant(value, tz, offset, trigger.at)
    return due if due is not None and due > now else None


def schedule_date(
    conn: Connection,
    ws: str,
    journey: Any,
    trigger: DateTrigger,
    profile_id: str,
    traits: Mapping[str, Any],
    now: datetime,
) -> None:
    tz = profiles.get_profile(conn, ws, profile_id).timezone
    repo.upsert_schedule(conn, ws, journey.id, profile_id, _date_due(trigger, traits, tz, now))


def backfill_dates(
    conn: Connection, ws: str, key: str, now: datetime, *, after: str | None, limit: int
) -> str | None:
    """Schedule a date-triggered journey for a page of profiles; returns the cursor to go on."""
    journey = repo.journey_by_key(conn, ws, key)
    if journey is None or journey.active_version is None:
        return None
    definition = definition_of(conn, journey.id, journey.active_version)
    trigger = definition.trigger
    if not isinstance(trigger, DateTrigger):
        return None
    page = profiles.search(conn, ws, email=None, trait_equals={}, after_id=after, limit=limit)
    for p in page:
        repo.upsert_schedule(conn, ws, journey.id, p.id, _date_due(trigger, p.traits, p.timezone, now))
    return page[-1].id if len(page) == limit else None


def fire_due_dates(conn: Connection, now: datetime, *, limit: int, partitions: int) -> int:
    fired = 0
    for row in repo.due_schedules(conn, now, limit):
        journey = repo.journey_by_id(conn, row.journey_id)
        if journey is None or journey.status != "active" or journey.active_version is None:
            # Paused: hold the date like a timer (the person enters once the journey
            # resumes, and an annual date is scheduled again from there); archived: drop it.
            held = now + timedelta(minutes=1) if journey is not None and journey.status == "paused" else None
            repo.upsert_schedule(conn, row.workspace_id, row.journey_id, row.profile_id, held)
            continue
        definition = definition_of(conn, journey.id, journey.active_version)
        trigger = definition.trigger
        try:
            profile = profiles.get_profile(conn, row.workspace_id, row.profile_id)
        except Exception:
            repo.upsert_schedule(conn, row.workspace_id, row.journey_id, row.profile_id, None)
            continue
        if isinstance(trigger, DateTrigger):
            event = EventFacts(
                name="Date Reached",
                properties={"trait": trigger.trait, "value": lookup_path(profile.traits, trigger.trait)},
                timestamp=row.due_at,
            )
            try_enter(
                conn,
                row.workspace_id,
                journey,
                profile.id,
                trigger=event,
                payload=None,
                now=now,
                partitions=partitions,
            )
            later = _date_due(trigger, profile.traits, profile.timezone, now) if trigger.annual else None
            repo.upsert_schedule(conn, row.workspace_id, journey.id, profile.id, later)
        else:
            repo.upsert_schedule(conn, row.workspace_id, row.journey_id, row.profile_id, None)
        fired += 1
    return fired


# ---- signals ----------------------------------------------------------------------------


def signal_page(
    conn: Connection,
    ws: str,
    name: str,
    properties: Mapping[str, Any],
    now: datetime,
    *,
    after: str | None,
    limit: int,
    partitions: int,
) -> tuple[int, str | None]:
    """Enter one page of profiles into every active journey triggered by signal ``name``
    whose filter they match. Returns (entered, cursor for the next page or None)."""
    targets = []
    for journey in repo.active_journeys(conn, ws):
        d = definition_of(conn, journey.id, journey.active_version)
        if isinstance(d.trigger, SignalTrigger) and d.trigger.signal == name:
            targets.append((journey, d.trigger))
    if not targets:
        return 0, None
    page = profiles.search(conn, ws, email=None, trait_equals={}, after_id=after, limit=limit)
    entered = 0
    event = EventFacts(name=name, properties=dict(properties), timestamp=now)
    for p in page:
        for journey, trigger in targets:
            if all(trait_holds(p.traits, c) for c in trigger.where) and try_enter(
                conn,
                ws,
                journey,
                p.id,
                trigger=event,
                payload=dict(properties),
                now=now,
                partitions=partitions,
            ):
                entered += 1
    return entered, (page[-1].id if len(page) == limit else None)
