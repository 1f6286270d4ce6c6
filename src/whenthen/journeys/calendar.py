"""Local times in the recipient's time zone. Pure.

DST rules (table-tested in tests/unit/test_journey_calendar.py):
* a local time that does not exist (spring forward, e.g. 02:30 in Paris on the last
  Sunday of March) happens at the same wall-clock distance after the transition,
  i.e. 03:30 local;
* a local time that happens twice (fall back) happens at its first occurrence.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def zone(name: str | None) -> ZoneInfo:
    if name:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(name)
    return ZoneInfo("UTC")


def local_instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of wall-clock ``at`` on ``day`` in ``tz`` (see the DST rules above)."""
    naive = datetime.combine(day, at)
    # fold=0 picks the first of two ambiguous times; for a nonexistent time zoneinfo uses
    # the offset before the transition, which lands after the gap by the gap's size.
    return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)


def next_local_time(now: datetime, tz_name: str | None, at: time, weekdays: list[str] | None) -> datetime:
    """The first instant strictly after ``now`` when the local clock shows ``at`` on an allowed weekday."""
    tz = zone(tz_name)
    allowed = {WEEKDAYS.index(w) for w in weekdays} if weekdays else set(range(7))
    today = now.astimezone(tz).date()
    for i in range(0, 15):
        day = today + timedelta(days=i)
        if day.weekday() not in allowed:
            continue
        candidate = local_instant(day, at, tz)
        if candidate > now:
            return candidate
    raise AssertionError("unreachable: some allowed weekday comes within two weeks")


def parse_date_trait(value: object) -> date | datetime | None:
    """A date trait: ``YYYY-MM-DD`` or an ISO 8601 date-time (naive means UTC)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def trait_instant(value: object, tz_name: str | None, offset: timedelta, at: time | None) -> datetime | None:
    """When a date trait plus ``offset`` falls: a date means ``at`` (midnight when None)
    local time that day; a date-time is taken as it is."""
    parsed = parse_date_trait(value)
    if parsed is None:
        return None
    if isinstance(parsed, datetime):
        return parsed.astimezone(UTC) + offset
    tz = zone(tz_name)
    day = parsed + timedelta(days=offset.days)
    rest = offset - timedelta(days=offset.days)
    return local_instant(day, at or time(0, 0), tz) + rest


def next_anniversary(
    value: object, tz_name: str | None, offset: timedelta, at: time, now: datetime
) -> datetime | None:
    """The next yearly occurrence after ``now`` of a date trait plus ``offset`` (birthdays).
    29 February falls on 28 February in other years."""
    parsed = parse_date_trait(value)
    if parsed is None:
        return None
    base = parsed.date() if isinstance(parsed, datetime) else parsed
    tz = zone(tz_name)
    year = now.astimezone(tz).year - 1
    for y in range(year, year + 3):
        try:
            day = base.replace(year=y)
        except ValueError:
            day = date(y, 2, 28)
        instant = trait_instant(day.isoformat(), tz_name, offset, at)
        if instant is not None and instant > now:
            return instant
    return None
