"""Local times in the recipient's zone, across DST transitions (table-driven)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from whenthen.journeys.calendar import next_anniversary, next_local_time, trait_instant
from whenthen.kernel.durations import parse_duration


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "tz", "at", "weekdays", "expected"),
    [
        # Before 09:00 local: today; after: tomorrow.
        (utc(2026, 11, 25, 0, 0), "Asia/Shanghai", time(9), None, utc(2026, 11, 25, 1, 0)),
        (utc(2026, 11, 25, 2, 0), "Asia/Shanghai", time(9), None, utc(2026, 11, 26, 1, 0)),
        # Exactly at the time: the next day (strictly after now).
        (utc(2026, 11, 25, 1, 0), "Asia/Shanghai", time(9), None, utc(2026, 11, 26, 1, 0)),
        # No zone: UTC.
        (utc(2026, 11, 25, 8, 0), None, time(9), None, utc(2026, 11, 25, 9, 0)),
        (utc(2026, 11, 25, 8, 0), "Not/AZone", time(9), None, utc(2026, 11, 25, 9, 0)),
        # Weekdays only: Friday evening in New York -> Monday.
        (
            utc(2026, 11, 27, 23, 0),
            "America/New_York",
            time(9),
            ["mon", "tue", "wed", "thu", "fri"],
            utc(2026, 11, 30, 14, 0),
        ),
        # Paris spring forward (2026-03-29 02:00 -> 03:00): 02:30 does not exist -> 03:30 CEST.
        (utc(2026, 3, 28, 12, 0), "Europe/Paris", time(2, 30), None, utc(2026, 3, 29, 1, 30)),
        # Paris fall back (2026-10-25 03:00 -> 02:00): 02:30 happens twice -> the first, CEST.
        (utc(2026, 10, 24, 12, 0), "Europe/Paris", time(2, 30), None, utc(2026, 10, 25, 0, 30)),
        # 09:00 the day after spring forward is 07:00 UTC (CEST), the day before 08:00 (CET).
        (utc(2026, 3, 28, 9, 0), "Europe/Paris", time(9), None, utc(2026, 3, 29, 7, 0)),
        (utc(2026, 3, 27, 9, 0), "Europe/Paris", time(9), None, utc(2026, 3, 28, 8, 0)),
        # New York spring forward 2026-03-08 02:00 -> 03:00.
        (utc(2026, 3, 7, 12, 0), "America/New_York", time(2, 15), None, utc(2026, 3, 8, 7, 15)),
        # Southern hemisphere: Sydney in November is on daylight time (+11).
        (utc(2026, 11, 25, 12, 0), "Australia/Sydney", time(8), None, utc(2026, 11, 25, 21, 0)),
        # A half-hour zone.
        (utc(2026, 11, 25, 12, 0), "Asia/Kolkata", time(20), None, utc(2026, 11, 25, 14, 30)),
    ],
)
def test_next_local_time(
    now: datetime, tz: str | None, at: time, weekdays: list[str] | None, expected: datetime
) -> None:
    got = next_local_time(now, tz, at, weekdays)
    assert got == expected
    assert got > now


@pytest.mark.parametrize(
    ("value", "tz", "offset", "at", "expected"),
    [
        ("2027-01-31", "Europe/Paris", "-7d", None, utc(2027, 1, 23, 23, 0)),
        ("2027-01-31", "Europe/Paris", "0d", time(9), utc(2027, 1, 31, 8, 0)),
        ("2027-01-31T10:00:00Z", "Europe/Paris", "1d", None, utc(2027, 2, 1, 10, 0)),
        ("2027-01-31T10:00:00", None, "-2h", None, utc(2027, 1, 31, 8, 0)),
        ("2027-01-31", None, "12h", None, utc(2027, 1, 31, 12, 0)),
        ("not a date", None, "0d", None, None),
        ("", None, "0d", None, None),
    ],
)
def test_trait_instant(
    value: str, tz: str | None, offset: str, at: time | None, expected: datetime | None
) -> None:
    assert trait_instant(value, tz, parse_duration(offset), at) == expected


@pytest.mark.parametrize(
    ("birthday", "now", "expected"),
    [
        ("1990-12-01", utc(2026, 11, 25), utc(2026, 12, 1, 1, 0)),  # 09:00 Shanghai
        ("1990-03-01", utc(2026, 11, 25), utc(2027, 3, 1, 1, 0)),
        ("2000-02-29", utc(2026, 11, 25), utc(2027, 2, 28, 1, 0)),  # not a leap year
        ("2000-02-29", utc(2027, 11, 25), utc(2028, 2, 29, 1, 0)),
    ],
)
def test_next_anniversary(birthday: str, now: datetime, expected: datetime) -> None:
    assert next_anniversary(birthday, "Asia/Shanghai", timedelta(0), time(9), now) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
        ("-7d", timedelta(days=-7)),
        ("PT1H", timedelta(hours=1)),
        ("P1DT2H", timedelta(days=1, hours=2)),
        ("p2d", timedelta(days=2)),
        ("45s", timedelta(seconds=45)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "P", "PT", "10y", "99999d", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|ten years"):
        parse_duration(text)
