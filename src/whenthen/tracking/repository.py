from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    bindparam,
    delete,
    func,
    literal_column,
    or_,
    select,
    text,
    union_all,
    update,
)

from whenthen.storage.driver import (
    DriverQuery,
    StoredValues,
    execute,
    execute_each,
    statements,
    write_by_key,
    write_rows,
)
from whenthen.tracking.model import CallType, StoredEvent
from whenthen.tracking.tables import events

PENDING, PROCESSED, FAILED = 0, 1, 3

#: ``state = 0`` written as a literal, not a bound parameter, so that every plan can use
#: the partial index ``ix_events_pending`` (``WHERE state = 0``): a plan made without the
#: parameter's value (PostgreSQL's generic plans for prepared statements) cannot.
IS_PENDING = events.c.state == literal_column(str(PENDING))


#: The columns of a log row, in the order of the tuples ``append`` takes.
APPEND_COLUMNS = (
    "workspace_id",
    "message_id",
    "type",
    "event",
    "user_id",
    "anonymous_id",
    "timestamp",
    "received_at",
    "payload",
    "partition",
    "state",
)


def append(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
    """Insert log rows (tuples in ``APPEND_COLUMNS`` order: aware UTC datetimes, the
    payload a dict), skipping (workspace, messageId) pairs already stored; returns how many
    were inserted.

    At the driver's level (``storage.driver``), with the values in the form the columns
    store: SQLAlchemy's per-value bind processing cost more than the insert itself, and it
    ran under the writers' lock (docs/adr/0006-sqlite-writers-and-driver-level-append.md).
    SQLite: one ``INSERT ... ON CONFLICT DO NOTHING`` executemany (times as
    ``UTCDateTime`` stores them, JSON text); PostgreSQL: one ``INSERT ... SELECT`` over the
    batch as one JSON document, in the calls' order. Both report the rows inserted
    (conflicts not counted). ``tests/integration/test_append.py`` checks that what is
    stored reads back as SQLAlchemy's own insert of the same row does.
    """
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        # One statement over the batch as one JSON document (storage.driver.write_rows):
        # psycopg's executemany sends a statement per row, and cost the server 7.2 ms of
        # CPU a 100-call request against 5.7 on SQLite.
        return write_rows(conn, _APPEND_POSTGRESQL, APPEND_COLUMNS, list(rows))
    stored = StoredValues(conn)
    at, dumps = stored.at, stored.dumps  # ``at`` memoised: a request's calls share received_at
    values = [(*r[:6], at(r[6]), at(r[7]), dumps(r[8]), r[9], r[10]) for r in rows]
    return write_rows(conn, _APPEND_SQLITE, APPEND_COLUMNS, values)


#: ``append``'s statements, written out (the columns are ``APPEND_COLUMNS``).
_APPEND_SQLITE = (
    'INSERT INTO events (workspace_id, message_id, type, event, user_id, anonymous_id, "timestamp",'
    ' received_at, payload, "partition", state)'
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (workspace_id, message_id) DO NOTHING"
)
_APPEND_POSTGRESQL = (
    'INSERT INTO events (workspace_id, message_id, type, event, user_id, anonymous_id, "timestamp",'
    ' received_at, payload, "partition", state)'
    ' SELECT workspace_id, message_id, type, event, user_id, anonymous_id, "timestamp", received_at,'
    ' payload, "partition", state'
    " FROM ROWS FROM (jsonb_to_recordset(%s::jsonb) AS (workspace_id text, message_id text, type text,"
    ' event text, user_id text, anonymous_id text, "timestamp" timestamptz, received_at timestamptz,'
    ' payload jsonb, "partition" smallint, state smallint)) WITH ORDINALITY'
    ' AS v(workspace_id, message_id, type, event, user_id, anonymous_id, "timestamp", received_at,'
    ' payload, "partition", state, n)'
    # In the calls' order: the log's seq is each person's order of calls.
    " ORDER BY n"
    " ON CONFLICT (workspace_id, message_id) DO NOTHING"
)


def pending(conn: Connection, partitions: Sequence[int], limit: int) -> list[tuple[Any, ...]]:
    """The oldest pending events of each partition, about ``limit`` in all, in log order,
    as tuples of the log's columns in table order (:func:`to_stored` reads them).

    Each partition's share is read on its own through ``ix_events_pending`` (one
    statement, a ``UNION ALL`` of one ``LIMIT`` read a partition): a single ``partition
    IN (...) ORDER BY seq`` would read every pending row of those partitions before
    sorting, which costs as much as the backlog is long. A partition first gives at most
    ``limit / len(partitions)`` (rounded up) events, the oldest of its pending ones; what
    the others leave of ``limit`` is then shared among the partitions that filled their
    share (one more read, after the events already taken), so one busy partition among
    quiet ones still moves in large batches. Both shares are rounded up, so a backlog
    gives at least ``limit`` events (fewer than ``limit + len(partitions)``): the worker
    reads a full group as a backlog. Each partition's events are a prefix of its
    pending ones: every person's calls are applied in order.
    """
    n = len(partitions)
    share = limit if n == 1 else max(1, -(-limit // n))
    rows = _read_pending(conn, {p: 0 for p in partitions}, share)
    if n == 1 or len(rows) >= limit:
        return rows
    taken: dict[int, list[tuple[Any, ...]]] = {}
    for r in rows:
        taken.setdefault(r[_PARTITION], []).append(r)
    full = {p: got[-1][_SEQ] for p, got in taken.items() if len(got) >= share}
    if not full:
        return rows
    more = _read_pending(conn, full, max(1, -(-(limit - len(rows)) // len(full))))
    return sorted(rows + more, key=_seq_of)


#: Positions in a row of ``events`` read whole (table order; :func:`to_stored` unpacks it).
_COLUMNS = tuple(events.c.keys())
_SEQ, _PARTITION = _COLUMNS.index("seq"), _COLUMNS.index("partition")
if ("seq", *APPEND_COLUMNS, "profile_id") != _COLUMNS:
    raise RuntimeError(f"events' columns changed order ({_COLUMNS}): to_stored reads them by position")


def _seq_of(row: tuple[Any, ...]) -> int:
    return int(row[_SEQ])


def _read_pending(conn: Connection, after: dict[int, int], share: int) -> list[tuple[Any, ...]]:
    """Up to ``share`` pending events of each partition, those after the given ``seq``."""
    params: dict[str, Any] = {"share": share}
    for i, (p, seq) in enumerate(after.items()):
        params[f"p{i}"] = p
        params[f"a{i}"] = seq
    # Padded to a power of two with a partition that holds nothing (-1): a statement for
    # every count of partitions meant up to 128 statements, each compiled the first time
    # its count came up (tens of milliseconds for a wide union, in the middle of a pass).
    width = 1
    while width < len(after):
        width *= 2
    for i in range(len(after), width):
        params[f"p{i}"] = -1
        params[f"a{i}"] = 0
    return _pending_query(width, conn.dialect.name == "postgresql").all(conn, params)


#: The query for n partitions (a power of two; locking or not), built once and run at
#: the driver's level (``DriverQuery``): made afresh on every pass, its subqueries'
#: columns cost more than the read itself, and SQLAlchemy's execution of the union (its
#: cache key walks every subquery) took 20 µs an event read (bench.audience, SQLite).
_PENDING: dict[tuple[int, bool], DriverQuery] = {}


def _pending_query(n: int, locking: bool) -> DriverQuery:
    query = _PENDING.get((n, locking))
    if query is None:
        reads = [_pending_of(bindparam(f"p{i}"), bindparam(f"a{i}"), locking) for i in range(n)]
        if n == 1:
            stmt = reads[0]
        else:
            union = union_all(*(select(r.subquery()) for r in reads)).subquery()
            stmt = select(union).order_by(union.c.seq)
        query = _PENDING[(n, locking)] = DriverQuery(stmt)
    return query


def _pending_of(partition: Any, after: Any, locking: bool) -> Select[Any]:
    stmt = (
        select(events)
        .where(events.c.partition == partition, IS_PENDING, events.c.seq > after)
        .order_by(events.c.seq)
        .limit(bindparam("share", type_=Integer))
    )
    return stmt.with_for_update(skip_locked=True) if locking else stmt


def pending_partitions(conn: Connection, candidates: Sequence[int]) -> list[int]:
    """Those of ``candidates`` that hold pending events.

    A skip scan of the partial index: each step seeks the next partition above the last
    one found, so the cost grows with the number of busy partitions, not with the backlog
    (a ``GROUP BY`` over the pending rows took 300 ms a pass on SQLite with 200,000
    waiting) nor with the number of candidates (a probe each cost 6 ms on PostgreSQL)."""
    if not candidates:
        return []
    wanted = set(candidates)
    return [r[0] for r in conn.execute(_BUSY) if r[0] in wanted]


_BUSY = text(
    """
    WITH RECURSIVE busy(partition) AS (
        SELECT min(partition) FROM events WHERE state = 0
        UNION ALL
        SELECT (SELECT min(e.partition) FROM events e WHERE e.state = 0 AND e.partition > busy.partition)
        FROM busy WHERE busy.partition IS NOT NULL
    )
    SELECT partition FROM busy WHERE partition IS NOT NULL ORDER BY partition
    """
)


def count_pending(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).where(IS_PENDING)).scalar_one())


def mark(conn: Connection, seq_to_profile: dict[int, str | None], state: int) -> None:
    """Set the state (and the profile the event now belongs to) of processed events.
    At the driver's level (plain integers and strings, nothing to convert): it runs for
    every event the pipeline attributes, and again for each batch it finishes. Many rows
    are one executemany (psycopg sends them in one round trip), each found by its key.
    On PostgreSQL this replaced an ``UPDATE ... FROM jsonb_to_recordset``, which took ~17
    ms a batch with 30,000 events in the log (sampled in the audience bench; likely the
    join plan ``execute_each`` describes) and whose replacement made the pipeline with no
    audience 1,714 -> 2,556 events/s there."""
    if not seq_to_profile:
        return
    rows = [(state, p, s) for s, p in seq_to_profile.items()]
    if len(rows) == 1:
        execute(conn, _MARK_ONE, rows[0])
    elif conn.dialect.name == "postgresql":
        # One statement, each row probing the key (ADR 0021): the join plan that made
        # the JSON form slow is ruled out.
        write_by_key(conn, _MARK_POSTGRESQL, ("state", "profile_id", "seq"), rows)
    else:
        execute_each(conn, _MARK_ONE, rows)


_MARK_ONE = statements("UPDATE events SET state = %s, profile_id = %s WHERE seq = %s")
_MARK_POSTGRESQL = (
    "UPDATE events AS e SET state = v.state, profile_id = v.profile_id"
    " FROM jsonb_to_recordset(%s::jsonb) AS v(state int, profile_id text, seq bigint) WHERE e.seq = v.seq"
)


def delete_seqs(conn: Connection, seqs: Sequence[int]) -> None:
    if seqs:
        conn.execute(delete(events).where(events.c.seq.in_(list(seqs))))


def reassign_profile(conn: Connection, from_profile: str, into_profile: str) -> int:
    result = conn.execute(
        update(events).where(events.c.profile_id == from_profile).values(profile_id=into_profile)
    )
    return result.rowcount


def for_profile(
    conn: Connection,
    profile_ids: Sequence[str],
    *,
    after: tuple[datetime, int] | None,
    limit: int,
) -> list[Any]:
    stmt = select(events).where(events.c.profile_id.in_(list(profile_ids)))
    if after is not None:
        ts, seq = after
        stmt = stmt.where(or_(events.c.timestamp > ts, (events.c.timestamp == ts) & (events.c.seq > seq)))
    stmt = stmt.order_by(events.c.timestamp, events.c.seq).limit(limit)
    return list(conn.execute(stmt))


def delete_for_person(
    conn: Connection,
    workspace_id: str,
    profile_ids: Sequence[str],
    user_ids: Sequence[str],
    anonymous_ids: Sequence[str],
) -> int:
    """Delete every event of a person: attributed ones and still-pending ones by identity."""
    conds = [events.c.profile_id.in_(list(profile_ids))]
    if user_ids:
        conds.append(events.c.user_id.in_(list(user_ids)))
    if anonymous_ids:
        conds.append(events.c.anonymous_id.in_(list(anonymous_ids)))
    result = conn.execute(delete(events).where(events.c.workspace_id == workspace_id, or_(*conds)))
    return result.rowcount


_TYPES = {t.value: t for t in CallType}


def to_stored(row: Sequence[Any]) -> StoredEvent:
    """An event from a row of ``events`` read whole, in table order: a SQLAlchemy row of
    ``select(events)``, or a tuple of :func:`pending`'s driver-level read (its values
    processed by their columns' types alike). By position: the pipeline makes one for
    every event it applies, and a ``Row``'s attribute access cost more than the read."""
    seq, ws, message_id, type_, event, user_id, anonymous_id, timestamp, received_at, payload, _, _, pid = row
    return StoredEvent(
        int(seq),
        ws,
        message_id,
        _TYPES[type_],
        event,
        user_id,
        anonymous_id,
        timestamp,
        received_at,
        dict(payload),
        pid,
    )


def named_for_profile(
    conn: Connection, profile_id: str, names: Sequence[str], since: datetime | None, limit: int
) -> list[Any]:
    stmt = select(events).where(events.c.profile_id == profile_id, events.c.event.in_(list(names)))
    if since is not None:
        stmt = stmt.where(events.c.timestamp >= since)
    return list(conn.execute(stmt.order_by(events.c.timestamp.desc(), events.c.seq.desc()).limit(limit)))


def for_workspace(conn: Connection, workspace_id: str, limit: int) -> list[Any]:
    return list(
        conn.execute(
            select(events)
            .where(events.c.workspace_id == workspace_id, events.c.profile_id.is_not(None))
            .order_by(events.c.timestamp, events.c.seq)
            .limit(limit)
        )
    )
