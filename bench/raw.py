"""The raw insert rate: the rows the API would write, straight into a fresh database.

Rows are made by the app's own code path: the bench's calls are parsed and validated by
``whenthen.tracking.service.prepare`` and shaped as ``service.append`` shapes them. A
pool of such rows is made before the clock starts; each timed transaction takes 100 of
them with a fresh ``message_id`` (a copy of the row dict, under a microsecond a row), so
every row is new and the unique index does real work. The payload is not copied: its
``messageId`` keeps the pool's value, which changes nothing the database does (the JSON
is as long, give or take a few bytes) and keeps work that is not the database's out of
the timed loop.

Variants, each into its own fresh database with the schema made by the migrations:

* ``append``: ``whenthen.tracking.repository.append`` (INSERT ... ON CONFLICT DO NOTHING,
  one executemany at the driver's level on SQLite, one statement over a JSON document on
  PostgreSQL) 100 rows at a time in ``Database.autocommit()``, the unit of work of the
  API's batch (on SQLite ``Database.write()``, on PostgreSQL the statement commits by
  itself): the app's statement and unit of work, minus HTTP, parsing and validation.
* ``insert``: a plain SQLAlchemy ``insert(events)`` executemany of the same rows as dicts
  (made before the clock starts) in ``Database.write()`` transactions of 100 rows.
* ``append xN`` (PostgreSQL): ``append`` from N threads at once, as the server's
  thread pool writes; SQLite takes one writer at a time, so threads cannot add there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, select

from bench.workload import Workload
from whenthen.kernel.clock import SystemClock
from whenthen.settings import Settings
from whenthen.storage import Database
from whenthen.storage.migrate import upgrade
from whenthen.tracking import repository, service
from whenthen.tracking.model import AcceptedEvent
from whenthen.tracking.tables import events
from whenthen.tracking.validation import Limits

Row = tuple[Any, ...]  # in repository.APPEND_COLUMNS order
Writer = Callable[[Connection, Sequence[Any]], object]


@dataclass(frozen=True)
class RawOutcome:
    name: str
    rows: int
    elapsed: float
    threads: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.elapsed if self.elapsed else 0.0


def _append(conn: Connection, rows: Sequence[Row]) -> object:
    return repository.append(conn, rows)


def _insert(conn: Connection, rows: Sequence[dict[str, Any]]) -> object:
    return conn.execute(insert(events), list(rows))


WRITERS: dict[str, Writer] = {"append": _append, "insert": _insert}


def row_of(workspace_id: str, ev: AcceptedEvent, partitions: int) -> Row:
    """The row ``whenthen.tracking.service.append`` builds for ``ev``."""
    return service.log_row(workspace_id, ev, service.partition_of(workspace_id, ev, partitions))


def row_pool(workspace_id: str, count: int, run: str, batch_size: int) -> list[Row]:
    """``count`` rows made from the bench's calls by the app's validation."""
    settings = Settings()
    s = settings.ingest
    limits = Limits(
        max_event_bytes=s.max_event_bytes,
        max_nesting_depth=s.max_nesting_depth,
        max_future=timedelta(seconds=s.max_future_seconds),
        min_year=s.min_timestamp_year,
    )
    clock = SystemClock()
    workload = Workload(run)
    rows: list[Row] = []
    while len(rows) < count:
        body = workload.batch_body(batch_size)
        value, exact = service.parse(body)
        prepared = service.prepare(
            body,
            value,
            exact,
            forced_type=None,
            received_at=clock.now(),
            limits=limits,
            max_batch_events=s.max_batch_events,
        )
        if prepared.rejected:
            raise RuntimeError(f"the app rejected bench calls: {prepared.rejected[:1]}")
        rows.extend(row_of(workspace_id, ev, settings.pipeline.partitions) for ev in prepared.accepted)
    columns = {c.name for c in events.columns} - {"seq", "profile_id"}
    if set(repository.APPEND_COLUMNS) != columns or len(rows[0]) != len(columns):
        raise RuntimeError(f"row shape {repository.APPEND_COLUMNS} differs from the events table {columns}")
    return rows


class _Renamer:
    """Hands out copies of the pool's rows with message ids never used before."""

    def __init__(self, pool: list[Row], tag: str, *, as_dicts: bool) -> None:
        self.pool = pool
        self.dicts = [dict(zip(repository.APPEND_COLUMNS, r, strict=True)) for r in pool] if as_dicts else []
        self.tag = tag
        self.n = 0

    def take(self, size: int) -> list[Any]:
        tag, n = self.tag, self.n
        self.n = n + size
        if self.dicts:
            dicts = self.dicts
            return [{**dicts[(n + i) % len(dicts)], "message_id": f"{tag}-{n + i}"} for i in range(size)]
        pool = self.pool
        return [(r[0], f"{tag}-{n + i}", *r[2:]) for i in range(size) for r in (pool[(n + i) % len(pool)],)]


def measure(
    url: str,
    *,
    synchronous: str,
    variant: str,
    pool: list[Row],
    seconds: float,
    rows_per_tx: int,
    threads: int = 1,
) -> RawOutcome:
    """Insert for ``seconds`` (wall clock) into the fresh database at ``url``."""
    db = Database(url, sqlite_synchronous=synchronous)
    try:
        upgrade(db)
        write = WRITERS[variant]
        unit = db.write if variant == "insert" else db.autocommit
        counts = [0] * threads
        start_gate = threading.Barrier(threads + 1)
        deadline = [0.0]

        def run(index: int) -> None:
            renamer = _Renamer(pool, f"raw{index}", as_dicts=variant == "insert")
            start_gate.wait()
            while time.perf_counter() < deadline[0]:
                rows = renamer.take(rows_per_tx)
                with unit() as conn:
                    write(conn, rows)
                counts[index] += len(rows)

        workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        start = time.perf_counter()
        deadline[0] = start + seconds
        start_gate.wait()
        for w in workers:
            w.join(seconds + 60)
        elapsed = time.perf_counter() - start
        with db.read() as conn:
            stored = int(conn.execute(select(func.count()).select_from(events)).scalar_one())
        if stored != sum(counts):
            raise RuntimeError(f"raw {variant}: counted {sum(counts)} rows, the table holds {stored}")
        name = variant if threads == 1 else f"{variant} x{threads}"
        return RawOutcome(name=name, rows=stored, elapsed=elapsed, threads=threads)
    finally:
        db.dispose()
