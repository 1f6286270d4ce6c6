"""``storage.plans.in_index_order``: sorting off for the statements inside on PostgreSQL,
the server's setting again after; nothing sent on SQLite; an error inside surfaces as
itself, not as the failed transaction's next statement. ``by_key_probes`` likewise (hash
and merge joins off), nested uses sharing the outer one's settings."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tests.support.plans import Statements
from whenthen.storage import Database
from whenthen.storage.plans import by_key_probes, in_index_order


def test_sorting_is_off_inside_only(db: Database) -> None:
    with db.write() as conn, Statements(conn) as seen:
        with in_index_order(conn):
            inside = conn.execute(text("SELECT 1")).scalar_one()
            if db.engine.dialect.name == "postgresql":
                assert conn.exec_driver_sql("SHOW enable_sort").scalar() == "off"
        if db.engine.dialect.name == "postgresql":
            assert conn.exec_driver_sql("SHOW enable_sort").scalar() == "on"
    assert inside == 1
    settings = [q for q, _ in seen.seen if q.lstrip().upper().startswith("SET")]
    if db.engine.dialect.name == "sqlite":
        assert settings == []
    else:
        assert settings == ["SET LOCAL enable_sort = off", "SET LOCAL enable_sort TO DEFAULT"]


def test_an_error_inside_is_the_one_raised(db: Database) -> None:
    with pytest.raises(DBAPIError) as raised, db.write() as conn, in_index_order(conn):
        conn.execute(text("SELECT * FROM no_such_table")).all()
    message = str(raised.value.orig)
    assert "no_such_table" in message


def test_probes_nested_share_the_outer_settings(db: Database) -> None:
    with db.write() as conn, Statements(conn) as seen:
        with by_key_probes(conn):
            with by_key_probes(conn):
                if db.engine.dialect.name == "postgresql":
                    assert conn.exec_driver_sql("SHOW enable_hashjoin").scalar() == "off"
            if db.engine.dialect.name == "postgresql":
                # Still inside the outer one: the inner one reset nothing.
                assert conn.exec_driver_sql("SHOW enable_mergejoin").scalar() == "off"
        if db.engine.dialect.name == "postgresql":
            assert conn.exec_driver_sql("SHOW enable_hashjoin").scalar() == "on"
    settings = [q for q, _ in seen.seen if q.lstrip().upper().startswith("SET")]
    assert len(settings) == (0 if db.engine.dialect.name == "sqlite" else 2), settings


def test_probes_after_an_error_inside_start_afresh(db: Database) -> None:
    with pytest.raises(DBAPIError), db.write() as conn, by_key_probes(conn):
        conn.execute(text("SELECT * FROM no_such_table")).all()
    with db.write() as conn, Statements(conn) as seen, by_key_probes(conn):
        if db.engine.dialect.name == "postgresql":
            assert conn.exec_driver_sql("SHOW enable_hashjoin").scalar() == "off"
    settings = [q for q, _ in seen.seen if q.lstrip().upper().startswith("SET")]
    assert len(settings) == (0 if db.engine.dialect.name == "sqlite" else 2), settings
