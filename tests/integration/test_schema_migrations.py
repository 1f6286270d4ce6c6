"""The schema the migrations make is the one the code declares (every table, column,
index and partial index predicate), on SQLite and PostgreSQL: alembic's own comparison
of the migrated database with the tables' metadata finds nothing."""

from __future__ import annotations

import importlib
import pkgutil

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import whenthen
from whenthen.storage import Database
from whenthen.storage.metadata import metadata


def test_the_migrated_schema_is_the_declared_one(db: Database) -> None:
    for module in pkgutil.walk_packages(whenthen.__path__, "whenthen."):
        if module.name.endswith(".tables"):
            importlib.import_module(module.name)
    assert {"workspaces", "profiles", "events", "enrollments", "outbox", "segment_members"} <= set(
        metadata.tables
    )
    with db.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []
