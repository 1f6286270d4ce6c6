"""The message log and the outbox: what journeys decided to send, queued in the same
transaction as the decision, performed after the commit by the dispatcher. Never commits."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Integer,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from whenthen.messaging.tables import messages, outbox
from whenthen.storage.driver import (
    DriverQuery,
    StoredValues,
    execute_each,
    json_dumps,
    statements,
    write_by_key,
    write_rows,
)
from whenthen.storage.id_lists import by_ids, per_dialect
from whenthen.storage.plans import by_key_probes, in_index_order

# Statements run for every message and job are built once, with bind parameters: building
# ``insert().values(**row)`` per call cost several times the statement (docs/benchmarks.md).
# RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
_INSERT_MESSAGE = {
    name: d.insert(messages).on_conflict_do_nothing(index_elements=["idempotency_key"])
    for name, d in (("postgresql", postgresql), ("sqlite", sqlite))
}
_INSERT_MESSAGE_RETURNING = {name: stmt.returning(messages.c.id) for name, stmt in _INSERT_MESSAGE.items()}
_INSERT_OUTBOX = insert(outbox)
_EXISTING_KEYS = select(messages.c.idempotency_key).where(
    messages.c.idempotency_key.in_(bindparam("b_keys", expanding=True))
)
_MESSAGE = select(messages).where(messages.c.id == bindparam("b_id"))
#: What the dispatcher and its handlers read of a job (id, workspace, kind, payload, attempts): its times
#: stay unread (three conversions a job, in every claim).
_READY = (
    select(outbox.c.id, outbox.c.workspace_id, outbox.c.kind, outbox.c.payload, outbox.c.attempts)
    .where(outbox.c.done_at.is_(None), outbox.c.available_at <= bindparam("b_now"))
    .order_by(outbox.c.available_at, outbox.c.id)
    .limit(bindparam("b_limit", type_=Integer))
)
#: PostgreSQL: the first ready jobs locked and hidden for their lease in one statement,
#: each returned with the attempts it had before and the time it was ready at (the
#: claim's order: an UPDATE's RETURNING has none of its own).
_PICKED = (
    select(outbox.c.id, outbox.c.available_at)
    .where(outbox.c.done_at.is_(None), outbox.c.available_at <= bindparam("b_now"))
    .order_by(outbox.c.available_at, outbox.c.id)
    .limit(bindparam("b_limit", type_=Integer))
    .with_for_update(skip_locked=True)
    .cte("picked")
)
_CLAIM_POSTGRESQL = (
    update(outbox)
    .where(outbox.c.id == _PICKED.c.id)
    .values(available_at=bindparam("b_until"), attempts=outbox.c.attempts + 1)
    .returning(
        outbox.c.id,
        outbox.c.workspace_id,
        outbox.c.kind,
        outbox.c.payload,
        (outbox.c.attempts - 1).label("attempts"),
        _PICKED.c.available_at.label("ready_at"),
    )
)
#: Each claimed job hidden for its lease, by key (an executemany: an expanding ``IN`` was
#: rendered anew for every claim).
_HIDE_SQL = statements("UPDATE outbox SET available_at = %s, attempts = attempts + 1 WHERE id = %s")
_FINISH = (
    update(outbox)
    .where(outbox.c.id == bindparam("b_id"))
    .values(done_at=bindparam("b_done"), last_error=bindparam("b_error"))
)
_RETRY = (
    update(outbox)
    .where(outbox.c.id == bindparam("b_id"))
    .values(available_at=bindparam("b_at"), last_error=bindparam("b_error"))
)
#: ``UPDATE messages SET <the parameters' keys> WHERE id = :b_id``.
_RECORD = update(messages).where(messages.c.id == bindparam("b_id"))


def _insert_message(conn: Connection, row: dict[str, Any]) -> bool:
    result = conn.execute(_INSERT_MESSAGE_RETURNING[conn.dialect.name], row)
    return result.first() is not None


@dataclass(frozen=True, slots=True)
class Queued:
    """One message (email or webhook call) to queue with :func:`enqueue` or :func:`enqueue_many`."""

    ws: str
    channel: str
    message_id: str
    idempotency_key: str
    profile_id: str
    journey_id: str | None
    enrollment_id: str | None
    node: str | None
    payload: Mapping[str, Any]


def _message_values(q: Queued, created: Any, no_links: Any) -> tuple[Any, ...]:
    """A queued message's row in ``_MESSAGE_KEYS`` order; ``created`` and ``no_links`` as
    the writer binds them (Python values for SQLAlchemy, stored forms at the driver)."""
    return (
        q.message_id,
        q.ws,
        q.profile_id,
        q.journey_id,
        q.enrollment_id,
        q.node,
        q.channel,
        q.idempotency_key,
        "queued",
        no_links,
        0,
        created,
    )


def _job_values(q: Queued, created: Any, dumps: Callable[[Any], Any]) -> tuple[Any, ...]:
    """Its outbox job's row in ``_JOB_KEYS`` order (``dumps`` writes the payload)."""
    return (q.ws, q.channel, dumps(_job_payload(q)), created, 0, created)


