"""Filters on values: the operators shared by journeys, segments and scoring. Pure.

Semantics (docs/design/journeys.md): missing values only satisfy ``not_exists``, ``ne``
and ``not_in``; string equality ignores case; numbers compare as numbers; ordered
comparisons of ISO 8601 strings compare as strings (which orders dates correctly).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Op(enum.StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    STARTS_WITH = "starts_with"
    EXISTS = "exists"
    NOT_EXISTS = "not_exists"


class Filter(BaseModel):
    """A test on one value: a property of an event (``cart_id`` or ``properties.cart_id``,
    ``context.page.url``) or a trait of the profile (``address.city``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1, max_length=200)
    op: Op = Op.EQ
    value: Any = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> Filter:
        if self.op in (Op.IN, Op.NOT_IN) and not isinstance(self.value, list):
            raise ValueError(f"op {self.op.value} needs a list value")
        if self.op not in (Op.EXISTS, Op.NOT_EXISTS) and self.value is None and self.op not in (Op.EQ, Op.NE):
            raise ValueError(f"op {self.op.value} needs a value")
        return self


MISSING = object()


def lookup_path(doc: Mapping[str, Any], path: str) -> Any:
    """Follow a dotted path; ``MISSING`` when any step is absent."""
    current: Any = doc
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return MISSING
    return current


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None and not isinstance(a, str) and not isinstance(b, str):
        return na == nb
    return isinstance(a, str) and isinstance(b, str) and a.casefold() == b.casefold()


def compare(actual: Any, op: Op, expected: Any) -> bool:
    """Apply one operator. Missing values only satisfy ``not_exists``, ``ne`` and ``not_in``.

    Equality of strings ignores case; numbers compare as numbers; ordered comparisons of
    ISO 8601 strings compare as strings (which orders dates correctly)."""
    if op is Op.EXISTS:
        return actual is not MISSING and actual is not None
    if op is Op.NOT_EXISTS:
        return actual is MISSING or actual is None
    if actual is MISSING:
        return op in (Op.NE, Op.NOT_IN)
    if op is Op.EQ:
        return _same(actual, expected)
    if op is Op.NE:
        return not _same(actual, expected)
    if op is Op.IN:
        return any(_same(actual, e) for e in expected)
    if op is Op.NOT_IN:
        return not any(_same(actual, e) for e in expected)
    if op is Op.CONTAINS:
        if isinstance(actual, str) and isinstance(expected, str):
            return expected.casefold() in actual.casefold()
        if isinstance(actual, list):
            return any(_same(a, expected) for a in actual)
        return False
    if op is Op.STARTS_WITH:
        return (
            isinstance(actual, str)
            and isinstance(expected, str)
            and actual.casefold().startswith(expected.casefold())
        )
    na, nb = _number(actual), _number(expected)
    if na is not None and nb is not None:
        a_cmp: Any = na
        b_cmp: Any = nb
    elif isinstance(actual, str) and isinstance(expected, str):
        a_cmp, b_cmp = actual, expected
    else:
        return False
    if op is Op.GT:
        return bool(a_cmp > b_cmp)
    if op is Op.GTE:
        return bool(a_cmp >= b_cmp)
    if op is Op.LT:
        return bool(a_cmp < b_cmp)
    return bool(a_cmp <= b_cmp)
