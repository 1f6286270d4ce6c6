"""The journal's chains (ADR 0018): each enrollment's journal, walked back from its
``journal_tail`` along ``prev_id``, is exactly its rows."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select

from whenthen.journeys import repository as repo
from whenthen.journeys.tables import enrollment_journal, enrollments
from whenthen.storage import Database


def assert_chains_whole(db: Database) -> int:
    """Every enrollment's chain is its rows (by a scan), and no row belongs to no chain.
    Returns how many rows were checked."""
    with db.read() as conn:
        rows: dict[str, list[int]] = defaultdict(list)
        for jid, eid in conn.execute(
            select(enrollment_journal.c.id, enrollment_journal.c.enrollment_id).order_by(
                enrollment_journal.c.id
            )
        ):
            rows[eid].append(jid)
        known = set(conn.execute(select(enrollments.c.id)).scalars())
        assert set(rows) <= known, f"journal rows of enrollments that do not exist: {set(rows) - known}"
        for eid in known:
            walked = [r.id for r in repo.journal_of(conn, eid)]
            # The chain's order is the journal's; ids from another engine's block may be
            # smaller for a later row (repository._IdBlocks), so the ids compare as sets.
            assert len(set(walked)) == len(walked), f"enrollment {eid}: chain {walked} repeats a row"
            assert sorted(walked) == rows.get(eid, []), (
                f"enrollment {eid}: chain {walked} != rows {rows.get(eid)}"
            )
    return sum(len(ids) for ids in rows.values())