def _job_payload(q: Queued) -> dict[str, Any]:
    """What its outbox job carries: the message's id and the effect's payload."""
    return {"message_id": q.message_id, **q.payload}


def _same(value: Any) -> Any:
    return value


def enqueue(conn: Connection, q: Queued, now: datetime) -> bool:
    """Queue one message. Returns False when a message with its idempotency key exists
    already: it is never queued twice."""
    created = _insert_message(conn, dict(zip(_MESSAGE_KEYS, _message_values(q, now, []), strict=True)))
    if created:
        conn.execute(_INSERT_OUTBOX, dict(zip(_JOB_KEYS, _job_values(q, now, _same), strict=True)))
    return created


def enqueue_many(conn: Connection, items: Sequence[Queued], now: datetime) -> int:
    """Queue many messages in bulk; a message whose idempotency key exists already is
    skipped, as in :func:`enqueue`. Returns how many were queued.

    At the driver's level (storage.driver): on the timer step's path this was the largest
    write left, 28 us a message on SQLite and 85 on PostgreSQL through SQLAlchemy.
    SQLite: the known keys looked up, then one executemany per table. PostgreSQL: one
    statement, whose message insert skips the known keys and hands the ids it stored to
    the outbox insert (a look-up, two inserts and their round trips before).
    ``tests/integration/test_enqueue_many.py`` compares the stored rows with
    ``enqueue``'s (SQLAlchemy's statements).

    The caller must hold what makes the keys its own (the enrollments' rows, locked or
    written in this transaction), so no other transaction can insert one of these keys
    between the look-up and the insert; the insert ignores conflicts all the same."""
    if not items:
        return 0
    pg = conn.dialect.name == "postgresql"
    existing = (
        set()
        if pg
        else {r[0] for r in conn.execute(_EXISTING_KEYS, {"b_keys": [q.idempotency_key for q in items]})}
    )
    fresh: dict[str, Queued] = {}
    for q in items:
        if q.idempotency_key not in existing:
            fresh.setdefault(q.idempotency_key, q)
    if not fresh:
        return 0
    stored = StoredValues(conn)
    at, dumps = stored.at, stored.dumps
    created = at(now)
    no_links = dumps([])
    if pg:
        rows = [(*_message_values(q, created, no_links), _job_payload(q)) for q in fresh.values()]
        return write_rows(conn, _ENQUEUE_POSTGRESQL, (*_MESSAGE_KEYS, "job_payload"), rows)
    write_rows(
        conn,
        _ENQUEUE_SQLITE[0],
        _MESSAGE_KEYS,
        [_message_values(q, created, no_links) for q in fresh.values()],
    )
    write_rows(conn, _ENQUEUE_SQLITE[1], _JOB_KEYS, [_job_values(q, created, dumps) for q in fresh.values()])
    return len(fresh)


