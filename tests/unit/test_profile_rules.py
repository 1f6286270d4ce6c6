"""Pure rules: trait merging, normalisation, bucketing, rate limiting, clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whenthen.kernel.bucketing import partition_for, stable_bucket
from whenthen.kernel.clock import ManualClock
from whenthen.profiles.model import apply_traits, merge_traits, trait_stamp
from whenthen.profiles.normalization import normalise_email, normalise_phone, normalise_timezone
from whenthen.tracking.ratelimit import TokenBuckets

T0 = datetime(2026, 1, 1, tzinfo=UTC)

times = st.integers(min_value=0, max_value=10_000).map(lambda s: T0 + timedelta(seconds=s))
keys = st.sampled_from(["a", "b", "c", "plan"])
updates = st.lists(st.tuples(times, st.dictionaries(keys, st.integers(), max_size=3)), max_size=12)


def replay(events: list[tuple[datetime, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    traits: dict[str, Any] = {}
    stamps: dict[str, str] = {}
    for at, incoming in events:
        traits, stamps = apply_traits(traits, stamps, incoming, at)
    return traits, stamps


@given(updates)
def test_latest_timestamp_wins_whatever_the_arrival_order(
    events: list[tuple[datetime, dict[str, Any]]],
) -> None:
    traits, _ = replay(events)
    # Expected: per key, the value from the latest timestamp; ties go to the later arrival.
    expected: dict[str, tuple[datetime, int, Any]] = {}
    for order, (at, incoming) in enumerate(events):
        for k, v in incoming.items():
            if k not in expected or (at, order) >= expected[k][:2]:
                expected[k] = (at, order, v)
    assert traits == {k: v for k, (_, _, v) in expected.items()}


@given(updates, updates)
def test_merging_two_profiles_equals_one_profile_that_saw_everything(
    left: list[tuple[datetime, dict[str, Any]]], right: list[tuple[datetime, dict[str, Any]]]
) -> None:
    # Distinct timestamps per side so there are no ties to break.
    left = [(at, d) for at, d in left]
    right = [(at + timedelta(microseconds=1), d) for at, d in right]
    merged, _ = merge_traits(replay(left), replay(right))
    combined, _ = replay(sorted(left + right, key=lambda e: e[0]))
    assert merged.keys() == combined.keys()
    for k in merged:
        lt = max((at for at, d in left if k in d), default=None)
        rt = max((at for at, d in right if k in d), default=None)
        if lt != rt:
            assert merged[k] == combined[k]


def test_trait_stamps_sort_as_time() -> None:
    a = trait_stamp(datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC))
    b = trait_stamp(datetime(2026, 1, 1, 0, 0, 0, 500, tzinfo=UTC))
    assert a < b


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ann@Example.COM", "ann@example.com"),
        ("  bob@example.org ", "bob@example.org"),
        ("no-at-sign", None),
        ("a@b", None),
        (42, None),
        ("", None),
    ],
)
def test_email(raw: object, expected: str | None) -> None:
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+1 415 555 2671", None, "+14155552671"),
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("06 12 34 56 78", None, None),
        ("+86 138 0013 8000", None, "+8613800138000"),
        ("hello", None, None),
        (None, None, None),
    ],
)
def test_phone(raw: object, region: str | None, expected: str | None) -> None:
    assert normalise_phone(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Asia/Shanghai", "Asia/Shanghai"),
        ("Europe/Paris", "Europe/Paris"),
        ("Mars/Base", None),
        ("../etc", None),
        (3, None),
    ],
)
def test_timezone(raw: object, expected: str | None) -> None:
    assert normalise_timezone(raw) == expected


def test_buckets_are_stable_and_spread() -> None:
    assert stable_bucket(("ws", "user"), 64) == stable_bucket(("ws", "user"), 64)
    assert partition_for("ws_1", "u", 64) == partition_for("ws_1", "u", 64)
    spread = {partition_for("ws", f"user-{i}", 16) for i in range(500)}
    assert spread == set(range(16))
    with pytest.raises(ValueError, match="positive"):
        stable_bucket(("x",), 0)


def test_token_bucket() -> None:
    buckets = TokenBuckets(rate_per_second=10, burst=20)
    assert buckets.take("ws", 20, T0).allowed
    denied = buckets.take("ws", 5, T0)
    assert not denied.allowed
    assert denied.retry_after_seconds == 1
    assert buckets.take("other", 5, T0).allowed  # per workspace
    assert buckets.take("ws", 5, T0 + timedelta(seconds=0.5)).allowed
    # A call bigger than the burst passes when the bucket is full.
    assert buckets.take("big", 500, T0).allowed
    denied = buckets.take("big", 500, T0 + timedelta(seconds=1))
    assert not denied.allowed
    # It went into debt: it pays for all 500 events before the next call passes.
    assert denied.retry_after_seconds == 49


def test_manual_clock() -> None:
    clock = ManualClock(T0)
    assert clock.advance(timedelta(hours=1)) == T0 + timedelta(hours=1)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError, match="aware"):
        ManualClock(datetime(2026, 1, 1))
