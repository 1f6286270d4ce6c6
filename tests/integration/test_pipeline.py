"""The pipeline behind ingestion: leases, per-partition order, parking poison events."""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select

from tests.support.ingest import send
from tests.support.workspace import make_workspace
from whenthen import pipeline, profiles, tracking
from whenthen.bootstrap import Container
from whenthen.kernel.bucketing import partition_for
from whenthen.kernel.clock import ManualClock
from whenthen.settings import PipelineSettings
from whenthen.tracking.tables import events
from whenthen.worker.runner import PipelineWorker


def test_two_workers_split_partitions_and_take_over_expired_leases(
    container: Container, clock: ManualClock
) -> None:
    lease = timedelta(seconds=30)
    with container.db.write() as conn:
        first = pipeline.claim(conn, "w1", range(8), now=clock.now(), lease=lease, max_partitions=4)
        second = pipeline.claim(conn, "w2", range(8), now=clock.now(), lease=lease)
    assert first == [0, 1, 2, 3]
    assert second == [4, 5, 6, 7]
    clock.advance(timedelta(seconds=10))
    with container.db.write() as conn:
        # w1 renews; nothing is free for w2.
        assert pipeline.claim(conn, "w1", range(8), now=clock.now(), lease=lease, max_partitions=4) == [
            0,
            1,
            2,
            3,
        ]
        assert pipeline.claim(conn, "w2", range(8), now=clock.now(), lease=lease) == [4, 5, 6, 7]
    clock.advance(timedelta(seconds=31))
    with container.db.write() as conn:
        # w1 stopped renewing: its partitions expired and w2 takes them over.
        assert pipeline.claim(conn, "w2", range(8), now=clock.now(), lease=lease) == list(range(8))
        assert pipeline.owned(conn, "w1", [0, 1], clock.now()) == []
        assert pipeline.owned(conn, "w2", [0, 1], clock.now()) == [0, 1]
        pipeline.release(conn, "w2")
        assert pipeline.owned(conn, "w2", [0, 1], clock.now()) == []


def test_a_worker_only_processes_partitions_it_owns(container: Container, clock: ManualClock) -> None:
    ws = make_workspace(container)
    parts = container.settings.pipeline.partitions
    send(
        container,
        ws.id,
        *({"type": "track", "userId": f"u{i}", "event": "E", "messageId": str(i)} for i in range(40)),
        drain=False,
    )
    other = PipelineWorker(
        db=container.db,
        clock=clock,
        settings=PipelineSettings(partitions=parts, lease_seconds=60),
        secret=container.secret,
        owner="other",
    )
    with container.db.write() as conn:
        taken = set(
            pipeline.claim(
                conn,
                "other",
                range(parts),
                now=clock.now(),
                lease=timedelta(seconds=60),
                max_partitions=parts // 2,
            )
        )
    # The container's worker cannot take the other worker's partitions while its lease holds.
    container.worker.run_once()
    with container.db.read() as conn:
        rows = conn.execute(select(events.c.partition, events.c.state)).all()
    for part, state in rows:
        assert state == (0 if part in taken else 1)
    waiting = sum(1 for part, _ in rows if part in taken)
    assert 0 < waiting < 40
    assert other.drain() == waiting
    with container.db.read() as conn:
        assert pipeline.count_pending(conn) == 0


def test_events_of_one_person_are_applied_in_log_order(container: Container) -> None:
    ws = make_workspace(container)
    # Same timestamp for all: the log order decides which trait value is the latest.
    calls = [
        {
            "type": "identify",
            "userId": "u",
            "traits": {"n": i},
            "messageId": str(i),
            "timestamp": "2026-11-25T11:00:00Z",
        }
        for i in range(30)
    ]
    send(container, ws.id, *calls)
    with container.db.read() as conn:
        p = profiles.lookup(conn, ws.id, user_id="u")
    assert p.traits == {"n": 29}
    assert p.event_count == 30


def test_a_poison_event_is_parked_and_does_not_block_its_partition(
    container: Container, clock: ManualClock
) -> None:
    ws = make_workspace(container)
    part = partition_for(ws.id, "u", container.settings.pipeline.partitions)
    with container.db.write() as conn:
        # A row no ingestion would write (a group call without groupId), straight into the log.
        conn.execute(
            insert(events).values(
                workspace_id=ws.id,
                message_id="poison",
                type="group",
                event=None,
                user_id="u",
                anonymous_id=None,
                timestamp=clock.now(),
                received_at=clock.now(),
                payload={"type": "group", "userId": "u"},
                partition=part,
                state=0,
            )
        )
    send(container, ws.id, {"type": "track", "userId": "u", "event": "After", "messageId": "ok"})
    with container.db.read() as conn:
        states = dict(conn.execute(select(events.c.message_id, events.c.state)).all())
        p = profiles.lookup(conn, ws.id, user_id="u")
    assert states == {"poison": 3, "ok": 1}
    assert p.event_count == 1
    assert container.worker.stats.failed == 1
    assert container.worker.stats.retried_batches == 1