_MESSAGE_KEYS = (
    "id",
    "workspace_id",
    "profile_id",
    "journey_id",
    "enrollment_id",
    "node",
    "channel",
    "idempotency_key",
    "status",
    "links",
    "attempts",
    "created_at",
)
_JOB_KEYS = ("workspace_id", "kind", "payload", "available_at", "attempts", "created_at")
#: SQLite: (message insert, outbox insert), written out.
_ENQUEUE_SQLITE = (
    "INSERT INTO messages (id, workspace_id, profile_id, journey_id, enrollment_id, node, channel,"
    " idempotency_key, status, links, attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (idempotency_key) DO NOTHING",
    "INSERT INTO outbox (workspace_id, kind, payload, available_at, attempts, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)",
)
#: PostgreSQL: the batch as one JSON document; the messages whose key is new are stored
#: and their jobs inserted in the rows' order (the order the dispatcher takes jobs in).
#: ``rowcount`` is the jobs inserted.
_ENQUEUE_POSTGRESQL = (
    "WITH v AS MATERIALIZED (SELECT * FROM ROWS FROM (jsonb_to_recordset(%s::jsonb) AS (id text,"
    " workspace_id text, profile_id text, journey_id text, enrollment_id text, node text,"
    " channel text, idempotency_key text, status text, links jsonb, attempts int,"
    " created_at timestamptz, job_payload jsonb)) WITH ORDINALITY AS v(id, workspace_id,"
    " profile_id, journey_id, enrollment_id, node, channel, idempotency_key, status, links,"
    " attempts, created_at, job_payload, n)),"
    " stored AS (INSERT INTO messages (id, workspace_id, profile_id, journey_id, enrollment_id,"
    " node, channel, idempotency_key, status, links, attempts, created_at)"
    " SELECT id, workspace_id, profile_id, journey_id, enrollment_id, node, channel,"
    " idempotency_key, status, links, attempts, created_at FROM v"
    " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id)"
    " INSERT INTO outbox (workspace_id, kind, payload, available_at, attempts, created_at)"
    " SELECT v.workspace_id, v.channel, v.job_payload, v.created_at, 0, v.created_at"
    " FROM v JOIN stored ON stored.id = v.id ORDER BY v.n"
)


def enqueue_job(conn: Connection, ws: str, kind: str, payload: Mapping[str, Any], now: datetime) -> int:
    """Queue a non-message job (e.g. a signal fan-out) for the dispatcher."""
    result = conn.execute(
        insert(outbox)
        .values(
            workspace_id=ws, kind=kind, payload=dict(payload), available_at=now, attempts=0, created_at=now
        )
        .returning(outbox.c.id)
    )
    return int(result.scalar_one())


def claim(conn: Connection, now: datetime, *, limit: int, lease: timedelta) -> list[Any]:
    """Take up to ``limit`` ready jobs and hide them for ``lease`` while they run.

    A job whose worker dies is retried when the lease ends (at-least-once).

    The first ready jobs are read in ``ix_outbox_ready``'s order and the read stops at
    ``limit``, whatever the backlog (``in_index_order``): a PostgreSQL planner that takes
    the outbox for small (no statistics yet, or from before a big send queued its jobs)
    otherwise reads and sorts every ready job, 110 ms a claim at 200,000 of them.

    PostgreSQL reads, locks and hides them in one statement, each hidden job found again
    by its key (``by_key_probes``); a hide per job (an executemany) cost 10-24 us of the
    server and more of the process per email (ADR 0021)."""
    if conn.dialect.name == "postgresql":
        params = {"b_now": now, "b_limit": limit, "b_until": now + lease}
        with in_index_order(conn), by_key_probes(conn):
            claimed = list(conn.execute(_CLAIM_POSTGRESQL, params))
        claimed.sort(key=_claim_order)
        return claimed
    with in_index_order(conn):
        rows = list(conn.execute(_READY, {"b_now": now, "b_limit": limit}))
    if rows:
        until = StoredValues(conn).at(now + lease)
        execute_each(conn, _HIDE_SQL, [(until, r.id) for r in rows])
    return rows


def _claim_order(row: Any) -> tuple[Any, int]:
    return (row.ready_at, row.id)


def finish_job(conn: Connection, job_id: int, now: datetime) -> None:
    conn.execute(_FINISH, {"b_id": job_id, "b_done": now, "b_error": None})


def retry_job(conn: Connection, job_id: int, at: datetime, error: str) -> None:
    conn.execute(_RETRY, {"b_id": job_id, "b_at": at, "b_error": error[:2000]})


def fail_job(conn: Connection, job_id: int, now: datetime, error: str) -> None:
    conn.execute(_FINISH, {"b_id": job_id, "b_done": now, "b_error": error[:2000]})


def close_jobs(
    conn: Connection,
    finished: Sequence[tuple[int, datetime, str | None]],
    retried: Sequence[tuple[int, datetime, str]],
    removed: Sequence[int] = (),
) -> None:
    """Record the outcome of many jobs: ``finished`` (id, done at, error or None: done or
    failed for good), ``retried`` (id, when to run again, error) and ``removed`` (ids of
    jobs done whose row goes: a message's job once its message is recorded, the message
    row being the log; ADR 0023), an executemany each at the driver's level on SQLite,
    one statement each on PostgreSQL (see :func:`record_many`)."""
    at = StoredValues(conn).at
    pg = conn.dialect.name == "postgresql"
    if removed:
        if pg:
            write_by_key(conn, _REMOVE_POSTGRESQL, ("id",), [(i,) for i in removed])
        else:
            execute_each(conn, _REMOVE_SQL, [(i,) for i in removed])
    if finished:
        rows = [(at(when), None if e is None else e[:2000], i) for i, when, e in finished]
        if pg:
            write_by_key(conn, _FINISH_POSTGRESQL, ("done_at", "last_error", "id"), rows)
        else:
            execute_each(conn, _FINISH_SQL, rows)
    if retried:
        rows = [(at(when), e[:2000], i) for i, when, e in retried]
        if pg:
            write_by_key(conn, _RETRY_POSTGRESQL, ("available_at", "last_error", "id"), rows)
        else:
            execute_each(conn, _RETRY_SQL, rows)


