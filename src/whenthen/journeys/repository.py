from __future__ import annotations

import threading
import weakref
from collections import namedtuple
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    update,
)

from whenthen.journeys.model import JournalEntry, State, Status
from whenthen.journeys.tables import (
    date_schedules,
    enrollment_journal,
    enrollments,
    journey_versions,
    journeys,
)
from whenthen.storage.driver import (
    DriverQuery,
    StoredValues,
    copy_rows,
    execute,
    execute_each,
    json_dumps,
    json_text,
    statements,
    write_rows,
)
from whenthen.storage.id_lists import per_dialect
from whenthen.storage.plans import in_index_order


def _locking(conn: Connection, stmt: Any, *, skip_locked: bool = False) -> Any:
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=skip_locked)
    return stmt


# ---- journeys and versions ---------------------------------------------------------------


def journey_by_key(conn: Connection, ws: str, key: str, *, lock: bool = False) -> Any:
    stmt = select(journeys).where(journeys.c.workspace_id == ws, journeys.c.key == key)
    return conn.execute(_locking(conn, stmt) if lock else stmt).first()


_JOURNEY_BY_ID = select(journeys).where(journeys.c.id == bindparam("b_id"))


def journey_by_id(conn: Connection, journey_id: str) -> Any:
    return conn.execute(_JOURNEY_BY_ID, {"b_id": journey_id}).first()


def list_journeys(conn: Connection, ws: str) -> list[Any]:
    return list(conn.execute(select(journeys).where(journeys.c.workspace_id == ws).order_by(journeys.c.key)))


def insert_journey(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(insert(journeys).values(**row))


def update_journey(conn: Connection, journey_id: str, **values: Any) -> None:
    conn.execute(update(journeys).where(journeys.c.id == journey_id).values(**values))


def versions(conn: Connection, journey_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(journey_versions)
            .where(journey_versions.c.journey_id == journey_id)
            .order_by(journey_versions.c.version)
        )
    )


def version(conn: Connection, journey_id: str, number: int) -> Any:
    return conn.execute(
        select(journey_versions).where(
            journey_versions.c.journey_id == journey_id, journey_versions.c.version == number
        )
    ).first()


def insert_version(
    conn: Connection, journey_id: str, number: int, definition: dict[str, Any], now: datetime
) -> None:
    conn.execute(
        insert(journey_versions).values(
            journey_id=journey_id, version=number, definition=definition, published_at=None, created_at=now
        )
    )


def replace_draft(conn: Connection, journey_id: str, number: int, definition: dict[str, Any]) -> None:
    conn.execute(
        update(journey_versions)
        .where(
            journey_versions.c.journey_id == journey_id,
            journey_versions.c.version == number,
            journey_versions.c.published_at.is_(None),
        )
        .values(definition=definition)
    )


def mark_published(conn: Connection, journey_id: str, number: int, now: datetime) -> None:
    conn.execute(
        update(journey_versions)
        .where(journey_versions.c.journey_id == journey_id, journey_versions.c.version == number)
        .values(published_at=now)
    )


#: Built once: every pipeline batch asks.
_ACTIVE_JOURNEYS = select(journeys).where(
    journeys.c.workspace_id == bindparam("ws"),
    journeys.c.status == "active",
    journeys.c.active_version.is_not(None),
)


def active_journeys(conn: Connection, ws: str) -> list[Any]:
    """(journey row, its active version number) of the workspace's active journeys."""
    return list(conn.execute(_ACTIVE_JOURNEYS, {"ws": ws}))


# ---- enrollments --------------------------------------------------------------------------


def to_state(row: Any) -> State:
    return State(
        enrollment_id=row.id,
        status=Status(row.status),
        node=row.node,
        wake_at=row.wake_at,
        entered_at=row.entered_at,
        steps=row.steps,
        context=dict(row.context or {}),
        reason=row.reason,
    )