def test_background_worker_processes_after_notify(container: Container) -> None:
    ws = make_workspace(container)
    send(container, ws.id, {"type": "track", "userId": "u", "event": "E", "messageId": "1"}, drain=False)
    container.worker.start()
    try:
        container.worker.notify()
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with container.db.read() as conn:
                if pipeline.count_pending(conn) == 0:
                    break
            time.sleep(0.02)
    finally:
        container.worker.stop()
    with container.db.read() as conn:
        assert pipeline.count_pending(conn) == 0
        assert profiles.lookup(conn, ws.id, user_id="u").event_count == 1


def test_two_concurrent_workers_give_the_same_profiles_as_one(
    container: Container, clock: ManualClock
) -> None:
    """Several workers sharing one database split the partitions without changing the result,
    even when merges cross partitions (anonymous profile in one, known profile in another)."""
    import threading

    ws = make_workspace(container)
    people = 30
    calls: list[dict[str, object]] = []
    for i in range(people):
        calls += [
            {"type": "track", "anonymousId": f"anon-{i}", "event": "Viewed", "messageId": f"{i}-1"},
            {"type": "identify", "userId": f"user-{i}", "traits": {"n": i}, "messageId": f"{i}-0"},
            {"type": "identify", "userId": f"user-{i}", "anonymousId": f"anon-{i}", "messageId": f"{i}-2"},
            {
                "type": "track",
                "userId": f"user-{i}",
                "anonymousId": f"anon-{i}",
                "event": "Bought",
                "messageId": f"{i}-3",
            },
        ]
    send(container, ws.id, *calls, drain=False)
    parts = container.settings.pipeline.partitions
    workers = [
        PipelineWorker(
            db=container.db,
            clock=clock,
            settings=PipelineSettings(partitions=parts, batch_size=7, lease_seconds=60),
            secret=container.secret,
            owner=f"w{k}",
        )
        for k in range(2)
    ]
    with container.db.write() as conn:
        for w in workers:
            pipeline.claim(
                conn,
                w.owner,
                range(parts),
                now=clock.now(),
                lease=timedelta(seconds=60),
                max_partitions=parts // 2,
            )
    errors: list[BaseException] = []

    def run(w: PipelineWorker) -> None:
        try:
            w.drain(max_passes=500)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(w.stats.processed > 0 for w in workers)
    assert sum(w.stats.failed for w in workers) == 0
    with container.db.read() as conn:
        assert pipeline.count_pending(conn) == 0
        for i in range(people):
            p = profiles.lookup(conn, ws.id, user_id=f"user-{i}")
            assert p.anonymous_ids == [f"anon-{i}"], i
            assert p.traits == {"n": i}
            assert p.event_count == 4
            _, evs = profiles.events_of(conn, ws.id, p.id, after=None, limit=10)
            assert sorted(e.message_id for e in evs) == sorted(f"{i}-{k}" for k in range(4))


def test_merge_inside_one_batch_redirects_events_applied_before_it(db_url: str, clock: ManualClock) -> None:
    """With one partition every call shares a batch: the anonymous event is applied to the
    anonymous profile, which a later call of the same batch merges away."""
    from tests.conftest import make_settings
    from whenthen.bootstrap import build

    c = build(make_settings(db_url, pipeline=PipelineSettings(partitions=1)), clock=clock)
    try:
        ws = make_workspace(c)
        send(
            c,
            ws.id,
            {"type": "identify", "userId": "u", "messageId": "0"},
            {"type": "track", "anonymousId": "a", "event": "Viewed", "messageId": "1"},
            {"type": "track", "userId": "u", "anonymousId": "a", "event": "Bought", "messageId": "2"},
        )
        assert c.worker.stats.processed == 3
        with c.db.read() as conn:
            p = profiles.lookup(conn, ws.id, anonymous_id="a")
            _, evs = profiles.events_of(conn, ws.id, p.id, after=None, limit=10)
            [merge] = profiles.merges_of(conn, ws.id, p.id)
            merged_rows = conn.execute(
                select(events.c.profile_id).where(events.c.profile_id == merge.from_profile_id)
            ).all()
        assert [e.message_id for e in evs] == ["0", "1", "2"]
        assert merged_rows == []
    finally:
        c.close()


