"""Writing membership: entries, exits, timers and their announcements, for many profiles
of one segment at once. Never commits.

Every change goes through the same three steps whether it concerns one profile or a
million: enter (a ``segment_members`` row, an open ``segment_history`` row, a ``Segment
Entered`` announcement), exit (the member row deleted, the open history row closed, a
``Segment Exited`` announcement), and the profile's timer set to when its answer may next
change by time alone (deleted when never). Rows are written with one executemany per
table, or one statement per :data:`~whenthen.segments.views.CHUNK` of ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, cast, delete, insert, literal, null, select, union_all, update

from whenthen.profiles import Emit
from whenthen.segments.tables import segment_history, segment_members, segment_timers
from whenthen.segments.views import chunks, of_segment
from whenthen.storage.driver import DriverQuery, StoredValues, write_rows
from whenthen.storage.id_lists import by_ids, per_dialect

ENTERED = "Segment Entered"
EXITED = "Segment Exited"


def no_emit(
    conn: Connection,
    ws: str,
    profile_id: str,
    name: str,
    properties: dict[str, Any],
    *,
    now: datetime,
    cause: str,
    at: datetime | None = None,
) -> None:
    """An :data:`Emit` that announces nothing."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """One system event to append to a person's log: what :class:`Emit` takes, as data
    (``at``: the cause's own time, see :class:`Emit`)."""

    profile_id: str
    name: str
    properties: dict[str, Any]
    cause: str
    at: datetime | None = None


class Announce(Protocol):
    """Append many system events at once, each exactly as :class:`Emit` would (same name,
    properties and message id derived from the cause). The pipeline's ``announce`` with
    its partitions bound is one; :func:`one_by_one` makes one from an :class:`Emit`."""

    def __call__(
        self, conn: Connection, ws: str, announcements: Sequence[Announcement], *, now: datetime
    ) -> object: ...


def one_by_one(emit: Emit) -> Announce:
    """An :class:`Announce` that calls ``emit`` for each announcement, in order."""

    def announce(conn: Connection, ws: str, announcements: Sequence[Announcement], *, now: datetime) -> None:
        for a in announcements:
            emit(conn, ws, a.profile_id, a.name, a.properties, now=now, cause=a.cause, at=a.at)

    return announce


@dataclass
class Moves:
    """Entries and exits of one segment, collected before they are written."""

    segment_id: str
    workspace_id: str
    key: str
    # (profile id, cause, the cause's own time or None: see Announcement)
    entered: list[tuple[str, str, datetime | None]] = field(default_factory=list)
    exited: list[tuple[str, str, datetime | None]] = field(default_factory=list)

    def enter(self, profile_id: str, cause: str, at: datetime | None = None) -> None:
        self.entered.append((profile_id, cause, at))

    def exit(self, profile_id: str, cause: str, at: datetime | None = None) -> None:
        self.exited.append((profile_id, cause, at))

    def __len__(self) -> int:
        return len(self.entered) + len(self.exited)

    def announcements(self) -> Iterator[Announcement]:
        # One properties object for all (read-only downstream): the announcer works out
        # its part of the message ids once.
        properties = {"segment": self.key}
        for name, moved in ((ENTERED, self.entered), (EXITED, self.exited)):
            for pid, cause, at in moved:
                yield Announcement(pid, name, properties, cause, at)


#: Rows per executemany and announcements per ``announce`` call: bounds the memory a
#: recompute of a million people takes.
BATCH = 20_000


# Built once per dialect (statement construction costs more than a one-row execution);
# ``pids`` is one list parameter (``storage.id_lists.ids_in``).
_DELETE_MEMBERS = per_dialect(lambda d: delete(segment_members).where(*of_segment(d, segment_members)))
# The terms of the partial index of open stays (segment, profile): the segment index
# alone would scan every past stay in the segment.
_CLOSE_STAYS = per_dialect(
    lambda d: (
        update(segment_history)
        .where(*of_segment(d, segment_history, open_only=True))
        .values(exited_at=bindparam("now"))
    )
)
DELETE_TIMERS = per_dialect(lambda d: delete(segment_timers).where(*of_segment(d, segment_timers)))
_INSERT_MEMBERS = insert(segment_members)
_INSERT_STAYS = insert(segment_history)
_INSERT_TIMERS = insert(segment_timers)


def write_moves(conn: Connection, moves: Moves, now: datetime, announce: Announce) -> None:
    """Write the entries and exits (members, history) and announce them."""
    seg, ws = moves.segment_id, moves.workspace_id
    for i in range(0, len(moves.entered), BATCH):
        entered = [p for p, _, _ in moves.entered[i : i + BATCH]]
        conn.execute(
            _INSERT_MEMBERS,
            [{"segment_id": seg, "profile_id": p, "workspace_id": ws, "since": now} for p in entered],
        )
        conn.execute(
            _INSERT_STAYS,
            [{"segment_id": seg, "workspace_id": ws, "profile_id": p, "entered_at": now} for p in entered],
        )
    d = conn.dialect.name
    for chunk in chunks([p for p, _, _ in moves.exited]):
        ids = list(chunk)
        conn.execute(_DELETE_MEMBERS[d], {"seg": seg, "pids": ids})
        conn.execute(_CLOSE_STAYS[d], {"seg": seg, "pids": ids, "now": now})
    batch: list[Announcement] = []
    for a in moves.announcements():
        batch.append(a)
        if len(batch) >= BATCH:
            announce(conn, ws, batch, now=now)
            batch = []
    if batch:
        announce(conn, ws, batch, now=now)


_UPDATE_TIMER = (
    update(segment_timers)
    .where(
        segment_timers.c.segment_id == bindparam("b_segment"),
        segment_timers.c.profile_id == bindparam("b_profile"),
    )
    .values(due_at=bindparam("b_due"))
)


def write_timers(
    conn: Connection,
    segment_id: str,
    workspace_id: str,
    due: Mapping[str, datetime | None],
    existing: Mapping[str, datetime],
) -> None:
    """Set each profile's timer in the segment to ``due[profile]`` (``None``: no timer),
    given the timers that exist now (``existing``, profile -> due_at): only differences
    are written."""
    gone, moved, new = _timer_changes(due, existing)
    for chunk in chunks(gone):
        conn.execute(DELETE_TIMERS[conn.dialect.name], {"seg": segment_id, "pids": list(chunk)})
    if moved:
        conn.execute(_UPDATE_TIMER, [{"b_segment": segment_id, "b_profile": p, "b_due": d} for p, d in moved])
    if new:
        conn.execute(
            _INSERT_TIMERS,
            [
                {"segment_id": segment_id, "profile_id": p, "workspace_id": workspace_id, "due_at": d}
                for p, d in new
            ],
        )


def _timer_changes(
    due: Mapping[str, datetime | None], existing: Mapping[str, datetime]
) -> tuple[list[str], list[tuple[str, datetime]], list[tuple[str, datetime]]]:
    """(timers to delete, to move, to make), by the key of ``due`` and ``existing`` (a
    profile of one segment, or a segment of one profile): only the differences."""
    gone: list[str] = []
    moved: list[tuple[str, datetime]] = []
    new: list[tuple[str, datetime]] = []
    for key, d in due.items():
        if d is None:
            if key in existing:
                gone.append(key)
        elif key not in existing:
            new.append((key, d))
        elif existing[key] != d:
            moved.append((key, d))
    return gone, moved, new


# ---- one profile in several segments ------------------------------------------------------


@dataclass
class ProfileChanges:
    """What re-evaluating one profile in several segments changes: its entries and exits
    (in the segments' order) and its timers, written together (:func:`write_profile`)."""

    workspace_id: str
    profile_id: str
    # (segment, key, entered, cause); every move of one change shares the cause and ``at``
    moves: list[tuple[str, str, bool, str]] = field(default_factory=list)
    timers: dict[str, datetime | None] = field(default_factory=dict)  # segment -> due (None: no timer)
    at: datetime | None = None  # the cause's own time (see Announcement)

    def move(self, segment_id: str, key: str, entered: bool, cause: str) -> None:
        self.moves.append((segment_id, key, entered, cause))


#: ``write_profile``'s writes at the driver's level, (SQLite, PostgreSQL) per kind of row:
#: a handful of rows for one person, at most every event, where SQLAlchemy's execution
#: cost more than the statements. PostgreSQL reads the rows from one JSON document
#: (``storage.driver.write_rows``); the stays keep the rows' order (``ORDINALITY``).
_PROFILE_SQL: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "members_in": (
        "INSERT INTO segment_members (segment_id, profile_id, workspace_id, since) VALUES (?, ?, ?, ?)",
        "INSERT INTO segment_members (segment_id, profile_id, workspace_id, since)"
        " SELECT segment_id, profile_id, workspace_id, since FROM jsonb_to_recordset(%s::jsonb)"
        " AS v(segment_id text, profile_id text, workspace_id text, since timestamptz)",
        ("segment_id", "profile_id", "workspace_id", "since"),
    ),
    "stays_opened": (
        "INSERT INTO segment_history (segment_id, workspace_id, profile_id, entered_at) VALUES (?, ?, ?, ?)",
        "INSERT INTO segment_history (segment_id, workspace_id, profile_id, entered_at)"
        " SELECT segment_id, workspace_id, profile_id, entered_at"
        " FROM ROWS FROM (jsonb_to_recordset(%s::jsonb) AS (segment_id text, workspace_id text,"
        " profile_id text, entered_at timestamptz)) WITH ORDINALITY"
        " AS v(segment_id, workspace_id, profile_id, entered_at, n) ORDER BY n",
        ("segment_id", "workspace_id", "profile_id", "entered_at"),
    ),
    "stays_passed": (
        "INSERT INTO segment_history (segment_id, workspace_id, profile_id, entered_at, exited_at)"
        " VALUES (?, ?, ?, ?, ?)",
        "INSERT INTO segment_history (segment_id, workspace_id, profile_id, entered_at, exited_at)"
        " SELECT segment_id, workspace_id, profile_id, entered_at, exited_at"
        " FROM ROWS FROM (jsonb_to_recordset(%s::jsonb) AS (segment_id text, workspace_id text,"
        " profile_id text, entered_at timestamptz, exited_at timestamptz)) WITH ORDINALITY"
        " AS v(segment_id, workspace_id, profile_id, entered_at, exited_at, n) ORDER BY n",
        ("segment_id", "workspace_id", "profile_id", "entered_at", "exited_at"),
    ),
    "members_out": (
        "DELETE FROM segment_members WHERE segment_id = ? AND profile_id = ?",
        "DELETE FROM segment_members AS m USING jsonb_to_recordset(%s::jsonb) AS v(segment_id text,"
        " profile_id text) WHERE m.segment_id = v.segment_id AND m.profile_id = v.profile_id",
        ("segment_id", "profile_id"),
    ),
    "stays_closed": (
        "UPDATE segment_history SET exited_at = ? WHERE segment_id = ? AND profile_id = ?"
        " AND exited_at IS NULL",
        "UPDATE segment_history AS h SET exited_at = v.exited_at FROM jsonb_to_recordset(%s::jsonb)"
        " AS v(exited_at timestamptz, segment_id text, profile_id text)"
        " WHERE h.segment_id = v.segment_id AND h.profile_id = v.profile_id AND h.exited_at IS NULL",
        ("exited_at", "segment_id", "profile_id"),
    ),
    "timers_gone": (
        "DELETE FROM segment_timers WHERE segment_id = ? AND profile_id = ?",
        "DELETE FROM segment_timers AS t USING jsonb_to_recordset(%s::jsonb) AS v(segment_id text,"
        " profile_id text) WHERE t.segment_id = v.segment_id AND t.profile_id = v.profile_id",
        ("segment_id", "profile_id"),
    ),
    "timers_moved": (
        "UPDATE segment_timers SET due_at = ? WHERE segment_id = ? AND profile_id = ?",
        "UPDATE segment_timers AS t SET due_at = v.due_at FROM jsonb_to_recordset(%s::jsonb)"
        " AS v(due_at timestamptz, segment_id text, profile_id text)"
        " WHERE t.segment_id = v.segment_id AND t.profile_id = v.profile_id",
        ("due_at", "segment_id", "profile_id"),
    ),
    "timers_new": (
        "INSERT INTO segment_timers (segment_id, profile_id, workspace_id, due_at) VALUES (?, ?, ?, ?)",
        "INSERT INTO segment_timers (segment_id, profile_id, workspace_id, due_at)"
        " SELECT segment_id, profile_id, workspace_id, due_at FROM jsonb_to_recordset(%s::jsonb)"
        " AS v(segment_id text, profile_id text, workspace_id text, due_at timestamptz)",
        ("segment_id", "profile_id", "workspace_id", "due_at"),
    ),
}