#: The columns of :func:`enrollment_values`' rows, in order.
_ENROLLMENT_COLUMNS = (
    "id",
    "workspace_id",
    "journey_id",
    "version",
    "profile_id",
    "status",
    "node",
    "wake_at",
    "entered_at",
    "ended_at",
    "steps",
    "context",
    "reason",
    "entry_key",
    "updated_at",
    "journal_tail",
)
#: A person entering a journey (every triggering event) is one insert at the driver's
#: level, as the states and journal rows below; ``failures`` keeps its server default.
_INSERT_ENROLLMENT_SQL = statements(
    f"INSERT INTO enrollments ({', '.join(_ENROLLMENT_COLUMNS)}) VALUES"  # noqa: S608
    f" ({', '.join('%s::jsonb' if c == 'context' else '%s' for c in _ENROLLMENT_COLUMNS)})"
)


def insert_enrollment(conn: Connection, **row: Any) -> None:
    """One new enrollment (the keywords of :func:`enrollment_values`)."""
    insert_enrollments(conn, [enrollment_values(conn, **row)])


def enrollment_values(
    conn: Connection,
    *,
    ws: str,
    journey_id: str,
    version: int,
    profile_id: str,
    state: State,
    entry_key: str | None,
    now: datetime,
) -> tuple[Any, ...]:
    """A new enrollment's row in stored form, for :func:`insert_enrollments`; its journal
    tail (the last item) is ``None`` until :func:`with_tail` gives it one."""
    at = StoredValues(conn).at
    return (
        state.enrollment_id,
        ws,
        journey_id,
        version,
        profile_id,
        state.status.value,
        state.node,
        at(state.wake_at),
        at(state.entered_at),
        at(now) if state.status.ended else None,
        state.steps,
        json_text(conn, dict(state.context)),
        state.reason,
        entry_key,
        at(now),
        None,
    )


def with_tail(row: tuple[Any, ...], tails: Mapping[str, int]) -> tuple[Any, ...]:
    """A new enrollment's row (:func:`enrollment_values`) with its journal tail from
    ``tails`` (:func:`chain_journal`), so that no ``UPDATE`` has to set it after."""
    tail = tails.get(row[0])
    return row if tail is None else (*row[:-1], tail)


