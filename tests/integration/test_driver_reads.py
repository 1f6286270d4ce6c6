"""``storage.driver.DriverQuery`` reads rows as SQLAlchemy's own execution of the same
statement reads them, whichever of the columns need converting (none, one, several), on
both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select

from whenthen.profiles.tables import profiles
from whenthen.storage import Database
from whenthen.storage.driver import DriverQuery
from whenthen.storage.id_lists import ids_in

NOW = datetime(2026, 12, 6, 12, 30, 15, 123456, tzinfo=UTC)

COLUMN_SETS = {
    "none converted": (
        profiles.c.id,
        profiles.c.workspace_id,
        profiles.c.merged_into,
        profiles.c.event_count,
    ),
    "one converted, in the middle": (profiles.c.id, profiles.c.created_at, profiles.c.merged_into),
    "one converted, last": (profiles.c.id, profiles.c.workspace_id, profiles.c.updated_at),
    "several converted": (profiles.c.traits, profiles.c.id, profiles.c.created_at, profiles.c.updated_at),
}


@pytest.mark.parametrize("columns", list(COLUMN_SETS), ids=list(COLUMN_SETS))
def test_driver_rows_equal_sqlalchemys(db: Database, columns: str) -> None:
    with db.write() as conn:
        conn.execute(
            insert(profiles),
            [
                {
                    "id": f"p{i}",
                    "workspace_id": "ws",
                    "traits": {"n": i, "name": f"person {i}", "nested": {"ok": i % 2 == 0}},
                    "trait_times": {},
                    "event_count": i,
                    "merged_into": "p0" if i == 3 else None,
                    "created_at": NOW - timedelta(days=i, microseconds=i),
                    "updated_at": NOW + timedelta(seconds=i),
                    "version": 1,
                }
                for i in range(6)
            ],
        )
    stmt = (
        select(*COLUMN_SETS[columns])
        .where(ids_in(db.engine.dialect.name, profiles.c.id, "ids"))
        .order_by(profiles.c.id)
    )
    wanted = ["p1", "p3", "p4", "missing"]
    with db.read() as conn:
        ours = DriverQuery(stmt).all(conn, {"ids": wanted})
        first = DriverQuery(stmt).first(conn, {"ids": wanted})
        theirs = [tuple(r) for r in conn.execute(stmt, {"ids": wanted})]
    assert len(theirs) == 3
    assert ours == theirs
    assert first == theirs[0]
    assert all(
        type(a) is type(b)
        for row, other in zip(ours, theirs, strict=True)
        for a, b in zip(row, other, strict=True)
    )
