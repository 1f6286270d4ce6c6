"""The fast value check agrees with the explaining one on every JSON-like value."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from whenthen.tracking.validation import (
    AmbiguousNumber,
    Invalid,
    NotRepresentable,
    check_value,
    value_is_clean,
)

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=8),
    st.sampled_from(["\x00", "a\ud800b", "ok"]),
    st.builds(NotRepresentable, st.sampled_from(["NaN", "Infinity"])),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=4) | st.sampled_from(["\x00k", "k\udc00"]), inner, max_size=4),
    ),
    max_leaves=20,
)


def slow_ok(value: Any, limit: int, exact: bool) -> bool:
    try:
        check_value(value, 0, limit, "$", exact=exact)
    except (Invalid, AmbiguousNumber):
        return False
    return True


@settings(max_examples=2000)
@given(values, st.integers(min_value=0, max_value=4), st.booleans())
def test_fast_and_explaining_checks_agree(value: Any, limit: int, exact: bool) -> None:
    fast = value_is_clean(value, 0, limit, exact=exact)
    if exact:
        assert fast == slow_ok(value, limit, exact)
    else:
        # Without exact parsing lone surrogates cannot occur (orjson refuses them), so the
        # fast walk does not look for them; everything else must agree.
        if fast is False:
            assert slow_ok(value, limit, exact) is False or _has_surrogate(value)
        else:
            assert slow_ok(value, limit, exact) or _has_surrogate(value)


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False
