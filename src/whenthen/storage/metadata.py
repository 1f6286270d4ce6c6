"""The one MetaData every concept's ``tables.py`` registers into, and shared column types."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

#: JSON on SQLite, JSONB on PostgreSQL.
JsonDoc = JSON().with_variant(JSONB(), "postgresql")

#: An auto-incrementing 64-bit key that SQLite also treats as its rowid.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on every dialect.

    SQLite has no time zone type: values are stored as naive UTC and made aware on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use aware UTC datetimes")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    # On SQLite the decorator's chain (``process_bind_param``, then the dialect's
    # ``DATETIME`` processor formatting with a ``%`` dict; on reading, a regular expression
    # and then ``process_result_value``) is replaced by one function each way giving the
    # same values: every timestamp of every statement goes through them, and the chain
    # cost several times the work. ``tests/unit/test_utc_datetime.py`` checks both against
    # the chain.
    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        naive_utc = self.process_bind_param

        def process(value: datetime | None) -> str | None:
            """As SQLAlchemy's SQLite ``DATETIME`` stores it: naive UTC text with
            microseconds."""
            if value is not None and not isinstance(value, datetime):
                raise TypeError(
                    f"SQLite DateTime type only accepts Python datetime objects as input, not {value!r}"
                )
            stored = naive_utc(value, dialect)
            return None if stored is None else stored.isoformat(" ", "microseconds")

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        chain = super().result_processor(dialect, coltype)
        if dialect.name != "sqlite":
            return chain
        assert chain is not None

        def process(value: Any) -> datetime | None:
            if value is None:
                return None
            try:
                parsed = datetime.fromisoformat(value)
            except (TypeError, ValueError):
                return chain(value)  # whatever SQLAlchemy itself makes of it
            return self.process_result_value(parsed, dialect)

        return process