def test_pending_events_take_the_oldest_of_each_partition_in_log_order(container: Container) -> None:
    """Many partitions in one read: each gives at least its share of the limit (or all it
    has), always the oldest of its pending events; what quiet partitions leave goes to
    the busy one, so a long backlog moves in large batches without crowding others out."""
    ws = make_workspace(container)
    parts = container.settings.pipeline.partitions
    busy = "busy-user"
    calls = [{"type": "track", "userId": busy, "event": "E", "messageId": f"b{i}"} for i in range(150)]
    calls += [{"type": "track", "userId": f"q{i}", "event": "E", "messageId": f"q{i}"} for i in range(12)]
    send(container, ws.id, *calls, drain=False)
    with container.db.read() as conn:
        rows = conn.execute(select(events.c.seq, events.c.partition).order_by(events.c.seq)).all()
    by_partition: dict[int, list[int]] = {}
    for seq, part in rows:
        by_partition.setdefault(part, []).append(seq)
    candidates = sorted(by_partition)
    busy_part = partition_for(ws.id, busy, parts)
    limit = 100
    share = -(-limit // len(candidates))
    with container.db.read() as conn:
        taken = tracking.pending_events(conn, candidates, limit)
    seqs = [e.seq for e in taken]
    assert seqs == sorted(seqs)
    assert len(seqs) == len(set(seqs))
    assert len(taken) <= limit + len(candidates)
    for part, pending in by_partition.items():
        mine = [e.seq for e in taken if partition_for(ws.id, e.user_id or "", parts) == part]
        assert mine == pending[: len(mine)]  # a prefix: the person's calls stay in order
        assert len(mine) >= min(share, len(pending))  # nobody is crowded out
    quiet = sum(len(v) for p, v in by_partition.items() if p != busy_part)
    from_busy = [e for e in taken if partition_for(ws.id, e.user_id or "", parts) == busy_part]
    assert len(from_busy) >= limit - quiet - share  # the room the quiet ones left went to the busy one
    # One partition alone gives up to the whole limit.
    with container.db.read() as conn:
        alone = tracking.pending_events(conn, [busy_part], limit)
    assert [e.seq for e in alone] == by_partition[busy_part][:limit]


def test_a_pass_drains_a_backlog_spread_over_partitions_in_batches(container: Container) -> None:
    """700 events of 30 people: one pass takes batch after batch (``batch_size`` events in
    a transaction) until its time budget is spent; every person's count comes out right."""
    ws = make_workspace(container)
    calls = [
        {"type": "track", "userId": f"u{i % 30}", "event": "E", "messageId": f"m{i}"} for i in range(700)
    ]
    send(container, ws.id, *calls, drain=False)
    assert container.worker.run_once() >= container.settings.pipeline.batch_size
    container.worker.drain()
    with container.db.read() as conn:
        assert pipeline.count_pending(conn) == 0
        for i in range(30):
            assert profiles.lookup(conn, ws.id, user_id=f"u{i}").event_count == len(range(i, 700, 30))


def test_steps_run_at_most_every_interval_while_events_keep_coming(container: Container) -> None:
    ws = make_workspace(container)
    ran: list[int] = []

    def step() -> int:
        ran.append(1)
        return 0

    container.worker.steps = [step]
    container.worker.steps_interval_seconds = 3600.0
    send(container, ws.id, {"type": "track", "userId": "a", "event": "E", "messageId": "1"}, drain=False)
    container.worker.run_once()
    assert ran == [1]  # the first pass runs them
    send(container, ws.id, {"type": "track", "userId": "a", "event": "E", "messageId": "2"}, drain=False)
    container.worker.run_once()
    assert ran == [1]  # events applied, interval not over: not again
    container.worker.run_once()
    assert ran == [1, 1]  # nothing applied: at once
    container.worker.steps_interval_seconds = 0.0
    send(container, ws.id, {"type": "track", "userId": "a", "event": "E", "messageId": "3"}, drain=False)
    container.worker.run_once()
    assert ran == [1, 1, 1]


def test_pending_partitions_probe_only_the_candidates(container: Container) -> None:
    ws = make_workspace(container)
    parts = container.settings.pipeline.partitions
    send(container, ws.id, {"type": "track", "userId": "x", "event": "E", "messageId": "1"}, drain=False)
    send(container, ws.id, {"type": "track", "userId": "y", "event": "E", "messageId": "2"}, drain=False)
    px, py = partition_for(ws.id, "x", parts), partition_for(ws.id, "y", parts)
    with container.db.read() as conn:
        assert pipeline.pending_partitions(conn, range(parts)) == sorted({px, py})
        assert pipeline.pending_partitions(conn, [px]) == [px]
        others = [p for p in range(parts) if p not in (px, py)]
        assert pipeline.pending_partitions(conn, others) == []
        assert pipeline.pending_partitions(conn, []) == []
    container.worker.drain()
    with container.db.read() as conn:
        assert pipeline.pending_partitions(conn, range(parts)) == []


def test_the_dispatcher_is_woken_after_each_group_not_at_the_end_of_the_pass(
    container: Container, clock: ManualClock
) -> None:
    """Outbox jobs a pipeline group committed are taken while the pass goes on: here a
    step of the pass waits for the background work, which only a wake sent after the
    group can start (a wake at the end of the pass would come after the step)."""
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        *({"type": "track", "userId": f"u{i}", "event": "E", "messageId": f"w{i}"} for i in range(5)),
        drain=False,
    )
    background_ran = threading.Event()
    step_saw_it: list[bool] = []

    def background() -> int:
        background_ran.set()
        return 0

    def step() -> int:
        step_saw_it.append(background_ran.wait(10))
        return 0

    worker = PipelineWorker(
        db=container.db,
        clock=clock,
        settings=PipelineSettings(
            partitions=container.settings.pipeline.partitions, poll_interval_seconds=30
        ),
        secret=container.secret,
        steps=[step],
        background=[background],
    )
    worker._background_thread = threading.Thread(target=worker._background_loop, daemon=True)
    worker._background_thread.start()
    background_ran.wait(5)  # the loop's first round, before any event
    background_ran.clear()
    try:
        assert worker.run_once(background=False) == 5
    finally:
        worker.stop()
    assert step_saw_it == [True]