def insert_enrollments(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """New enrollments from :func:`enrollment_values`: one statement for one, else one
    executemany on SQLite and one ``COPY`` on PostgreSQL (as the journal rows: a statement
    per row cost 12.7 us of the process and ~15 of the server an enrollment, ``COPY``
    ~5 and ~7-10, lab of 300-row batches)."""
    if len(rows) == 1:
        execute(conn, _INSERT_ENROLLMENT_SQL, rows[0])
    elif conn.dialect.name == "postgresql":
        copy_rows(conn, "enrollments", _ENROLLMENT_COLUMNS, rows)
    elif rows:
        execute_each(conn, _INSERT_ENROLLMENT_SQL, rows)


#: Enrollment states and journal rows are written at the driver's level (one executemany on
#: the DBAPI cursor, as ``tracking.repository.append``): SQLAlchemy's per-row parameter
#: work (``construct_params``, a bind processor per value) cost more than the statements on
#: the timer step's hot path (docs/design/journeys.md, "Timers"). The values are put in the
#: form the column types store, by those types' own bind processors, so nothing reads back
#: differently; ``tests/integration/test_timer_driver_writes.py`` compares the stored rows
#: with SQLAlchemy's own statements. The state update per dialect, written out.
_SAVE_STATES_SQL = {
    "sqlite": (
        "UPDATE enrollments SET status = ?, node = ?, wake_at = ?, ended_at = ?, steps = ?,"
        " context = ?, reason = ?, updated_at = ?, journal_tail = coalesce(?, journal_tail)"
        " WHERE id = ?"
    ),
    # One statement reading the batch from one JSON document (``jsonb_to_recordset``): an
    # executemany is a statement per row even in psycopg's pipeline mode, and arrays are
    # dumped value by value in Python; both were slower than SQLAlchemy's multi-row insert.
    "postgresql": (
        "UPDATE enrollments AS e SET status = v.status, node = v.node, wake_at = v.wake_at,"
        " ended_at = v.ended_at, steps = v.steps, context = v.context, reason = v.reason,"
        " updated_at = v.updated_at, journal_tail = coalesce(v.journal_tail, e.journal_tail)"
        " FROM jsonb_to_recordset(%s::jsonb) AS v(status text, node text, wake_at timestamptz,"
        " ended_at timestamptz, steps int, context jsonb, reason text, updated_at timestamptz,"
        " journal_tail bigint, id text)"
        " WHERE e.id = v.id"
    ),
}
_STATE_KEYS = (
    "status",
    "node",
    "wake_at",
    "ended_at",
    "steps",
    "context",
    "reason",
    "updated_at",
    "journal_tail",
    "id",
)
#: Journal rows: an executemany on SQLite, ``COPY`` on PostgreSQL (:func:`write_chained`).
_INSERT_JOURNAL_SQL = (
    "INSERT INTO enrollment_journal (id, workspace_id, journey_id, enrollment_id, profile_id,"
    " at, kind, node, detail, prev_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_JOURNAL_KEYS = (
    "id",
    "workspace_id",
    "journey_id",
    "enrollment_id",
    "profile_id",
    "at",
    "kind",
    "node",
    "detail",
    "prev_id",
)
_SET_TAILS_SQL = {
    "sqlite": "UPDATE enrollments SET journal_tail = ? WHERE id = ?",
    "postgresql": (
        "UPDATE enrollments AS e SET journal_tail = v.tail"
        " FROM jsonb_to_recordset(%s::jsonb) AS v(tail bigint, id text) WHERE e.id = v.id"
    ),
}


def state_params(state: State, now: datetime) -> dict[str, Any]:
    return {
        "b_id": state.enrollment_id,
        "b_status": state.status.value,
        "b_node": state.node,
        "b_wake_at": state.wake_at,
        "b_ended_at": now if state.status.ended else None,
        "b_steps": state.steps,
        "b_context": dict(state.context),
        "b_reason": state.reason,
        "b_updated_at": now,
    }


def save_state(conn: Connection, state: State, now: datetime) -> None:
    save_states(conn, [state_params(state, now)])


def save_states(
    conn: Connection, params: Sequence[dict[str, Any]], tails: Mapping[str, int] | None = None
) -> None:
    """Many ``save_state`` at once (one executemany), from :func:`state_params`; with
    ``tails``, the enrollments named there get that journal tail in the same statement
    (:func:`write_chained` ``leave``)."""
    if not params:
        return
    tail = (tails or {}).get
    if conn.dialect.name == "postgresql" and len({p["b_id"] for p in params}) < len(params):
        # One UPDATE ... FROM applies one row per enrollment: keep each one's last, as a
        # statement per row would leave it.
        params = list({p["b_id"]: p for p in params}.values())
    stored = StoredValues(conn)
    at, dumps = stored.at, stored.dumps
    values = [
        (
            p["b_status"],
            p["b_node"],
            at(p["b_wake_at"]),
            at(p["b_ended_at"]),
            p["b_steps"],
            dumps(p["b_context"]),
            p["b_reason"],
            at(p["b_updated_at"]),
            tail(p["b_id"]),
            p["b_id"],
        )
        for p in params
    ]
    write_rows(conn, _SAVE_STATES_SQL[conn.dialect.name], _STATE_KEYS, values)


def enrollment(conn: Connection, enrollment_id: str, *, lock: bool = False) -> Any:
    stmt = select(enrollments).where(enrollments.c.id == enrollment_id)
    return conn.execute(_locking(conn, stmt) if lock else stmt).first()


_ACTIVE_FOR_PROFILE = (
    select(enrollments)
    .where(
        enrollments.c.workspace_id == bindparam("b_ws"),
        enrollments.c.profile_id == bindparam("b_profile"),
        enrollments.c.status == Status.ACTIVE.value,
    )
    .order_by(enrollments.c.entered_at, enrollments.c.id)
)
_ACTIVE_FOR_PROFILE_LOCKED = _ACTIVE_FOR_PROFILE.with_for_update()


def active_for_profile(conn: Connection, ws: str, profile_id: str) -> list[Any]:
    stmt = _ACTIVE_FOR_PROFILE_LOCKED if conn.dialect.name == "postgresql" else _ACTIVE_FOR_PROFILE
    return list(conn.execute(stmt, {"b_ws": ws, "b_profile": profile_id}))


def active_for_journey(conn: Connection, journey_id: str, limit: int) -> list[Any]:
    stmt = (
        select(enrollments)
        .where(enrollments.c.journey_id == journey_id, enrollments.c.status == Status.ACTIVE.value)
        .order_by(enrollments.c.id)
        .limit(limit)
    )
    return list(conn.execute(_locking(conn, stmt)))


#: The columns the timer step uses (its state, where it belongs, its failures): the
#: others' result processing (two more timestamps a row) is skipped.
_DUE_COLUMNS = [
    enrollments.c[name]
    for name in (
        "id",
        "workspace_id",
        "journey_id",
        "version",
        "profile_id",
        "status",
        "node",
        "wake_at",
        "entered_at",
        "steps",
        "context",
        "reason",
        "failures",
        "journal_tail",
    )
]
_DUE = (
    select(*_DUE_COLUMNS)
    .where(
        enrollments.c.status == Status.ACTIVE.value,
        enrollments.c.wake_at.is_not(None),
        enrollments.c.wake_at <= bindparam("b_now"),
    )
    .order_by(enrollments.c.wake_at)
    .limit(bindparam("b_limit", type_=Integer))
)
_DUE_LOCKED = _DUE.with_for_update(skip_locked=True)


def due(conn: Connection, now: datetime, limit: int) -> list[Any]:
    """Active enrollments whose timer has fallen due, oldest first (the columns of
    ``_DUE_COLUMNS``, as named tuples); locked, skipping rows another worker holds
    (PostgreSQL). Read in ``ix_enrollments_due``'s order, stopping at ``limit`` however
    many are due. On the driver's cursor: SQLAlchemy's rows cost ~3 us each more, a
    timer batch reading a thousand."""
    with in_index_order(conn):
        rows = _DUE_QUERY[conn.dialect.name].all(conn, {"b_now": now, "b_limit": limit})
    return [_DueRow._make(r) for r in rows]


_DUE_QUERY = per_dialect(lambda d: DriverQuery(_DUE_LOCKED if d == "postgresql" else _DUE))
_DueRow = namedtuple("_DueRow", [c.name for c in _DUE_COLUMNS])  # type: ignore[misc]


_NEXT_WAKE = select(func.min(enrollments.c.wake_at)).where(
    enrollments.c.status == literal_column("'active'"), enrollments.c.wake_at.is_not(None)
)


def next_wake(conn: Connection) -> datetime | None:
    """The earliest timer of an active enrollment (one probe of ``ix_enrollments_due``:
    the predicate is the partial index's, written as literals)."""
    found = conn.execute(_NEXT_WAKE).scalar()
    return found if isinstance(found, datetime) else None


_PREVIOUS_ENTRIES = select(enrollments.c.entry_key, enrollments.c.entered_at, enrollments.c.status).where(
    enrollments.c.journey_id == bindparam("b_journey"), enrollments.c.profile_id == bindparam("b_profile")
)


def previous_entries(conn: Connection, journey_id: str, profile_id: str) -> list[Any]:
    return list(conn.execute(_PREVIOUS_ENTRIES, {"b_journey": journey_id, "b_profile": profile_id}))


def count_active(conn: Connection, journey_id: str) -> int:
    return int(
        conn.execute(
            select(func.count()).where(
                enrollments.c.journey_id == journey_id, enrollments.c.status == Status.ACTIVE.value
            )
        ).scalar_one()
    )


def enrollments_of_profile(conn: Connection, ws: str, profile_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(enrollments)
            .where(enrollments.c.workspace_id == ws, enrollments.c.profile_id == profile_id)
            .order_by(enrollments.c.entered_at)
        )
    )


