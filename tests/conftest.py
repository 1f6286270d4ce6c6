"""Shared fixtures: real databases (SQLite files and PostgreSQL), containers, HTTP clients.

Every test that takes ``db_url`` runs twice: on a fresh SQLite file and on a fresh
PostgreSQL database built by the migrations. PostgreSQL is found at
``WHENTHEN_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``).
With ``WHENTHEN_REQUIRE_POSTGRES=1`` (set by ``make test`` under CI) an unreachable
server fails the run instead of skipping, and so does a run in which no PostgreSQL
test executed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.databases import PostgresServer, postgres_server, sqlite_template
from whenthen.api.app import create_app
from whenthen.bootstrap import Container, build
from whenthen.kernel.clock import ManualClock
from whenthen.settings import Settings
from whenthen.storage import Database

REQUIRE_PG = os.environ.get("WHENTHEN_REQUIRE_POSTGRES") == "1"
_pg_tests_run = 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _pg_tests_run
    if report.when == "call" and report.passed and "[postgres" in report.nodeid:
        _pg_tests_run += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"postgres tests passed: {_pg_tests_run}")
    if REQUIRE_PG and _pg_tests_run == 0 and exitstatus == 0 and session.testscollected:
        if reporter is not None:
            reporter.write_line("FAILED: WHENTHEN_REQUIRE_POSTGRES=1 but no PostgreSQL test ran")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | None]:
    server = postgres_server()
    if server is None and REQUIRE_PG:
        pytest.fail("PostgreSQL is required (WHENTHEN_REQUIRE_POSTGRES=1) but did not answer")
    yield server
    if server is not None:
        server.drop_all()


@pytest.fixture(scope="session")
def sqlite_template_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sqlite_template(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template_path: Path) -> Iterator[str]:
    """A migrated, empty database of each kind, private to the test."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        shutil.copyfile(sqlite_template_path, path)
        yield f"sqlite:///{path}"
        return
    yield from _postgres_database(request)


@pytest.fixture(params=["postgres"])
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty PostgreSQL database, private to the test (PostgreSQL-only tests)."""
    yield from _postgres_database(request)


def _postgres_database(request: pytest.FixtureRequest) -> Iterator[str]:
    server: PostgresServer | None = request.getfixturevalue("pg_server")
    if server is None:
        pytest.skip("PostgreSQL not reachable (set WHENTHEN_TEST_POSTGRES_URL)")
    url = server.create_database()
    try:
        yield url
    finally:
        server.release_database(url)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A ``Database`` over ``db_url`` (no container), disposed after the test."""
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))


def make_settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "secret_key": "test-secret",
        "sqlite_synchronous": "NORMAL",
        "demo_workspace": False,
        **overrides,
    }
    return Settings(database_url=db_url, **values)


@pytest.fixture
def container(db_url: str, clock: ManualClock) -> Iterator[Container]:
    c = build(make_settings(db_url), clock=clock)
    yield c
    c.close()


@pytest.fixture
def client(container: Container) -> Iterator[TestClient]:
    """The app over HTTP (in process), without the background worker: tests drain the
    pipeline explicitly with ``container.worker.drain()``."""
    with TestClient(create_app(container, run_worker=False)) as tc:
        yield tc