_FINISH_SQL = statements("UPDATE outbox SET done_at = %s, last_error = %s WHERE id = %s")
_RETRY_SQL = statements("UPDATE outbox SET available_at = %s, last_error = %s WHERE id = %s")
_REMOVE_SQL = statements("DELETE FROM outbox WHERE id = %s")
#: PostgreSQL: the same for a batch, from one JSON document (``write_by_key``).
_REMOVE_POSTGRESQL = (
    "DELETE FROM outbox AS o USING jsonb_to_recordset(%s::jsonb) AS v(id bigint) WHERE o.id = v.id"
)
_FINISH_POSTGRESQL = (
    "UPDATE outbox AS o SET done_at = v.done_at, last_error = v.last_error"
    " FROM jsonb_to_recordset(%s::jsonb) AS v(done_at timestamptz, last_error text, id bigint)"
    " WHERE o.id = v.id"
)
_RETRY_POSTGRESQL = (
    "UPDATE outbox AS o SET available_at = v.available_at, last_error = v.last_error"
    " FROM jsonb_to_recordset(%s::jsonb) AS v(available_at timestamptz, last_error text, id bigint)"
    " WHERE o.id = v.id"
)


def replace_payload(conn: Connection, job_id: int, payload: Mapping[str, Any], at: datetime) -> None:
    conn.execute(update(outbox).where(outbox.c.id == job_id).values(payload=dict(payload), available_at=at))


#: Message states that still wait to be sent (the email may be at the SMTP server right
#: now); any other was recorded by a run that ended.
STILL_TO_SEND = ("queued", "retrying")


def message(conn: Connection, message_id: str) -> Any:
    return conn.execute(_MESSAGE, {"b_id": message_id}).first()


class MessageHead(NamedTuple):
    """What the dispatcher reads of a message before sending it: whose it is and whether
    it still waits to be sent."""

    id: str
    workspace_id: str
    profile_id: str
    status: str


def heads_by_id(conn: Connection, message_ids: Sequence[str]) -> dict[str, MessageHead]:
    """The heads of these messages (those that exist), by id: one prebuilt statement at
    the driver's level with the ids as one list parameter. The dispatcher reads them for
    every batch; the whole rows (JSON context, times) cost more to decode than the read."""
    if not message_ids:
        return {}
    rows = _HEADS[conn.dialect.name].all(conn, {"ids": list(message_ids)})
    return {r[0]: MessageHead(*r) for r in rows}


#: By id (``by_ids``: on PostgreSQL one probe of the primary key per id, ADR 0019). With
#: ``id = ANY(:ids)`` a planner that took the table for small (no statistics yet, or from
#: before a big send queued its messages) scanned every message against every id, 280 ms
#: a batch of 200 at 10,000 messages (``test_pg_message_heads_plan.py``).
_HEADS = per_dialect(
    lambda d: DriverQuery(
        by_ids(
            d,
            messages,
            "id",
            "ids",
            [messages.c.id, messages.c.workspace_id, messages.c.profile_id, messages.c.status],
        )
    )
)


def record(conn: Connection, message_id: str, **values: Any) -> None:
    conn.execute(_RECORD, {"b_id": message_id, **values})