# A person's journal rows are found through their enrollments (every journal row belongs
# to an enrollment of the same person: they are written, moved and deleted together):
# ``ix_enrollments_profile_status``, then each enrollment's chain from its ``journal_tail``
# (ADR 0018). The journal has no index on the person, and ``profile_id = ?`` on it was a
# scan of the whole journal for every merge the pipeline applies (70 ms at 400,000 journal rows on SQLite,
# growing with it, under the write lock). Date schedules are keyed (journey, person): they
# are found by the workspace's journeys and the ids, not by a scan.
def _person(ws: str, profile_ids: Sequence[str]) -> Any:
    """The condition on enrollments that selects those of the people."""
    return and_(enrollments.c.workspace_id == ws, enrollments.c.profile_id.in_(list(profile_ids)))


def reassign_profile(conn: Connection, ws: str, from_id: str, into_id: str) -> None:
    conn.execute(
        update(enrollment_journal)
        .where(enrollment_journal.c.id.in_(_journal_ids_of(_person(ws, [from_id]))))
        .values(profile_id=into_id)
    )
    conn.execute(
        update(enrollments)
        .where(enrollments.c.workspace_id == ws, enrollments.c.profile_id == from_id)
        .values(profile_id=into_id)
    )


def delete_for_profiles(conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
    ids = list(profile_ids)
    conn.execute(
        delete(enrollment_journal).where(enrollment_journal.c.id.in_(_journal_ids_of(_person(ws, ids))))
    )
    conn.execute(
        delete(enrollments).where(enrollments.c.workspace_id == ws, enrollments.c.profile_id.in_(ids))
    )
    conn.execute(
        delete(date_schedules).where(
            date_schedules.c.journey_id.in_(select(journeys.c.id).where(journeys.c.workspace_id == ws)),
            date_schedules.c.profile_id.in_(ids),
            date_schedules.c.workspace_id == ws,
        )
    )


def journal_rows(
    *, ws: str, journey_id: str, enrollment_id: str, profile_id: str, entries: Sequence[JournalEntry]
) -> list[dict[str, Any]]:
    return [
        {
            "workspace_id": ws,
            "journey_id": journey_id,
            "enrollment_id": enrollment_id,
            "profile_id": profile_id,
            "at": e.at,
            "kind": e.kind,
            "node": e.node,
            "detail": dict(e.detail),
        }
        for e in entries
    ]


def write_journal(
    conn: Connection,
    *,
    ws: str,
    journey_id: str,
    enrollment_id: str,
    profile_id: str,
    entries: Sequence[JournalEntry],
) -> None:
    if entries:
        insert_journal_rows(
            conn,
            journal_rows(
                ws=ws,
                journey_id=journey_id,
                enrollment_id=enrollment_id,
                profile_id=profile_id,
                entries=entries,
            ),
        )


@dataclass
class ChainedJournal:
    """Journal rows ready to insert (:func:`chain_journal`): their stored values, ids and
    ``prev_id`` given, and each enrollment's new tail (its last row's id)."""

    values: list[tuple[Any, ...]]
    tails: dict[str, int]


def chain_journal(
    conn: Connection, rows: Sequence[dict[str, Any]], *, tails: Mapping[str, int | None] | None = None
) -> ChainedJournal:
    """Give journal rows (from :func:`journal_rows`) their ids and chain each to its
    enrollment's row before it (ADR 0018). ``tails`` are enrollments' current tails the
    caller knows (``None`` for a new enrollment; the timer step's locked due rows carry
    theirs); the others are read here."""
    last: dict[str, int | None] = {}
    unknown: list[str] = []
    for r in rows:
        eid = r["enrollment_id"]
        if eid not in last:
            if tails is not None and eid in tails:
                last[eid] = tails[eid]
            else:
                last[eid] = None
                unknown.append(eid)
    if unknown:
        last.update(journal_tails(conn, unknown))
    stored = StoredValues(conn)
    at = stored.at
    dumps = json_dumps(conn) if conn.dialect.name == "postgresql" else stored.dumps
    values = []
    for jid, r in zip(_journal_ids(conn, len(rows)), rows, strict=True):
        eid = r["enrollment_id"]
        values.append(
            (
                jid,
                r["workspace_id"],
                r["journey_id"],
                eid,
                r["profile_id"],
                at(r["at"]),
                r["kind"],
                r["node"],
                dumps(r["detail"]),
                last[eid],
            )
        )
        last[eid] = jid
    return ChainedJournal(values, {eid: jid for eid, jid in last.items() if jid is not None})


def write_chained(
    conn: Connection, chained: ChainedJournal, *, leave: AbstractSet[str] = frozenset()
) -> None:
    """Insert chained journal rows (SQLite one executemany, PostgreSQL one ``COPY``) and
    move each enrollment's ``journal_tail`` to its last row, except those in ``leave``
    (written with the tail already: a new enrollment's row, a state saved with it)."""
    if not chained.values:
        return
    if conn.dialect.name == "postgresql":
        copy_rows(conn, "enrollment_journal", _JOURNAL_KEYS, chained.values)
    else:
        write_rows(conn, _INSERT_JOURNAL_SQL, _JOURNAL_KEYS, chained.values)
    rest = [(jid, eid) for eid, jid in chained.tails.items() if eid not in leave]
    if rest:
        write_rows(conn, _SET_TAILS_SQL[conn.dialect.name], ("tail", "id"), rest)


def insert_journal_rows(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Journal rows of many enrollments at once, from :func:`journal_rows`, chained and
    written (:func:`chain_journal`, :func:`write_chained`)."""
    if rows:
        write_chained(conn, chain_journal(conn, rows))


_NEXT_JOURNAL_IDS = {
    # SQLite has one writer at a time (this transaction): the ids after the largest.
    "sqlite": "SELECT max(id) FROM enrollment_journal",
    # The sequence looked up once, not once a row.
    "postgresql": (
        "SELECT nextval(s.seq) FROM (SELECT pg_get_serial_sequence('enrollment_journal', 'id')::regclass"
        " AS seq OFFSET 0) AS s, generate_series(1, %(n)s)"
    ),
}


class _IdBlocks:
    """PostgreSQL: journal ids taken from the sequence a block at a time, per engine, and
    handed out from there: one round trip per ``BLOCK`` ids, not one per journal write (a
    person entering a journey outside a pipeline batch wrote its journal in two round
    trips instead of one). Ids a process took and did not use are a gap, as any
    sequence's; the journal's order is its chains', not its ids' (:func:`journal_of`)."""

    BLOCK = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Per engine object (not its ``id()``, which a later engine on another database
        # may reuse): a block belongs to the database whose sequence gave it.
        self._free: weakref.WeakKeyDictionary[Engine, list[int]] = weakref.WeakKeyDictionary()

    def take(self, conn: Connection, n: int) -> list[int]:
        with self._lock:
            free = self._free.setdefault(conn.engine, [])
            if len(free) < n:
                more = max(n - len(free), self.BLOCK)
                # The driver's cursor: a thousand rows through SQLAlchemy's result cost
                # ~4 us a wake-up of the timer step.
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(_NEXT_JOURNAL_IDS["postgresql"], {"n": more})
                    free.extend(sorted(int(v) for (v,) in cursor.fetchall()))
                finally:
                    cursor.close()
            taken = free[:n]
            del free[:n]
        return taken


_ID_BLOCKS = _IdBlocks()


def _journal_ids(conn: Connection, n: int) -> list[int]:
    """``n`` new journal ids in increasing order."""
    if not n:
        return []
    if conn.dialect.name == "postgresql":
        return _ID_BLOCKS.take(conn, n)
    top = conn.exec_driver_sql(_NEXT_JOURNAL_IDS["sqlite"]).scalar()
    start = int(top or 0) + 1
    return list(range(start, start + n))


_TAILS = select(enrollments.c.id, enrollments.c.journal_tail).where(
    enrollments.c.id.in_(bindparam("b_ids", expanding=True))
)


def journal_tails(conn: Connection, enrollment_ids: Sequence[str]) -> dict[str, int | None]:
    """The enrollments' current journal tails (the id of their latest journal row)."""
    found: dict[str, int | None] = {}
    for chunk in range(0, len(enrollment_ids), 500):
        ids = list(enrollment_ids[chunk : chunk + 500])
        found.update({eid: tail for eid, tail in conn.execute(_TAILS, {"b_ids": ids})})
    return found


def _chain(enrollment_filter: Any) -> Any:
    """The chains of the enrollments ``enrollment_filter`` selects, walked back from their
    tails (a recursive query, a primary-key probe a row): (id, back), ``back`` 0 for the
    latest row of its enrollment."""
    chain = (
        select(enrollments.c.journal_tail.label("id"), literal_column("0").label("back"))
        .where(enrollment_filter, enrollments.c.journal_tail.is_not(None))
        .cte("journal_chain", recursive=True)
    )
    earlier = enrollment_journal.alias("earlier")
    return chain.union_all(
        select(earlier.c.prev_id, chain.c.back + 1).where(
            earlier.c.id == chain.c.id, earlier.c.prev_id.is_not(None)
        )
    )


def _journal_ids_of(enrollment_filter: Any) -> Any:
    """The ids of the journal rows of the enrollments ``enrollment_filter`` selects."""
    return select(_chain(enrollment_filter).c.id)


def journal_of(conn: Connection, enrollment_id: str) -> list[Any]:
    """An enrollment's journal, in the order it was written: the chain's order (on
    PostgreSQL each process hands out ids from blocks it took, so a later row of an
    enrollment written by another process may have a smaller id)."""
    chain = _chain(enrollments.c.id == enrollment_id)
    return list(
        conn.execute(
            select(enrollment_journal)
            .join(chain, chain.c.id == enrollment_journal.c.id)
            .order_by(chain.c.back.desc())
        )
    )


def journal_counts(conn: Connection, journey_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(enrollment_journal.c.kind, enrollment_journal.c.node, func.count().label("n"))
            .where(enrollment_journal.c.journey_id == journey_id)
            .group_by(enrollment_journal.c.kind, enrollment_journal.c.node)
        )
    )


# ---- date schedules ---------------------------------------------------------------------


def upsert_schedule(
    conn: Connection, ws: str, journey_id: str, profile_id: str, due_at: datetime | None
) -> None:
    conn.execute(
        delete(date_schedules).where(
            date_schedules.c.journey_id == journey_id, date_schedules.c.profile_id == profile_id
        )
    )
    if due_at is not None:
        conn.execute(
            insert(date_schedules).values(
                journey_id=journey_id, profile_id=profile_id, workspace_id=ws, due_at=due_at
            )
        )


#: Built once: the timer step asks on every worker pass, mostly to hear there are none.
_DUE_SCHEDULES = (
    select(date_schedules)
    .where(date_schedules.c.due_at <= bindparam("now"))
    .order_by(date_schedules.c.due_at)
    .limit(bindparam("limit"))
)
_DUE_SCHEDULES_CLAIMED = _DUE_SCHEDULES.with_for_update(skip_locked=True)


def due_schedules(conn: Connection, now: datetime, limit: int) -> list[Any]:
    stmt = _DUE_SCHEDULES_CLAIMED if conn.dialect.name == "postgresql" else _DUE_SCHEDULES
    return list(conn.execute(stmt, {"now": now, "limit": limit}))