def _write(conn: Connection, kind: str, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    lite, pg, keys = _PROFILE_SQL[kind]
    write_rows(conn, pg if conn.dialect.name == "postgresql" else lite, keys, rows)


def write_profile(
    conn: Connection,
    changes: ProfileChanges,
    existing: Mapping[str, datetime],
    now: datetime,
    announce: Announce,
) -> None:
    """Write one profile's entries, exits and timers in all its segments at once: one
    statement per kind of row (members in, stays opened, members out, stays closed,
    timers deleted, moved, made) rather than one per segment, at the driver's level
    (``_PROFILE_SQL``), then announce the moves in their order. ``existing`` holds the
    profile's timers as they are (segment -> due)."""
    ws, pid = changes.workspace_id, changes.profile_id
    at = StoredValues(conn).at
    stamp = at(now)
    entered = [seg for seg, _, is_entry, _ in changes.moves if is_entry]
    exited = [seg for seg, _, is_entry, _ in changes.moves if not is_entry]
    _write(conn, "members_in", [(seg, pid, ws, stamp) for seg in entered])
    _write(conn, "stays_opened", [(seg, ws, pid, stamp) for seg in entered])
    _write(conn, "members_out", [(seg, pid) for seg in exited])
    _write(conn, "stays_closed", [(stamp, seg, pid) for seg in exited])
    gone, moved, new = _timer_changes(changes.timers, existing)
    _write(conn, "timers_gone", [(seg, pid) for seg in gone])
    _write(conn, "timers_moved", [(at(d), seg, pid) for seg, d in moved])
    _write(conn, "timers_new", [(seg, pid, ws, at(d)) for seg, d in new])
    announce_moves(conn, changes, now, announce)


def announce_moves(conn: Connection, changes: ProfileChanges, now: datetime, announce: Announce) -> None:
    """Announce one profile's entries and exits, in their order."""
    if changes.moves:
        announce(
            conn,
            changes.workspace_id,
            [
                Announcement(
                    changes.profile_id, ENTERED if is_entry else EXITED, {"segment": key}, cause, changes.at
                )
                for _, key, is_entry, cause in changes.moves
            ],
            now=now,
        )


#: A person's memberships and timers as rows of (kind, profile id, segment id, due at or
#: NULL), the timers first so the last column has their type: one person's
#: (``memberships_and_timers``, for every event the pipeline processes on SQLite) or
#: many people's (``HeldWrites.prefetch``; ``by_ids``: one probe per id on PostgreSQL,
#: ADR 0019), each found through the tables' (workspace, profile) indexes.
_TIMER, _MEMBER = 0, 1


def _states_read(d: str | None) -> Any:
    """The union of the timer and member rows of one person (``d`` None: ``:pid``) or of
    the people of the list ``:pids`` (``by_ids`` in dialect ``d``), in workspace ``:ws``."""
    parts = []
    for kind, table, due in (
        (_TIMER, segment_timers, segment_timers.c.due_at),
        (_MEMBER, segment_members, cast(null(), segment_timers.c.due_at.type).label("due_at")),
    ):
        columns = [literal(kind).label("kind"), table.c.profile_id, table.c.segment_id, due]
        in_workspace = table.c.workspace_id == bindparam("ws")
        if d is None:
            parts.append(select(*columns).where(in_workspace, table.c.profile_id == bindparam("pid")))
        else:
            parts.append(by_ids(d, table, "profile_id", "pids", columns, in_workspace))
    return union_all(*parts)


_STATES_OF_ONE = DriverQuery(_states_read(None))
_STATES_OF_MANY = per_dialect(lambda d: DriverQuery(_states_read(d)))


def _states(
    rows: Iterable[tuple[Any, ...]], pids: Iterable[str]
) -> dict[str, tuple[set[str], dict[str, datetime]]]:
    """The rows of ``_STATES_OF_*`` folded per person (those without rows: nothing)."""
    found: dict[str, tuple[set[str], dict[str, datetime]]] = {pid: (set(), {}) for pid in pids}
    for kind, pid, seg, due in rows:
        members, timers = found[pid]
        if kind == _TIMER:
            timers[seg] = due
        else:
            members.add(seg)
    return found


def memberships_and_timers(
    conn: Connection, ws: str, profile_id: str
) -> tuple[set[str], dict[str, datetime]]:
    """The person's segments and segment timers, as stored."""
    return _states(_STATES_OF_ONE.all(conn, {"ws": ws, "pid": profile_id}), [profile_id])[profile_id]


@dataclass
class _Held:
    """One profile's memberships and timers in a batch: as they were when the batch first
    asked, and as the batch has changed them since."""

    members_before: frozenset[str]
    timers_before: dict[str, datetime]
    members: set[str]
    timers: dict[str, datetime]
    # per segment, how many stays the batch opened (each at the batch's ``now``)
    opened: dict[str, int] = field(default_factory=dict)
    exited: set[str] = field(default_factory=set)  # segments the batch made them leave


class HeldWrites:
    """The membership writes of a pipeline batch, held until its end and then written with
    one statement per kind of row for every person of the batch (:meth:`flush`), instead
    of up to seven per event. The batch reads a person's memberships and timers through
    it (:meth:`state`): from the database at the person's first event, then as the batch
    has changed them, so a later event of the same person sees the earlier ones' moves.
    What is written is the net change: members and timers as they end against how they
    began; a stay open at the start and left is closed, each stay the batch opened is
    inserted (closed too if the batch also ended it). Every move of the batch happens at
    its one ``now`` (a change at another ``now`` flushes first). Nothing else in a batch
    reads these tables; a merge flushes before it moves the rows."""

    def __init__(self) -> None:
        self.people: dict[tuple[str, str], _Held] = {}
        self.now: datetime | None = None

    def prefetch(self, conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
        """Read the memberships and timers of a batch's people at its start, with one
        statement per :data:`~whenthen.segments.views.CHUNK` of them (ADR 0014: the
        batch holds its people, so nothing else changes these rows before it does),
        instead of one read at each person's first event. A person already held is
        left as the batch has changed them."""
        wanted = [pid for pid in dict.fromkeys(profile_ids) if (ws, pid) not in self.people]
        for chunk in chunks(wanted):
            rows = _STATES_OF_MANY[conn.dialect.name].all(conn, {"ws": ws, "pids": list(chunk)})
            for pid, (members, timers) in _states(rows, chunk).items():
                self.people[(ws, pid)] = _Held(frozenset(members), dict(timers), set(members), dict(timers))

    def state(
        self,
        conn: Connection,
        ws: str,
        profile_id: str,
        now: datetime,
        read: Callable[[], tuple[set[str], dict[str, datetime]]],
    ) -> tuple[set[str], dict[str, datetime]]:
        """The person's memberships and timers as the batch has left them (``read`` gives
        them from the database the first time); not to be changed by the caller. A
        change at another ``now`` than the held ones' writes those first."""
        if self.now is not None and now != self.now:
            self.flush(conn)
        self.now = now
        held = self.people.get((ws, profile_id))
        if held is None:
            members, timers = read()
            held = self.people[(ws, profile_id)] = _Held(
                frozenset(members), dict(timers), set(members), dict(timers)
            )
        return held.members, held.timers

    def record(self, changes: ProfileChanges) -> None:
        """Apply a change, made on :meth:`state`'s answer, to the held state."""
        held = self.people[(changes.workspace_id, changes.profile_id)]
        for seg, _, is_entry, _ in changes.moves:
            if is_entry:
                held.members.add(seg)
                held.opened[seg] = held.opened.get(seg, 0) + 1
            else:
                held.members.discard(seg)
                held.exited.add(seg)
        for seg, due in changes.timers.items():
            if due is None:
                held.timers.pop(seg, None)
            else:
                held.timers[seg] = due

    def flush(self, conn: Connection) -> None:
        """Write the net changes of everyone held, and forget them."""
        now, people = self.now, self.people
        self.people, self.now = {}, None
        if now is None or not people:
            return
        at = StoredValues(conn).at
        stamp = at(now)
        rows: dict[str, list[tuple[Any, ...]]] = {kind: [] for kind in _FLUSHED}
        for (ws, pid), h in people.items():
            # Left and back within the batch: a new member row too (``since`` is now).
            renewed = h.members & h.members_before & h.exited
            for seg in sorted((h.members - h.members_before) | renewed):
                rows["members_in"].append((seg, pid, ws, stamp))
            for seg in sorted((h.members_before - h.members) | renewed):
                rows["members_out"].append((seg, pid))
            for seg in sorted(h.exited & h.members_before):
                rows["stays_closed"].append((stamp, seg, pid))  # the stay open at the start
            for seg, n in sorted(h.opened.items()):
                still_open = 1 if seg in h.members else 0
                rows["stays_passed"].extend([(seg, ws, pid, stamp, stamp)] * (n - still_open))
                if still_open:
                    rows["stays_opened"].append((seg, ws, pid, stamp))
            due: dict[str, datetime | None] = dict(h.timers)
            due.update(dict.fromkeys(set(h.timers_before) - set(h.timers)))
            gone, moved, new = _timer_changes(due, h.timers_before)
            rows["timers_gone"].extend((seg, pid) for seg in gone)
            rows["timers_moved"].extend((at(d), seg, pid) for seg, d in moved)
            rows["timers_new"].extend((seg, pid, ws, at(d)) for seg, d in new)
        for kind in _FLUSHED:
            _write(conn, kind, rows[kind])


#: The kinds of rows a flush writes, in this order: the stays' closes before their inserts
#: (a close takes every open stay of its segment and person, and must find only the one
#: open at the start).
_FLUSHED = (
    "members_out",
    "members_in",
    "stays_closed",
    "stays_passed",
    "stays_opened",
    "timers_gone",
    "timers_moved",
    "timers_new",
)
