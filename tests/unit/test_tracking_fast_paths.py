"""The ingest hot path's shortcuts give the answers of the plain code they replace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whenthen.tracking.validation import (
    _iso,
    _plain_encoding,
    plain_value_is_clean,
    value_is_clean,
)

# What orjson can hand over from a body without a NUL escape: no NUL, no lone surrogate,
# no non-finite float, integers within [-2**63, 2**64 - 1], floats of any finite size.
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e16, 9.2e18, 2.0**63, -(2.0**63), 1e19, 1.5e300, -2.5e-300, 1e-7]),
    _text,
    st.sampled_from(["e+", "1e+19", "{[{[", "]]}}", "\\u0000", '"', "\\"]),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(_text | st.sampled_from(["e+", "{", "["]), inner, max_size=4),
    ),
    max_leaves=24,
)


def _as_orjson_gives(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


@settings(max_examples=1500)
@given(st.dictionaries(_text, _values, max_size=5), st.integers(min_value=0, max_value=6))
def test_plain_checks_agree_with_the_walk(raw: dict[str, Any], limit: int) -> None:
    call = _as_orjson_gives(raw)
    expected = value_is_clean(call, 0, limit, exact=False)
    assert plain_value_is_clean(call, 0, limit) == expected
    encoded = _plain_encoding(call, limit)
    if expected:
        assert encoded == orjson.dumps(call)
    else:
        assert encoded is None


def _nest(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize(
    ("call", "clean"),
    [
        pytest.param({"n": 2**63 - 1}, True, id="int64-max"),
        pytest.param({"n": 2**63}, False, id="past-int64"),
        pytest.param({"n": 2**64 - 1}, False, id="uint64-max"),
        pytest.param({"n": 2**53 + 1}, True, id="past-53-bits"),
        pytest.param({"n": [1, {"m": -(2**63)}]}, True, id="int64-min-nested"),
        pytest.param({"f": 2.0**63}, False, id="float-2-63"),
        pytest.param({"f": -1e19}, False, id="float-minus-1e19"),
        pytest.param({"f": 9.2e18}, True, id="float-below-2-63"),
        pytest.param({"f": 1e16}, True, id="float-1e16"),
        pytest.param({"s": "e+ {[{[{[{[{[{[{[{[{[{[{[{[{[{[{[{[{[{["}, True, id="brackets-in-strings"),
        pytest.param({"d": _nest(32)}, False, id="past-the-limit"),
        pytest.param({"d": _nest(31)}, True, id="at-the-limit"),
        pytest.param({"d": _nest(300)}, False, id="past-orjson-writing"),
        pytest.param({"d": [[] for _ in range(40)]}, True, id="many-shallow-containers"),
    ],
)
def test_plain_encoding_cases(call: dict[str, Any], clean: bool) -> None:
    assert value_is_clean(call, 0, 32, exact=False) is clean
    assert (_plain_encoding(call, 32) is not None) is clean


@settings(max_examples=1000)
@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11))]),
)
def test_iso_is_isoformat_with_z(naive: datetime, tz: timezone) -> None:
    value = naive.replace(tzinfo=tz)
    assert _iso(value) == value.astimezone(UTC).isoformat().replace("+00:00", "Z")
