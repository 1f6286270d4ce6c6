"""Migration 0011 (ADR 0018): the journal written before it is chained, each enrollment's
tail set, and the index by enrollment dropped; the journal reads back as before. Both
databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command
from sqlalchemy import inspect, text

from tests.support.journal import assert_chains_whole
from whenthen.journeys import repository as repo
from whenthen.journeys.model import JournalEntry
from whenthen.storage import Database
from whenthen.storage.migrate import alembic_config, upgrade

AT = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def _note(db: Database, enrollment_id: str, profile_id: str, kind: str, at: datetime) -> None:
    """One journal entry for the enrollment, in a transaction of its own."""
    with db.write() as conn:
        repo.write_journal(
            conn,
            ws="ws",
            journey_id="jrn",
            enrollment_id=enrollment_id,
            profile_id=profile_id,
            entries=[JournalEntry(at=at, kind=kind, node=None, detail={})],
        )


def _downgrade(db: Database, revision: str) -> None:
    cfg = alembic_config(db)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_the_migration_chains_the_journal_written_before_it(db: Database) -> None:
    # The fixture's database is at head: back to 0010 (the downgrade puts the index back).
    _downgrade(db, "0010")
    with db.read() as conn:
        assert "ix_enrollment_journal_enrollment" in {
            ix["name"] for ix in inspect(conn).get_indexes("enrollment_journal")
        }
        assert "journal_tail" not in {c["name"] for c in inspect(conn).get_columns("enrollments")}
    # Three enrollments: two with interleaved journals, one with none.
    written = ["enr_a", "enr_b", "enr_a", "enr_a", "enr_b"]
    with db.write() as conn:
        for eid in ("enr_a", "enr_b", "enr_c"):
            conn.execute(
                text(
                    "INSERT INTO enrollments (id, workspace_id, journey_id, version, profile_id, status,"
                    " entered_at, steps, context, updated_at)"
                    " VALUES (:id, 'ws', 'jrn', 1, :p, 'active', :at, 1, '{}', :at)"
                ),
                {"id": eid, "p": f"prf_{eid}", "at": AT},
            )
        for n, eid in enumerate(written):
            conn.execute(
                text(
                    "INSERT INTO enrollment_journal (workspace_id, journey_id, enrollment_id, profile_id,"
                    " at, kind, node, detail) VALUES ('ws', 'jrn', :e, :p, :at, :k, NULL, '{}')"
                ),
                {"e": eid, "p": f"prf_{eid}", "at": AT + timedelta(minutes=n), "k": f"step{n}"},
            )
    upgrade(db)
    with db.read() as conn:
        assert [r.kind for r in repo.journal_of(conn, "enr_a")] == ["step0", "step2", "step3"]
        assert [r.kind for r in repo.journal_of(conn, "enr_b")] == ["step1", "step4"]
        assert repo.journal_of(conn, "enr_c") == []
        ids = {r.kind: r.id for eid in ("enr_a", "enr_b") for r in repo.journal_of(conn, eid)}
        assert repo.journal_tails(conn, ["enr_a", "enr_b", "enr_c"]) == {
            "enr_a": ids["step3"],
            "enr_b": ids["step4"],
            "enr_c": None,
        }
        indexes = {ix["name"] for ix in inspect(conn).get_indexes("enrollment_journal")}
    assert "ix_enrollment_journal_enrollment" not in indexes
    assert assert_chains_whole(db) == len(written)
    # Rows written after the migration go on from each chain's tail.
    _note(db, "enr_b", "prf_enr_b", "later", AT + timedelta(hours=1))
    with db.read() as conn:
        assert [r.kind for r in repo.journal_of(conn, "enr_b")] == ["step1", "step4", "later"]
    assert assert_chains_whole(db) == len(written) + 1


def test_two_processes_writing_one_enrollment_keep_its_journal_in_written_order(pg_url: str) -> None:
    """PostgreSQL hands each engine its journal ids a block at a time: a row written later
    by the other engine may have a smaller id, and the journal still reads back in the
    order it was written (the chain's), every row once."""
    first, second = Database(pg_url), Database(pg_url)
    try:
        with first.write() as conn:
            conn.execute(
                text(
                    "INSERT INTO enrollments (id, workspace_id, journey_id, version, profile_id, status,"
                    " entered_at, steps, context, updated_at) VALUES ('enr_x', 'ws', 'jrn', 1, 'prf_x',"
                    " 'active', :at, 1, '{}', :at)"
                ),
                {"at": AT},
            )
        written = []
        for n, db in enumerate([first, second, first, second, second, first]):
            _note(db, "enr_x", "prf_x", f"step{n}", AT + timedelta(minutes=n))
            written.append(f"step{n}")
        with first.read() as conn:
            rows = repo.journal_of(conn, "enr_x")
        assert [r.kind for r in rows] == written
        ids = [r.id for r in rows]
        assert ids != sorted(ids)  # the two engines' blocks interleave
        assert assert_chains_whole(first) == len(written)
    finally:
        first.dispose()
        second.dispose()
