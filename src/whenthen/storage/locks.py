"""Transaction-scoped locks that order work across processes on PostgreSQL.

SQLite needs none: one writer at a time holds the whole database (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

#: Erasure against the pipeline (any 64-bit constant unique to this purpose).
_ERASURE = 0x77686E_65726173  # "whn" "eras"


def pipeline_batch(conn: Connection) -> None:
    """Taken (shared) by every pipeline batch before it applies events: batches never wait
    for each other, and an erasure waits for the batches in flight to commit."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": _ERASURE})


def erasure(conn: Connection) -> None:
    """Taken (exclusive) by an erasure before it reads the person: it waits for the pipeline
    batches in flight, and the batches after it see its keyed hashes and suppress the
    person's events. Without it, a batch that checked the hashes before the erasure
    committed could recreate the person from an event it had already read."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ERASURE})
