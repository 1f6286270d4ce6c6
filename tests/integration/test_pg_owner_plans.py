"""The pipeline's read-ahead of a batch's people (``profiles.repository.by_identities``)
finds each id through the identities' primary key on PostgreSQL, whatever the planner
knows: a fresh table without statistics, and the same table analysed. An earlier form
(``kind = ... AND value = ANY(...) OR ...``) scanned the workspace's every identity
when the planner had no statistics or took the table for small."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, insert

from tests.support.plans import relation_scans
from whenthen.profiles import repository as profile_repo
from whenthen.profiles.tables import identities, profiles
from whenthen.storage import Database
from whenthen.storage.id_lists import ArrayLiteral

NOW = datetime(2026, 12, 7, 8, tzinfo=UTC)
PEOPLE = 3000
#: Values the array literal has to quote.
ODD = ['a"b', "c,d", "e\\f", "u\u00e9", "{x}", "sp ace", "NULL"]


@pytest.fixture
def pg(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    with db.write() as conn:
        conn.execute(
            insert(profiles),
            [
                {"id": f"prf_{i:05}", "workspace_id": "ws-1", "traits": {}, "trait_times": {},
                 "first_seen": NOW, "last_seen": NOW, "event_count": 0, "created_at": NOW,
                 "updated_at": NOW, "version": 1}
                for i in range(PEOPLE + len(ODD))
            ],
        )  # fmt: skip
        rows = [
            {"workspace_id": "ws-1", "kind": kind, "value": f"{prefix}{i}", "profile_id": f"prf_{i:05}",
             "created_at": NOW}
            for i in range(PEOPLE)
            for kind, prefix in (("user_id", "u"), ("anonymous_id", "a"))
        ]  # fmt: skip
        rows += [
            {"workspace_id": "ws-1", "kind": "user_id", "value": v, "profile_id": f"prf_{PEOPLE + i:05}",
             "created_at": NOW}
            for i, v in enumerate(ODD)
        ]  # fmt: skip
        conn.execute(insert(identities), rows)
    yield db
    db.dispose()


def _explain(conn: Connection, uids: list[str], aids: list[str]) -> dict[str, Any]:
    stmt = profile_repo._owners_read_postgresql()
    sql = stmt.compile(dialect=conn.dialect).string
    literal = ArrayLiteral().process_bind_param
    kinds = ["user_id"] * len(uids) + ["anonymous_id"] * len(aids)
    values = literal([*uids, *aids], conn.dialect)
    params = {"ws": "ws-1", "kinds": literal(kinds, conn.dialect), "values": values}
    [(doc,)] = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).all()
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


@pytest.mark.parametrize("analysed", [False, True])
def test_each_id_is_found_through_the_primary_key(pg: Database, analysed: bool) -> None:
    if analysed:
        with pg.write() as conn:
            conn.exec_driver_sql("ANALYZE identities")
            conn.exec_driver_sql("ANALYZE profiles")
    uids = [f"u{i}" for i in range(0, PEOPLE, 37)] + ["nobody"]
    aids = [f"a{i}" for i in range(5, PEOPLE, 101)] + ["u1"]  # "u1" is a user id, not an anonymous one
    with pg.write() as conn:
        plan = _explain(conn, uids, aids)
        owners = profile_repo.by_identities(conn, "ws-1", [*uids, *ODD], aids)
    scans = list(relation_scans(plan, {"identities"}))
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), scan
        assert "value" in scan["Index Cond"], scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
        # One probe per id asked for, each finding at most its one row.
        assert scan["Actual Loops"] == len(uids) + len(aids), scan
    expected = {("user_id", u): f"prf_{int(u[1:]):05}" for u in uids if u != "nobody"}
    expected |= {("anonymous_id", a): f"prf_{int(a[1:]):05}" for a in aids if a != "u1"}
    expected |= {("user_id", v): f"prf_{PEOPLE + i:05}" for i, v in enumerate(ODD)}
    assert {key: p.id for key, p in owners.items()} == expected
