"""System events' message ids: a function of the cause (so announcing a cause again finds
its event in the log), led by the cause's own time when it has one (so the log's unique
message-id index receives them in time order)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from whenthen.pipeline.service import system_message_id

T = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
times = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


def test_the_same_cause_gives_the_same_id_and_another_cause_another() -> None:
    a = system_message_id("segment-timer:s:v1:p1:x", "Segment Exited", {"segment": "trial"}, T)
    assert a == system_message_id("segment-timer:s:v1:p1:x", "Segment Exited", {"segment": "trial"}, T)
    assert a != system_message_id("segment-timer:s:v1:p2:x", "Segment Exited", {"segment": "trial"}, T)
    assert a != system_message_id("segment-timer:s:v1:p1:x", "Segment Entered", {"segment": "trial"}, T)
    assert a != system_message_id("segment-timer:s:v1:p1:x", "Segment Exited", {"segment": "other"}, T)


def test_without_a_time_the_id_is_the_hash_alone() -> None:
    plain = system_message_id("c", "Segment Entered", {"segment": "s"})
    assert plain.startswith("wt-sys-")
    assert len(plain) == len("wt-sys-") + 32
    assert int(plain[7:], 16) >= 0


def test_the_time_leads_the_id_as_fixed_width_microseconds() -> None:
    timed = system_message_id("c", "Segment Entered", {"segment": "s"}, T)
    micros = (T - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert timed == f"wt-sys-{micros:013x}" + system_message_id("c", "Segment Entered", {"segment": "s"})[7:]
    # The same instant written in another zone gives the same id.
    shifted = T.astimezone(timezone(timedelta(hours=8)))
    assert shifted.utcoffset() == timedelta(hours=8)
    assert system_message_id("c", "Segment Entered", {"segment": "s"}, shifted) == timed


@given(first=times, second=times, causes=st.tuples(st.text(max_size=20), st.text(max_size=20)))
def test_ids_sort_by_their_causes_time_whatever_the_causes(
    first: datetime, second: datetime, causes: tuple[str, str]
) -> None:
    a = system_message_id(causes[0], "Segment Exited", {"segment": "s"}, first)
    b = system_message_id(causes[1], "Segment Exited", {"segment": "s"}, second)
    assert len(a) == len(b) == len("wt-sys-") + 13 + 32
    if first < second:
        assert a < b
    elif second < first:
        assert b < a
