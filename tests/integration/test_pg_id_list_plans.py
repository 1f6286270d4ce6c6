"""Reads by a list of profile ids (``storage.id_lists.by_ids``) find each id through an
index on PostgreSQL, one probe per id, whatever the planner knows: with no statistics
and with the tables analysed, at 10,000 people (a mid-sized workspace, where the
planner took ``profile_id = ANY(:ids)`` for a filter over the workspace's every row:
200-1,200 ms a statement for 300 ids, the pipeline's score read-ahead and the segment
views among them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection

from tests.support.plans import relation_scans
from whenthen.profiles import consent
from whenthen.profiles import repository as profile_repo
from whenthen.scoring import service as scoring_service
from whenthen.segments import membership, views
from whenthen.segments import service as segment_service
from whenthen.storage import Database
from whenthen.storage.id_lists import ArrayLiteral

PEOPLE = 10_000
IDS = [f"prf_{i:07}" for i in range(3, PEOPLE, 33)] + ["prf_missing"]


@pytest.fixture
def pg(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    with db.write() as conn:
        pid = "'prf_' || lpad(i::text, 7, '0')"
        rows = "FROM generate_series(0, %(n)s - 1) i"
        for sql in (
            "INSERT INTO profiles (id, workspace_id, traits, trait_times, first_seen, last_seen,"
            f" event_count, created_at, updated_at, version) SELECT {pid}, 'ws', '{{}}', '{{}}',"
            f" now(), now(), 0, now(), now(), 1 {rows}",
            "INSERT INTO identities (workspace_id, kind, value, profile_id, created_at)"
            f" SELECT 'ws', 'user_id', 'u' || i, {pid}, now() {rows}",
            "INSERT INTO profile_scores (workspace_id, profile_id, model_key, points, as_of, caps)"
            f" SELECT 'ws', {pid}, m, 1, now(), '{{}}' {rows}, (VALUES ('a'), ('b')) v(m)",
            "INSERT INTO list_members (workspace_id, list_key, profile_id, added_at, source)"
            f" SELECT 'ws', 'l' || (i %% 5), {pid}, now(), 'api' {rows}",
            "INSERT INTO profile_tags (workspace_id, profile_id, tag, added_at)"
            f" SELECT 'ws', {pid}, 't' || (i %% 4), now() {rows}",
            "INSERT INTO profile_stages (workspace_id, profile_id, stage, since)"
            f" SELECT 'ws', {pid}, 'lead', now() {rows}",
            "INSERT INTO segment_members (segment_id, profile_id, workspace_id, since)"
            f" SELECT s, {pid}, 'ws', now() {rows}, (VALUES ('seg_a'), ('seg_b')) v(s)",
            "INSERT INTO segment_timers (segment_id, profile_id, workspace_id, due_at)"
            f" SELECT 'seg_a', {pid}, 'ws', now() {rows}",
            "INSERT INTO consents (workspace_id, profile_id, channel, status, source, changed_at)"
            f" SELECT 'ws', {pid}, c, 'subscribed', 'api', now() {rows}, (VALUES ('email'), ('sms')) v(c)",
        ):
            conn.exec_driver_sql(sql, {"n": PEOPLE})
    yield db
    db.dispose()


#: (statement, its other parameters, the list parameter's name, the tables it reads by id)
READS: dict[str, tuple[Any, dict[str, Any], str, set[str]]] = {
    "score read-ahead": (
        scoring_service._ROWS_OF_MANY["postgresql"].stmt,
        {"ws": "ws"},
        "pids",
        {"profile_scores"},
    ),
    "views: lists, tags, scores, stage": (
        views._OTHERS[("postgresql", True, True, True, True)].stmt,
        {"ws": "ws"},
        "pids",
        {"profile_scores", "list_members", "profile_tags", "profile_stages"},
    ),
    "views: traits": (views._TRAITS["postgresql"].stmt, {}, "pids", {"profiles"}),
    "segment timers: the people": (segment_service._PROFILE_STATE["postgresql"], {}, "pids", {"profiles"}),
    "segment timers: the people, locked": (
        segment_service._PROFILE_STATE_LOCKED["postgresql"],
        {},
        "pids",
        {"profiles"},
    ),
    "pipeline: people no batch holds": (profile_repo._LOCK_FREE, {}, "ids", {"profiles"}),
    "pipeline: memberships and timers read ahead": (
        membership._STATES_OF_MANY["postgresql"].stmt,
        {"ws": "ws"},
        "pids",
        {"segment_members", "segment_timers"},
    ),
    "senders: targets": (profile_repo._SENDER_TARGETS["postgresql"].stmt, {}, "ids", {"profiles"}),
    "senders: survivors": (profile_repo._SENDER_SURVIVORS["postgresql"].stmt, {}, "ids", {"profiles"}),
    "senders: identities": (profile_repo._SENDER_IDS["postgresql"].stmt, {}, "ids", {"identities"}),
    "dispatcher: people": (
        profile_repo._PROFILES_OF_MANY["postgresql"].stmt,
        {"ws": "ws"},
        "ids",
        {"profiles"},
    ),
    "dispatcher: identities": (
        profile_repo._IDENTITIES_OF_MANY["postgresql"].stmt,
        {"ws": "ws"},
        "ids",
        {"identities"},
    ),
    "dispatcher: consents": (
        consent._STATUSES["postgresql"].stmt,
        {"ws": "ws", "channel": "email"},
        "ids",
        {"consents"},
    ),
}


def _explain(conn: Connection, stmt: Any, params: dict[str, Any]) -> dict[str, Any]:
    compiled = stmt.compile(dialect=conn.dialect)
    full = {**{k: v for k, v in compiled.params.items() if v is not None}, **params}
    [(doc,)] = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.string, full).all()
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


@pytest.mark.parametrize("analysed", [False, True])
@pytest.mark.parametrize("read", sorted(READS))
def test_each_id_is_one_index_probe(pg: Database, read: str, analysed: bool) -> None:
    stmt, params, name, tables = READS[read]
    if analysed:
        with pg.write() as conn:
            conn.exec_driver_sql("ANALYZE")
    with pg.write() as conn:  # a write: some of them lock
        plan = _explain(conn, stmt, {**params, name: ArrayLiteral().process_bind_param(IDS, conn.dialect)})
    scans = list(relation_scans(plan, tables))
    assert {s["Relation Name"] for s in scans} == tables, plan
    for scan in scans:
        # A bitmap scan under the probe is a probe too (its index scan per loop): the
        # planner picks it for the identities' (workspace, person) index at times.
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), scan
        if scan["Node Type"] == "Bitmap Heap Scan":
            [inner] = scan["Plans"]
            assert inner["Node Type"] == "Bitmap Index Scan", inner
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
        assert scan["Actual Loops"] == len(IDS), scan  # one probe per id asked for
