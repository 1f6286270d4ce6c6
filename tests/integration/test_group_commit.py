"""Single tracking calls of concurrent requests share transactions (group commit), and
every request still gets its own answer: stored, 401 for its key, 429 for its workspace's
limit; a group that fails is written call by call. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, select

from tests.support.workspace import make_workspace
from whenthen.api.app import create_app
from whenthen.api.group_commit import TrackingWriter
from whenthen.bootstrap import Container
from whenthen.kernel.errors import Unauthorized
from whenthen.tracking import AcceptedEvent, CallType
from whenthen.tracking.tables import events
from whenthen.workspaces import Principal


@pytest.fixture
def commits(container: Container) -> Iterator[list[int]]:
    """Counts the database's commits while the test runs."""
    seen: list[int] = []

    def on_commit(_conn: Any) -> None:
        seen.append(1)

    event.listen(container.db.engine, "commit", on_commit)
    yield seen
    event.remove(container.db.engine, "commit", on_commit)


def stored(c: Container) -> int:
    with c.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(events)).scalar_one())


async def _post_all(c: Container, calls: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    app = create_app(c, run_worker=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await asyncio.gather(
            *(client.post("/v1/track", json=body, auth=(key, "")) for key, body in calls)
        )


def test_concurrent_single_calls_are_stored_in_fewer_transactions(
    container: Container, commits: list[int]
) -> None:
    ws = make_workspace(container)
    calls = [(ws.write_key, {"userId": f"u{i}", "event": "Viewed", "messageId": f"m{i}"}) for i in range(60)]
    answers = asyncio.run(_post_all(container, calls))
    assert [a.status_code for a in answers] == [200] * 60
    assert all(a.json() == {"success": True} for a in answers)
    assert stored(container) == 60
    assert len(commits) < 60  # calls that waited together were committed together


def test_each_call_of_a_group_gets_its_own_answer(container: Container) -> None:
    good = make_workspace(container, "Good")
    other = make_workspace(container, "Other")
    calls = [
        (good.write_key, {"userId": "a", "event": "E", "messageId": "g1"}),
        ("wk_not_a_key", {"userId": "a", "event": "E", "messageId": "bad1"}),
        (other.write_key, {"userId": "b", "event": "E", "messageId": "o1"}),
        (good.admin_key, {"userId": "a", "event": "E", "messageId": "bad2"}),  # admin keys cannot write
        (good.write_key, {"userId": "a", "event": "E", "messageId": "g1"}),  # a duplicate: stored once
        (good.write_key, {"userId": "a", "event": "E", "messageId": "g2"}),
    ]
    answers = asyncio.run(_post_all(container, calls))
    assert [a.status_code for a in answers] == [200, 401, 200, 401, 200, 200]
    assert answers[1].json()["code"] == "unauthorized"
    with container.db.read() as conn:
        rows = conn.execute(select(events.c.workspace_id, events.c.message_id).order_by(events.c.seq)).all()
    assert sorted((r.workspace_id, r.message_id) for r in rows) == sorted(
        [(good.id, "g1"), (good.id, "g2"), (other.id, "o1")]
    )


def _call(message_id: str) -> AcceptedEvent:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    return AcceptedEvent(
        message_id=message_id,
        type=CallType.TRACK,
        event="E",
        user_id="u",
        anonymous_id=None,
        timestamp=now,
        received_at=now,
        payload={"type": "track", "userId": "u", "event": "E", "messageId": message_id},
    )


def test_a_group_that_fails_is_written_call_by_call(container: Container) -> None:
    """One call whose handling fails (here the limiter raises for it) makes the shared
    transaction fail; the writer then stores each call alone, and only that call fails."""
    ws = make_workspace(container)

    def limiter(_c: Container, _p: Principal, _n: int, now: datetime) -> None:
        if now.minute == 1:
            raise RuntimeError("limiter broke for this call")
        return None

    writer = TrackingWriter(container, limiter)

    async def run() -> list[Any]:
        started = [
            writer.write(
                ws.write_key, _call(f"m{i}"), datetime(2026, 11, 25, 12, 1 if i == 3 else 0, tzinfo=UTC)
            )
            for i in range(8)
        ]
        return await asyncio.gather(*started, return_exceptions=True)

    try:
        outcomes = asyncio.run(run())
    finally:
        writer.stop()
    assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 3 + ["RuntimeError"] + ["NoneType"] * 4
    assert stored(container) == 7


def test_a_wrong_key_raises_unauthorized_to_its_request_only(container: Container) -> None:
    ws = make_workspace(container)
    writer = TrackingWriter(container, lambda *_: None)

    async def run() -> list[Any]:
        answers = await asyncio.gather(
            writer.write("wk_nope", _call("x1"), datetime(2026, 11, 25, tzinfo=UTC)),
            writer.write(ws.write_key, _call("x2"), datetime(2026, 11, 25, tzinfo=UTC)),
            return_exceptions=True,
        )
        return list(answers)

    try:
        outcomes = asyncio.run(run())
    finally:
        writer.stop()
    assert isinstance(outcomes[0], Unauthorized)
    assert outcomes[1] is None
    assert stored(container) == 1


def test_batches_in_flight_get_their_own_counts(container: Container, commits: list[int]) -> None:
    """Concurrent /v1/batch requests (group commit on SQLite, a transaction each on
    PostgreSQL) each answer their own accepted and duplicate counts, even when they share
    message ids with each other; a wrong key is refused alone."""
    ws = make_workspace(container)
    bodies: list[tuple[str, dict[str, Any]]] = []
    for b in range(12):
        calls = [
            {"type": "track", "userId": f"u{b}", "event": "Viewed", "messageId": f"b{b}-{i}"}
            for i in range(20)
        ]
        bodies.append((ws.write_key, {"batch": calls}))
    # Repeats ids of batch 0 and adds new ones.
    again = [{"type": "track", "userId": "u0", "event": "Viewed", "messageId": f"b0-{i}"} for i in range(5)]
    again += [{"type": "track", "userId": "u0", "event": "Viewed", "messageId": f"new-{i}"} for i in range(3)]
    bodies.append((ws.write_key, {"batch": again}))
    bodies.append(("wk_not_a_key", {"batch": again}))

    async def post_all() -> list[httpx.Response]:
        app = create_app(container, run_worker=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await asyncio.gather(
                *(client.post("/v1/batch", json=body, auth=(key, "")) for key, body in bodies)
            )

    answers = asyncio.run(post_all())
    assert [a.status_code for a in answers] == [200] * 13 + [401]
    counts = [(a.json()["accepted"], a.json()["duplicates"]) for a in answers[:13]]
    # Batch 0 and the repeat may be stored in either order: between them 25 new rows.
    assert counts[1:12] == [(20, 0)] * 11
    assert counts[0][0] + counts[12][0] == 20 + 3
    assert counts[0][1] + counts[12][1] == 5
    assert stored(container) == 12 * 20 + 3


def test_batches_waiting_together_share_a_commit(container: Container, commits: list[int]) -> None:
    """While the writer is held up (here: another writer holds SQLite's write lock), the
    batches that arrive queue, and are then stored in one transaction."""
    ws = make_workspace(container)
    writer = TrackingWriter(container, lambda *_: None)
    results: list[Any] = [None] * 5
    lock = container.db._write_lock
    assert lock is not None or container.db.dialect.value == "postgresql"

    def submit(n: int) -> None:
        results[n] = writer.write_batch(
            ws.write_key, [_call(f"q{n}-{i}") for i in range(10)], datetime(2026, 11, 25, tzinfo=UTC)
        )

    try:
        if lock is None:  # PostgreSQL: nothing to hold the writer with; grouping is SQLite's
            for n in range(5):
                submit(n)
        else:
            with lock:
                threads = [threading.Thread(target=submit, args=(n,)) for n in range(5)]
                for t in threads:
                    t.start()
                deadline = time.monotonic() + 10
                while writer._queue.qsize() < 4 and time.monotonic() < deadline:
                    time.sleep(0.01)  # the writer holds the first; the other four queue
                commits.clear()
            for t in threads:
                t.join(10)
            assert len(commits) == 2  # the first batch alone, then the four that waited
    finally:
        writer.stop()
    assert results == [10] * 5
    assert stored(container) == 50


def test_on_postgresql_a_group_is_written_without_a_transaction_block(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the group's key reads and appends run on an autocommit connection (no
    BEGIN/COMMIT round trips, ADR 0007); SQLite: in one write transaction."""
    ws = make_workspace(container)
    modes: list[bool] = []
    real = container.db.autocommit

    @contextlib.contextmanager
    def watched() -> Iterator[Any]:
        with real() as conn:
            modes.append(bool(getattr(conn.connection.driver_connection, "autocommit", False)))
            yield conn

    monkeypatch.setattr(container.db, "autocommit", watched)
    calls = [(ws.write_key, {"userId": f"u{i}", "event": "Viewed", "messageId": f"m{i}"}) for i in range(20)]
    answers = asyncio.run(_post_all(container, calls))
    assert [a.status_code for a in answers] == [200] * 20
    assert stored(container) == 20
    assert modes  # every group went through Database.autocommit
    expected = container.db.engine.dialect.name == "postgresql"
    assert set(modes) == {expected}