def test_an_idle_worker_sleeps_until_the_next_timer_not_a_whole_poll(
    container: Container, clock: ManualClock
) -> None:
    worker = container.worker
    poll = container.settings.pipeline.poll_interval_seconds
    assert worker._idle_wait() == poll  # nothing waits
    due_in: list[float | None] = [0.05]
    worker.next_due.append(lambda: due_in[0])
    try:
        assert worker._idle_wait() == pytest.approx(0.052)
        due_in[0] = poll * 10
        assert worker._idle_wait() == poll
        due_in[0] = 0.0  # due, yet the pass did not take it: no spinning
        assert worker._idle_wait() == poll
    finally:
        worker.next_due.pop()


def test_a_backlog_is_taken_in_larger_groups_until_one_comes_back_short(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a group comes back full the next takes ``backlog_batch_size`` events (a
    backlog's transactions share their fixed costs among more events); after a short one,
    ``batch_size`` again. Every event is applied once, in order per person."""
    settings = container.settings.pipeline
    assert (settings.batch_size, settings.backlog_batch_size) == (100, 400)
    limits: list[tuple[int, int]] = []
    original = pipeline.process_partitions

    def recorded(*args: Any, **kwargs: Any) -> pipeline.BatchOutcome:
        out: pipeline.BatchOutcome = original(*args, **kwargs)
        limits.append((kwargs["limit"], out.processed + out.suppressed))
        return out

    monkeypatch.setattr(pipeline, "process_partitions", recorded)  # as the worker calls it
    container.worker.pass_budget_seconds = 3600.0  # one pass takes the whole backlog
    ws = make_workspace(container)
    calls = [
        {"type": "track", "userId": f"u{i % 30}", "event": "E", "messageId": f"m{i}"} for i in range(1000)
    ]
    send(container, ws.id, *calls, drain=False)
    while container.worker.run_once(background=False):
        pass
    # A group reads "about" its limit (each partition's share is rounded up), so "full"
    # is at least the limit.
    assert limits[0][0] == 100
    for (limit, got), (next_limit, _) in itertools.pairwise(limits):
        assert next_limit == (400 if got >= limit else 100)
    assert sum(got for _, got in limits) == 1000
    assert sum(1 for limit, _ in limits if limit == 400) >= 2
    assert limits[-1][1] < limits[-1][0]
    limits.clear()
    send(container, ws.id, {"type": "track", "userId": "u1", "event": "E", "messageId": "late"}, drain=False)
    container.worker.run_once(background=False)
    assert limits == [(100, 1)]  # after a short group: batch_size again
    with container.db.read() as conn:
        assert pipeline.count_pending(conn) == 0
        for i in range(30):
            expected = len(range(i, 1000, 30)) + (1 if i == 1 else 0)
            assert profiles.lookup(conn, ws.id, user_id=f"u{i}").event_count == expected
