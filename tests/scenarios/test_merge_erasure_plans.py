"""A merge (an anonymous visitor identifies) and an erasure touch only the person's rows:
on SQLite, which has no statistics, every statement they send is planned as index
searches, never a scan of a table that grows with people or their history. A scan there
costs in proportion to the whole workspace on every merge the pipeline applies, under the
write lock (the journal's was 70 ms at 400,000 rows before it went through the person's
enrollments). Tables that hold configuration (a workspace's journeys, segments, models)
may be scanned. On PostgreSQL the planner chooses with statistics; the outcome is checked
on both databases."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.support.journey_env import JourneyEnv
from tests.support.plans import Statements, sqlite_plan
from whenthen import lists, profiles
from whenthen.api.app import create_app
from whenthen.journeys.tables import date_schedules, enrollment_journal, enrollments

#: Tables sized by configuration, not by people: scanning them is fine.
CONFIGURATION = {
    "workspaces",
    "api_keys",
    "journeys",
    "journey_versions",
    "segments",
    "scoring_models",
    "lifecycles",
    "tag_rules",
    "lists",
    "alembic_version",
    "pipeline_leases",  # a row per partition (64 by default)
}

WAIT = {
    "key": "welcome",
    "name": "Welcome",
    "trigger": {"kind": "event", "event": "Signed Up"},
    "entry": {"frequency": "once"},
    "start": "wait",
    "nodes": {
        "wait": {"kind": "delay", "duration": "2d", "next": "mail"},
        "mail": {"kind": "send_email", "email": {"subject": "Hello", "text": "Hello."}},
    },
}
BIRTHDAY = {
    "key": "birthday",
    "name": "Birthday",
    "trigger": {"kind": "date", "trait": "birthday", "annual": True, "at": "09:00"},
    "entry": {"frequency": "every_time"},
    "start": "mail",
    "nodes": {"mail": {"kind": "send_email", "email": {"subject": "Happy birthday", "text": "Hi."}}},
}
SEGMENT = {
    "name": "Signed up this week",
    "definition": {"condition": {"kind": "event", "event": "Signed Up", "within_last": "7d"}},
}


@pytest.fixture
def http(env: JourneyEnv) -> Iterator[TestClient]:
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as client:
        yield client


class Sent(Statements):
    """The reads and writes sent on the engine while active."""

    def __init__(self, env: JourneyEnv) -> None:
        super().__init__(env.c.db.engine)

    def _capture(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT\s.*\sSELECT\s)", statement, re.S | re.I):
            super()._capture(conn, cursor, statement, parameters, context, many)

    def scans(self, env: JourneyEnv) -> list[str]:
        """The plan steps that walk a people-sized table, with their statement: a scan of
        the table, a scan of a whole index (unless the index is partial, such as the
        pending events', or the statement takes the first rows of it), or a search by the
        workspace alone (every row of the workspace)."""
        found = []
        with env.c.db.read() as conn:
            partial = set(
                conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '% WHERE %'"
                ).scalars()
            )
            for statement, parameters in self.seen:
                for step in sqlite_plan(conn, statement, parameters):
                    m = re.match(r"(SCAN|SEARCH) (\w+)(?: USING (?:COVERING )?INDEX (\w+))?( \(.*\))?", step)
                    if m is None or m.group(2) in CONFIGURATION or m.group(2) == "json_each":
                        continue
                    kind, _table, index, terms = m.groups()
                    if " LIMIT " in statement and index is not None:
                        continue  # the first rows of an index (a queue's head, an existence test)
                    if kind == "SCAN" and index in partial:
                        continue
                    if kind == "SEARCH" and terms != " (workspace_id=?)":
                        continue
                    found.append(f"{step}: {' '.join(statement.split())[:160]}")
        return found


def test_a_merge_and_an_erasure_search_the_persons_rows_only(env: JourneyEnv, http: TestClient) -> None:
    env.publish(WAIT)
    env.publish(BIRTHDAY)
    assert http.put("/api/v1/segments/new", json=SEGMENT).status_code == 200
    for i in range(30):  # other people, so that a scan would have rows to read
        env.calls({"type": "identify", "userId": f"other-{i}", "traits": {"birthday": "1990-05-01"}})
        env.track(f"other-{i}", "Signed Up")
    model = {
        "key": "interest",
        "name": "Interest",
        "rules": [{"id": "signup", "event": "Signed Up", "points": 10}],
        "decay": {"half_life": "7d"},
    }
    assert http.put("/api/v1/scoring/models/interest", json=model).status_code == 200
    assert http.post("/api/v1/lists", json={"key": "vip"}).status_code == 201
    env.calls({"type": "track", "anonymousId": "visitor", "event": "Signed Up"})
    with env.c.db.read() as conn:
        visitor = profiles.lookup(conn, env.ws.id, anonymous_id="visitor").id
    # The visitor's list membership and tags follow them too (and are read on the merge).
    assert http.post("/api/v1/lists/vip/members", json={"profile_ids": [visitor]}).status_code == 200
    assert http.post(f"/api/v1/profiles/{visitor}/tags", json={"tags": ["early"]}).status_code == 200
    env.c.worker.drain()
    env.calls(
        {
            "type": "identify",
            "userId": "kim",
            "traits": {"email": "kim@example.com", "birthday": "1991-06-02"},
        }
    )

    with Sent(env) as merge:
        env.calls({"type": "identify", "userId": "kim", "anonymousId": "visitor"})
    kim = env.profile("kim").id
    with env.c.db.read() as conn:
        # The visitor's enrollment and journal moved with them to the survivor.
        owners = set(
            conn.execute(
                select(enrollment_journal.c.profile_id).where(enrollment_journal.c.profile_id == kim)
            ).scalars()
        )
        assert owners == {kim}
        assert conn.execute(select(enrollments.c.profile_id).where(enrollments.c.profile_id == kim)).all()
    with env.c.db.read() as conn:
        assert lists.lists_of(conn, env.ws.id, kim) == ["vip"]
        assert "early" in profiles.tags_of(conn, env.ws.id, kim)
    with Sent(env) as erasure:
        assert http.delete(f"/api/v1/profiles/{kim}").status_code == 200
    with env.c.db.read() as conn:
        for table in (enrollments, enrollment_journal, date_schedules):
            assert conn.execute(select(table).where(table.c.profile_id == kim)).all() == []
        others = conn.execute(select(enrollment_journal.c.profile_id).distinct()).scalars().all()
        assert len(others) == 30  # everyone else's journal is untouched
    assert merge.seen
    assert erasure.seen
    if env.c.db.dialect.value == "postgresql":
        return
    assert merge.scans(env) == []
    # Known and kept: an erasure deletes the person's events by profile *or* by their user
    # and anonymous ids (events still pending carry no profile yet, parked ones neither),
    # and the log has no index on those ids, so it walks the workspace's events once. An
    # erasure is rare; a merge, which must not walk anything, comes with many identifies.
    walks = erasure.scans(env)
    assert len(walks) == 1, walks
    assert walks[0].startswith("SEARCH events"), walks
    assert "DELETE FROM events" in walks[0], walks
