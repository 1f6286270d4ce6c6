"""``UTCDateTime`` on SQLite binds and reads through one function each way; both must give
exactly what SQLAlchemy's own chain (the decorator's methods around the dialect's
``DATETIME`` processors) gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite
from sqlalchemy.types import TypeDecorator

from whenthen.storage.metadata import UTCDateTime

DIALECT = sqlite.dialect()
#: The type as a SQLite engine uses it (its ``impl`` adapted to SQLite's ``DATETIME``).
_ADAPTED = UTCDateTime().dialect_impl(DIALECT)
assert isinstance(_ADAPTED, UTCDateTime)
TYPE: UTCDateTime = _ADAPTED


def _chain_bind(value: datetime | None) -> Any:
    processor: Any = TypeDecorator.bind_processor(TYPE, DIALECT)
    assert processor is not None
    return processor(value)


def _chain_read(stored: Any) -> Any:
    processor: Any = TypeDecorator.result_processor(TYPE, DIALECT, None)
    assert processor is not None
    return processor(stored)


FAST_BIND = TYPE.bind_processor(DIALECT)
FAST_READ = TYPE.result_processor(DIALECT, None)

offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(9998, 12, 30), timezones=st.just(UTC) | offsets
)


@given(moments)
def test_bind_and_read_agree_with_sqlalchemys_chain(value: datetime) -> None:
    stored = FAST_BIND(value)
    assert stored == _chain_bind(value)
    assert FAST_READ(stored) == _chain_read(stored) == value
    assert FAST_READ(stored).tzinfo is UTC


@pytest.mark.parametrize(
    "stored",
    [
        "2026-12-01 22:00:00.000000",
        "2026-12-01 22:00:00.123456",
        "2026-12-01 22:00:00",  # CURRENT_TIMESTAMP's form
        "2026-12-01",
        "0999-01-02 03:04:05.000006",
    ],
)
def test_stored_forms_read_as_sqlalchemy_reads_them(stored: str) -> None:
    assert FAST_READ(stored) == _chain_read(stored)


def test_none_and_bad_values() -> None:
    assert FAST_BIND(None) is None
    assert FAST_READ(None) is None
    with pytest.raises(ValueError, match="naive"):
        FAST_BIND(datetime(2026, 12, 1))
    with pytest.raises(TypeError):
        FAST_BIND("2026-12-01")
