"""``SegmentIndex.affected`` finds the same segments, in the same order, as asking each
segment ``Change.affects``: for any change, over segments that read events, traits,
scores, the stage, lists and tags."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from whenthen.segments.definition import parse_segment
from whenthen.segments.service import EVERYTHING_CHANGED, Change, Segment, SegmentIndex
from whenthen.segments.views import Reads

AT = datetime(2026, 12, 1, tzinfo=UTC)
NAMES = ["Page Viewed", "Added to Cart", "Order Completed", "Signed Up", "Segment Entered"]
MODELS = ["interest", "engagement", "other"]

CONDITIONS: list[dict[str, Any]] = [
    {"kind": "event", "event": "Page Viewed", "at_least": 2, "within_last": "7d"},
    {"kind": "trait", "path": "plan", "value": "pro"},
    {"kind": "score", "model": "interest", "op": "gte", "value": 10},
    {"kind": "score", "model": "engagement", "op": "lt", "value": 3},
    {"kind": "stage", "in": ["lead", "customer"]},
    {"kind": "tag", "tag": "vip"},
    {"kind": "list", "list": "attendees"},
    {
        "kind": "sequence",
        "first": {"event": "Added to Cart"},
        "then_not": {"event": "Order Completed"},
        "within": "1h",
    },
    {"kind": "not", "condition": {"kind": "event", "event": "Signed Up", "within_last": "30d"}},
    {
        "kind": "or",
        "conditions": [
            {"kind": "trait", "path": "age", "op": "gte", "value": 30},
            {"kind": "score", "model": "interest", "op": "gt", "value": 50},
        ],
    },
    {"kind": "and", "conditions": [{"kind": "stage", "in": ["lead"]}, {"kind": "tag", "tag": "x"}]},
]


def _segment(i: int, condition: dict[str, Any]) -> Segment:
    document = {"condition": condition}
    return Segment(
        id=f"seg_{i}",
        workspace_id="ws",
        key=f"s{i}",
        name=f"S{i}",
        definition=parse_segment(document),
        document=document,
        version=1,
        created_at=AT,
        updated_at=AT,
    )


SEGMENTS = [_segment(i, c) for i, c in enumerate(CONDITIONS * 2)]

changes = st.builds(
    Change,
    event=st.none() | st.sampled_from(NAMES),
    traits=st.booleans(),
    scores=st.frozensets(st.sampled_from(MODELS)),
    stage=st.booleans(),
)


@given(change=changes, picked=st.lists(st.integers(0, len(SEGMENTS) - 1), unique=True))
def test_the_index_answers_as_each_segment_would(change: Change, picked: list[int]) -> None:
    segs = [SEGMENTS[i] for i in picked]
    assert SegmentIndex(segs).affected(change) == [s for s in segs if change.affects(s)]


def test_everything_changed_is_every_segment_in_order() -> None:
    assert SegmentIndex(SEGMENTS).affected(EVERYTHING_CHANGED) == SEGMENTS


def test_a_change_that_reads_nothing_affects_nothing() -> None:
    assert SegmentIndex(SEGMENTS).affected(Change(event="Unknown")) == []
    assert [s.key for s in SegmentIndex(SEGMENTS).affected(Change(event="Order Completed"))] == ["s7", "s18"]


@given(asked=st.lists(changes, min_size=1, max_size=6), picked=st.lists(st.integers(0, len(SEGMENTS) - 1)))
def test_affected_with_reads_answers_as_asked_afresh(asked: list[Change], picked: list[int]) -> None:
    """The memo of one index (a batch's) answers every change, repeated or not, as the
    segments and ``Reads.union`` of them would."""
    segs = [SEGMENTS[i] for i in sorted(set(picked))]
    index = SegmentIndex(segs)
    for change in asked * 2:
        affected, reads = index.affected_with_reads(change)
        expected = [s for s in segs if change.affects(s)]
        assert list(affected) == expected
        assert reads == Reads.union(s.reads for s in expected)