def record_many(conn: Connection, records: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Many :func:`record` calls: one executemany per set of columns written, at the
    driver's level (``storage.driver.execute_each``). The dispatcher closes every batch
    with it; through SQLAlchemy each value went through its bind processor.
    ``tests/integration/test_record_many.py`` checks the rows against :func:`record`'s."""
    groups: dict[tuple[str, ...], list[tuple[str, Mapping[str, Any]]]] = {}
    for message_id, values in records:
        groups.setdefault(tuple(sorted(values)), []).append((message_id, values))
    if not groups:
        return
    pg = conn.dialect.name == "postgresql"
    stored = StoredValues(conn)
    # On PostgreSQL JSON stays nested in the batch's document (``write_by_key``).
    at, dumps = stored.at, (stored.dumps if pg else json_dumps(conn))
    for keys, group in groups.items():
        if not all(k in _RECORD_KINDS for k in keys) or (
            # SQLAlchemy stores a JSON column's None as JSON null, where a NULL parameter
            # would be SQL NULL: such (rare) records go through SQLAlchemy.
            pg and any(v[k] is None for _, v in group for k in keys if _RECORD_KINDS[k] == "json")
        ):
            conn.execute(_RECORD, [{"b_id": m, **v} for m, v in group])
            continue
        kinds = [_RECORD_KINDS[k] for k in keys]
        rows = [
            (*(_stored(kind, v[k], at, dumps) for kind, k in zip(kinds, keys, strict=True)), m)
            for m, v in group
        ]
        if pg:
            write_by_key(conn, _record_sql_postgresql(keys), (*keys, "id"), rows)
        else:
            execute_each(conn, _record_sql(keys), rows)


#: The columns a record may write, by the form their values are stored in.
_RECORD_KINDS = {
    "status": "text",
    "reason": "text",
    "recipient": "text",
    "subject": "text",
    "body_html": "text",
    "body_text": "text",
    "links": "json",
    "attempts": "int",
    "response": "json",
    "sent_at": "time",
}


def _stored(kind: str, value: Any, at: Callable[[Any], Any], dumps: Callable[[Any], Any]) -> Any:
    if kind == "json":
        return dumps(value)
    return at(value) if kind == "time" else value


@functools.cache
def _record_sql(keys: tuple[str, ...]) -> dict[str, str]:
    # The names are _RECORD_KINDS' keys (record_many checks), never a caller's text.
    assert all(k in _RECORD_KINDS for k in keys)
    sets = ", ".join(f"{k} = %s::jsonb" if _RECORD_KINDS[k] == "json" else f"{k} = %s" for k in keys)
    return statements(f"UPDATE messages SET {sets} WHERE id = %s")  # noqa: S608


#: The PostgreSQL type each kind of recorded column is read from the batch's document as.
_RECORD_TYPES = {"text": "text", "json": "jsonb", "int": "int", "time": "timestamptz"}


@functools.cache
def _record_sql_postgresql(keys: tuple[str, ...]) -> str:
    """``record_many``'s statement for a batch on PostgreSQL: one ``UPDATE ... FROM`` the
    rows of one JSON document (``write_by_key``)."""
    assert all(k in _RECORD_KINDS for k in keys)
    sets = ", ".join(f"{k} = v.{k}" for k in keys)
    columns = ", ".join(f"{k} {_RECORD_TYPES[_RECORD_KINDS[k]]}" for k in keys)
    return (
        f"UPDATE messages AS m SET {sets}"  # noqa: S608
        f" FROM jsonb_to_recordset(%s::jsonb) AS v({columns}, id text) WHERE m.id = v.id"
    )


def log_for_profile(conn: Connection, ws: str, profile_ids: Sequence[str], limit: int) -> list[Any]:
    return list(
        conn.execute(
            select(messages)
            .where(messages.c.workspace_id == ws, messages.c.profile_id.in_(list(profile_ids)))
            .order_by(messages.c.created_at.desc(), messages.c.id)
            .limit(limit)
        )
    )


def log_for_journey(conn: Connection, ws: str, journey_id: str, limit: int) -> list[Any]:
    return list(
        conn.execute(
            select(messages)
            .where(messages.c.workspace_id == ws, messages.c.journey_id == journey_id)
            .order_by(messages.c.created_at.desc(), messages.c.id)
            .limit(limit)
        )
    )


def mailbox(conn: Connection, ws: str, limit: int) -> list[Any]:
    return list(
        conn.execute(
            select(messages)
            .where(
                messages.c.workspace_id == ws, messages.c.channel == "email", messages.c.status == "captured"
            )
            .order_by(messages.c.created_at.desc(), messages.c.id)
            .limit(limit)
        )
    )


def reassign_profile(conn: Connection, ws: str, from_id: str, into_id: str) -> None:
    conn.execute(
        update(messages)
        .where(messages.c.workspace_id == ws, messages.c.profile_id == from_id)
        .values(profile_id=into_id)
    )


def delete_for(conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
    conn.execute(
        delete(messages).where(messages.c.workspace_id == ws, messages.c.profile_id.in_(list(profile_ids)))
    )
