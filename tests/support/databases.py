"""Creating and dropping real test databases."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import psycopg
from psycopg import sql

from whenthen.storage import Database
from whenthen.storage.migrate import upgrade

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def sqlite_template(folder: Path) -> Path:
    """Migrate one SQLite file; tests copy it instead of migrating again."""
    path = folder / "template.db"
    db = Database(f"sqlite:///{path}", sqlite_synchronous="NORMAL")
    upgrade(db)
    with db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.dispose()
    return path


class PostgresServer:
    """A reachable PostgreSQL: migrates a template database once, then clones it per test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dsn = url.replace("postgresql+psycopg://", "postgresql://")
        self.prefix = f"wt_test_{secrets.token_hex(4)}"
        self.template = f"{self.prefix}_template"
        self.created: list[str] = []
        self.free: list[str] = []
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        db = Database(self._url_for(self.template))
        upgrade(db)
        db.dispose()

    def _admin(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement)

    def _url_for(self, name: str) -> str:
        base, _, _ = self.url.rpartition("/")
        return f"{base}/{name}"

    def create_database(self) -> str:
        """A migrated, empty database: a used one emptied again, else a fresh clone."""
        if self.free:
            return self._url_for(self.free.pop())
        name = f"{self.prefix}_{secrets.token_hex(4)}"
        self._admin(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
        )
        self.created.append(name)
        return self._url_for(name)

    def release_database(self, url: str) -> None:
        """Empty every table (the schema stays, as the migrations made it) for the next test.

        TRUNCATE of a few dozen small tables takes milliseconds; cloning a database takes
        half a second."""
        name = url.rpartition("/")[2]
        dsn = self.dsn.rpartition("/")[0] + "/" + name
        with psycopg.connect(dsn, autocommit=True) as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables"
                    " WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                )
            ]
            if tables:
                conn.execute(
                    sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                        sql.SQL(", ").join(sql.Identifier(t) for t in tables)
                    )
                )
        self.free.append(name)

    def drop_database(self, url: str) -> None:
        name = url.rpartition("/")[2]
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in [*self.created, self.template]:
            self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self.created.clear()


def postgres_server() -> PostgresServer | None:
    url = os.environ.get("WHENTHEN_TEST_POSTGRES_URL", DEFAULT_PG)
    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3):
            pass
    except psycopg.OperationalError:
        return None
    return PostgresServer(url)
