"""A pipeline batch reads the people its events name together at its start (and their
score rows), holds their activity (first and last seen, event count) and its new journey
enrollments until its end (ADR 0014). Whatever the calls (identities known or not, merges by identify and
alias, trait and time zone changes, a journey entered once and one entered every time,
scores with a cap, a trait rule and a threshold), a batch must leave the same profiles,
identities, enrollments and scores as writing each
event's changes at once. Both databases; the reference is the same batch with the
holding turned off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.support.ingest import send
from tests.support.workspace import make_workspace
from whenthen import journeys, scoring
from whenthen import profiles as profiles_package
from whenthen.bootstrap import Container
from whenthen.journeys import repository as journey_repo
from whenthen.journeys.runtime import Writes
from whenthen.journeys.tables import enrollments
from whenthen.profiles import repository as profile_repo
from whenthen.profiles.service import HeldProfiles
from whenthen.profiles.tables import identities, profiles
from whenthen.scoring import HeldScores
from whenthen.scoring.tables import profile_scores
from whenthen.tracking.tables import events

USERS = ["u0", "u1", "u2"]
ANONS = ["a0", "a1", "a2"]
START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)

ONCE: dict[str, Any] = {
    "key": "once",
    "name": "Once",
    "trigger": {"kind": "event", "event": "Ping"},
    "entry": {"frequency": "once"},
    "start": "wait",
    "nodes": {"wait": {"kind": "delay", "duration": "1d"}},
}
#: A journey step that writes the person's traits in the batch (a page view sets the
#: city, by a jump into a second journey): their later events must see it.
JUMPER: dict[str, Any] = {
    "key": "jumper",
    "name": "Jumper",
    "trigger": {"kind": "event", "event": "Viewed"},
    "entry": {"frequency": "every_time"},
    "start": "go",
    "nodes": {"go": {"kind": "jump", "journey": "setter"}},
}
SETTER: dict[str, Any] = {
    "key": "setter",
    "name": "Setter",
    "trigger": {"kind": "api"},
    "entry": {"frequency": "every_time"},
    "start": "set",
    "nodes": {"set": {"kind": "update_profile", "set": {"city": "z"}}},
}
#: Scores: an event rule with a cap, a trait rule, decay and a threshold.
MODEL: dict[str, Any] = {
    "key": "interest",
    "name": "Interest",
    "rules": [
        {"id": "ping", "event": "Ping", "points": 3, "cap": {"points": 6, "period": "1d"}},
        {"id": "viewed", "event": "Viewed", "points": 1},
        {"id": "plan", "trait": "plan", "value": "a", "points": 5},
    ],
    "decay": {"half_life": "7d"},
    "thresholds": [4],
}
EVERY: dict[str, Any] = {
    "key": "every",
    "name": "Every",
    "trigger": {"kind": "event", "event": "Ping"},
    "entry": {"frequency": "every_time"},
    "start": "wait",
    "nodes": {"wait": {"kind": "delay", "duration": "1d"}},
}


@st.composite
def calls(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["track", "track", "identify", "identify", "alias", "page"]))
        # Out of order in time too: first and last seen are the earliest and latest.
        at = (START + timedelta(minutes=draw(st.integers(0, 50)), seconds=i)).isoformat()
        ids: dict[str, Any] = draw(
            st.sampled_from(["user", "anon", "both"]).map(
                lambda which: {
                    "user": {"userId": draw(st.sampled_from(USERS))},
                    "anon": {"anonymousId": draw(st.sampled_from(ANONS))},
                    "both": {
                        "userId": draw(st.sampled_from(USERS)),
                        "anonymousId": draw(st.sampled_from(ANONS)),
                    },
                }[which]
            )
        )
        context = (
            {"timezone": draw(st.sampled_from(["Europe/Paris", "Asia/Shanghai"]))}
            if draw(st.booleans())
            else {}
        )
        if kind == "alias":
            out.append(
                {
                    "type": "alias",
                    "userId": draw(st.sampled_from(USERS)),
                    "previousId": draw(st.sampled_from(USERS + ANONS)),
                    "timestamp": at,
                }
            )
        elif kind == "identify":
            traits = draw(
                st.dictionaries(st.sampled_from(["plan", "city"]), st.sampled_from(["a", "b"]), max_size=2)
            )
            out.append({"type": "identify", **ids, "traits": traits, "context": context, "timestamp": at})
        elif kind == "page":
            out.append({"type": "page", **ids, "name": "Home", "context": context, "timestamp": at})
        else:
            event = draw(st.sampled_from(["Ping", "Viewed"]))
            out.append({"type": "track", **ids, "event": event, "context": context, "timestamp": at})
    return out


#: The connection of the batch being written (remembered by the patched ``apply_event``).
_CONN: list[Any] = [None]


@contextmanager
def writes_at_once() -> Iterator[None]:
    """The reference: nothing read ahead, the activity and new enrollments written as each
    event is applied (what ``apply_event`` and ``_persist`` did before holding them)."""

    def hold(self: HeldProfiles, profile: Any) -> None:
        profile_repo.save_activity(_CONN[0], profile, START)

    def enter(self: Writes, profile_id: str, row: tuple[Any, ...]) -> None:
        journey_repo.insert_enrollments(_CONN[0], [row])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HeldProfiles, "prefetch", lambda self, conn, events: None)
        mp.setattr(HeldProfiles, "take", lambda self, event: None)  # every event reads its person
        mp.setattr(HeldScores, "prefetch", lambda self, conn, ws, ids: None)
        mp.setattr(HeldScores, "rows", lambda self, ws, pid: None)
        mp.setattr(HeldProfiles, "hold", hold)
        mp.setattr(Writes, "enter", enter)
        yield


def canonical(c: Container, ws: str) -> dict[str, Any]:
    """Per identity, what its owner looks like; and how many enrollments each owner has
    in each journey."""
    with c.db.read() as conn:
        owners = {
            (r.kind, r.value): r.profile_id
            for r in conn.execute(select(identities).where(identities.c.workspace_id == ws))
        }
        rows = {r.id: r for r in conn.execute(select(profiles).where(profiles.c.workspace_id == ws))}
        entered: dict[tuple[str, str], int] = {}
        for r in conn.execute(
            select(enrollments.c.profile_id, enrollments.c.journey_id).where(enrollments.c.workspace_id == ws)
        ):
            entered[(r.profile_id, r.journey_id)] = entered.get((r.profile_id, r.journey_id), 0) + 1
        keys = {r.id: r.key for r in journeys.list_all(conn, ws)}
        scores = {
            r.profile_id: (r.model_key, round(r.points, 9), r.as_of, r.caps, r.decay_due_at, r.decay_from)
            for r in conn.execute(select(profile_scores).where(profile_scores.c.workspace_id == ws))
        }
        crossings = sorted(
            r[0]["properties"]["direction"]
            for r in conn.execute(
                select(events.c.payload).where(
                    events.c.workspace_id == ws, events.c.event == "Score Threshold Crossed"
                )
            )
        )
    out: dict[Any, Any] = {}
    for ident, pid in sorted(owners.items()):
        p = rows[pid]
        same = tuple(sorted(i for i, o in owners.items() if o == pid))
        out[ident] = (
            same,
            p.traits,
            p.email,
            p.timezone,
            p.first_seen,
            p.last_seen,
            p.event_count,
            p.merged_into is None,
            sorted((keys[j], n) for (o, j), n in entered.items() if o == pid),
            scores.get(pid),
        )
    out["profiles"] = sorted((r.merged_into is None, r.event_count) for r in rows.values())
    out["crossings"] = crossings
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=calls(), batch=calls())
# A journey step writes the person's traits between two of their events in one batch.
@example(
    before=[{"type": "identify", "userId": "u0", "traits": {"plan": "a"}, "timestamp": START.isoformat()}],
    batch=[
        {"type": "track", "userId": "u0", "event": "Viewed", "timestamp": START.isoformat()},
        {"type": "identify", "userId": "u0", "traits": {"plan": "b"}, "timestamp": START.isoformat()},
    ],
)
def test_a_batch_that_holds_its_people_leaves_what_writing_each_event_leaves(
    container: Container, before: list[dict[str, Any]], batch: list[dict[str, Any]]
) -> None:
    """``before`` is a first batch (so that the second finds people it can read ahead)."""
    original = profiles_package.apply_event

    def remembering(conn: Any, event: Any, **kw: Any) -> Any:
        _CONN[0] = conn
        return original(conn, event, **kw)

    results = []
    for held in (False, True):
        ws = make_workspace(container).id
        with container.db.write() as conn:
            for d in (ONCE, EVERY, SETTER, JUMPER):
                journeys.push(conn, ws, d, now=START)
                journeys.publish(conn, ws, d["key"], now=START)
            scoring.save_model(conn, ws, MODEL, now=START)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(profiles_package, "apply_event", remembering)
            for calls_ in (before, batch):
                if held:
                    send(container, ws, *calls_)
                else:
                    with writes_at_once():
                        send(container, ws, *calls_)
        results.append(canonical(container, ws))
    assert results[1] == results[0]
