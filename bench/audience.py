"""Audience: segment and score maintenance per event, a full recompute, and a million
windows ending in the same minute.

    python -m bench.audience                  # SQLite and PostgreSQL, 1M profiles, 10M events (~25 min)
    python -m bench.audience --quick          # 20,000 profiles, 200,000 events, small log (~2 min)
    python -m bench.audience --db sqlite --part incremental
    python -m bench.audience --db postgres --profiles 200000

Per database (a SQLite file in a private temporary folder, or a fresh PostgreSQL database
``wt_bench_<random>_audience``; both built by the real migrations and removed at the end):

1. **Incremental** (goal: 50,000 events/s on one core, excluding HTTP). Two workspaces get
   the same prepared log (``--log-profiles`` people identified with traits, then
   ``--log-events`` track events over 12 names, appended with
   ``tracking.service.append``): workspace A has 100 segments (every condition kind, 33
   of them time-dependent) and 2 scoring models (one decaying) and a lifecycle;
   workspace B has none. Each log is processed as the worker processes it
   (``pipeline.process_partitions``: 100 events of the busy partitions a transaction, 400
   while groups come back full,
   until nothing is pending: the system events the batches emit, such as ``Segment
   Entered``, are processed too and counted). Printed: events/s of the track events
   in A (the figure) and in B (the same pipeline without audience work), the time per
   event spent in ``segments.on_change`` and ``scoring.on_event``, and the rate of the
   pure part alone: for every event of the log, the segments its change affects are
   evaluated (``evaluate`` and, when time-dependent, ``next_change``) on views held in
   memory.
2. **Recompute** (goal: under 30 s over 1,000,000 profiles and 10,000,000 events). A
   bulk load (setup, not the product: SQLite executemany in transactions of 200,000
   rows, PostgreSQL COPY) writes ``--profiles`` profiles with traits and a user id, and
   ``--events-per-profile`` processed track events each, into the real tables. Then
   ``segments.save_segment`` (the product's path, announcing through
   ``pipeline.announce``) creates a time-dependent segment; its time is the figure.
   The ratio divides it by a plain ``SELECT count(*)`` of the same rows (the
   workspace's profiles and events) measured in the same run. Saving it again (nothing
   changes) is printed too. A sample of 500 profiles is checked against the evaluator.
3. **Expiry** (goal: 1,000,000 profiles whose window ends in the same minute leave within
   60 s). Every profile has one ``Trial Started`` event inside one minute; a segment
   "Trial Started within the last 14 days" is saved (everyone enters: printed, as a
   recompute with a million entries), then the clock is set just after the minute in
   which the windows end and ``segments.timer_step`` (the worker's step, with its default
   batch) runs in a loop until no timer is due. The figure is the time until the last
   batch committed; every profile must have left (members, open history rows and
   ``Segment Exited`` events are counted). With ``--expiry-workers N`` on PostgreSQL, N
   processes run the step at once, as N ``whenthen worker`` processes share the due
   timers (``FOR UPDATE SKIP LOCKED``).

Nothing is asserted: figures, goals and ratios are printed. The exit code is 0 when the
run completed (goals met or not), 1 when a part failed, 2 when ``--db postgres`` finds no
server. The machine has 2 cores shared with other work: the load of the machine is
printed per phase (``other`` = cores busy beyond this process and PostgreSQL), and a
phase where other processes took more than 0.15 core is flagged.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random  # noqa: TID251 (seeded data for the bench; a hash per value would cost more than the load)
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import sqlite as sqlite_dialect

from bench.targets import (
    DEFAULT_POSTGRES,
    Target,
    choose_databases,
    machine_busy_seconds,
    postgres_cpu_seconds,
    python_loop_seconds,
    target_makers,
)
from whenthen import pipeline, scoring, tracking, workspaces
from whenthen.kernel.bucketing import partition_for
from whenthen.kernel.clock import ManualClock
from whenthen.pipeline import service as pipeline_service
from whenthen.profiles.tables import identities, profiles
from whenthen.segments import service as segments
from whenthen.segments.evaluator import evaluate, next_change
from whenthen.segments.tables import segment_history, segment_members, segment_timers
from whenthen.settings import PipelineSettings
from whenthen.storage import Database
from whenthen.storage.migrate import upgrade
from whenthen.tracking import service as tracking_service
from whenthen.tracking.tables import events
from whenthen.worker.heap import freeze_start_up_heap

INCREMENTAL_GOAL = 50_000.0  # events/s
RECOMPUTE_GOAL = 30.0  # s
EXPIRY_GOAL = 60.0  # s
QUIET = 0.15  # cores other processes may use before a phase is flagged
PARTITIONS = 64
#: Events per pipeline transaction, as the worker takes them (``PipelineSettings``).
BATCH = PipelineSettings().batch_size
BACKLOG_BATCH = PipelineSettings().backlog_limit
SECRET = b"bench-audience-secret"
OWNER = "bench-audience"  # the pipeline leases' owner
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
#: The minute in which every "Trial Started" happened, a day before NOW.
TRIAL_MINUTE = NOW - timedelta(days=1)
LOAD_CHUNK = 200_000

NAMES = [
    "Page Viewed",
    "Product Viewed",
    "Added to Cart",
    "Order Completed",
    "Email Opened",
    "Email Link Clicked",
    "Signed Up",
    "Login",
    "Search",
    "Support Ticket",
    "Demo Requested",
    "Webinar Attended",
]
PAGES = ["Pricing", "Home", "Docs", "Blog", "Careers"]
PLANS = ["free", "pro", "team", "enterprise"]
COUNTRIES = ["DE", "FR", "AT", "US", "GB", "JP", "BR"]
STAGES = ["subscriber", "lead", "mql", "sql", "customer"]

# ---- output ---------------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, flush=True)


def _rate(n: float) -> str:
    return f"{n:,.0f}"


_VERDICTS: list[bool] = []  # every goal report() judged, so main's exit status says it


def _mark(ok: bool) -> str:
    _VERDICTS.append(ok)
    return "MET" if ok else "NOT MET"


@dataclass
class Load:
    """Cores busy during a phase: this process, PostgreSQL, and everything else."""

    seconds: float
    bench: float
    postgres: float
    other: float

    @property
    def disturbed(self) -> bool:
        return self.other > QUIET

    def line(self) -> str:
        flag = "  WARNING: other processes took CPU, figures are low" if self.disturbed else ""
        return f"cores: bench {self.bench:.2f}, postgres {self.postgres:.2f}, other {self.other:.2f}{flag}"


@contextmanager
def measured(out: list[Load]) -> Iterator[list[float]]:
    """Measure the cores busy during the block. It may add CPU seconds of the bench's
    own helper processes to the list it is given (counted as the bench's)."""
    helpers: list[float] = []
    busy0, _ = machine_busy_seconds()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    pg0 = postgres_cpu_seconds()
    t0 = time.perf_counter()
    yield helpers
    wall = time.perf_counter() - t0
    busy1, _ = machine_busy_seconds()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    pg1 = postgres_cpu_seconds()
    mine = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) + sum(helpers)
    pg = pg1 - pg0
    other = max(0.0, (busy1 - busy0) - mine - pg)
    w = max(wall, 1e-9)
    out.append(Load(wall, mine / w, pg / w, other / w))


# ---- segment definitions ----------------------------------------------------------------


def definitions(n: int = 100) -> list[dict[str, Any]]:
    """``n`` segments over every condition kind, a third of them time-dependent."""
    rng = random.Random(4)
    out: list[dict[str, Any]] = []

    def ev(**kw: Any) -> dict[str, Any]:
        return {"kind": "event", **kw}

    makers: list[Callable[[int], dict[str, Any]]] = [
        lambda i: ev(event=NAMES[i % 12], at_least=1 + i % 3, within_last=f"{1 + i % 30}d"),
        lambda i: ev(event="Page Viewed", where=[{"path": "name", "value": PAGES[i % 5]}], at_least=2),
        lambda i: {"kind": "trait", "path": "plan", "op": "in", "value": PLANS[: 1 + i % 4]},
        lambda i: {
            "kind": "and",
            "conditions": [
                {"kind": "trait", "path": "country", "value": COUNTRIES[i % 7]},
                ev(event=NAMES[(i + 3) % 12]),
            ],
        },
        lambda i: {
            "kind": "score",
            "model": "interest" if i % 2 else "engagement",
            "op": "gte",
            "value": 5 + i % 20,
        },
        lambda i: {"kind": "stage", "in": STAGES[i % 5 :]},
        lambda i: {"kind": "tag", "tag": f"tag-{i % 4}"},
        lambda i: {"kind": "list", "list": f"list-{i % 3}"},
        lambda i: {
            "kind": "sequence",
            "first": {"event": "Added to Cart"},
            "then_not": {"event": "Order Completed"},
            "within": f"{1 + i % 3}h",
        },
        lambda i: {
            "kind": "last_performed",
            "event": NAMES[i % 12],
            "op": "within_last",
            "value": f"{1 + i % 7}d",
        },
        lambda i: {"kind": "not", "condition": ev(event=NAMES[(i + 5) % 12], within_last="30d")},
        lambda i: {
            "kind": "or",
            "conditions": [
                {"kind": "trait", "path": "age", "op": "gte", "value": 20 + i % 40},
                ev(event="Order Completed", where=[{"path": "total", "op": "gt", "value": 10 * (i % 9)}]),
            ],
        },
        lambda i: {"kind": "engagement", "action": "opened", "message_id": f"msg-{i % 5}"},
        lambda i: {"kind": "trait", "path": "signed_up_at", "op": "within_last", "value": f"{1 + i % 20}d"},
        lambda i: ev(event=NAMES[i % 12], exactly=1 + i % 2),
    ]
    for i in range(n):
        out.append({"condition": makers[i % len(makers)](i + rng.randrange(3))})
    return out


MODELS: list[dict[str, Any]] = [
    {
        "key": "interest",
        "name": "Product interest",
        "rules": [
            {
                "id": "pricing",
                "event": "Page Viewed",
                "where": [{"path": "name", "value": "Pricing"}],
                "points": 5,
            },
            {"id": "demo", "event": "Demo Requested", "points": 20},
            {"id": "cart", "event": "Added to Cart", "points": 3, "cap": {"points": 9, "period": "1d"}},
            {"id": "pro", "trait": "plan", "value": "pro", "points": 10},
        ],
        "decay": {"half_life": "7d"},
        "thresholds": [25, 50],
    },
    {
        "key": "engagement",
        "name": "Engagement",
        "rules": [
            {"id": "open", "event": "Email Opened", "points": 1},
            {"id": "click", "event": "Email Link Clicked", "points": 2},
            {"id": "webinar", "event": "Webinar Attended", "points": 10},
        ],
        "thresholds": [10],
    },
]
LIFECYCLE: dict[str, Any] = {
    "stages": STAGES,
    "rules": [
        {"stage": "lead", "event": "Signed Up"},
        {"stage": "mql", "event": "Demo Requested"},
        {"stage": "customer", "event": "Order Completed"},
    ],
}


def _properties(rng: random.Random, name: str) -> dict[str, Any]:
    if name == "Page Viewed":
        return {"name": rng.choice(PAGES)}
    if name == "Order Completed":
        return {"total": rng.randrange(5, 200), "currency": "EUR"}
    if name in ("Email Opened", "Email Link Clicked"):
        return {
            "message_id": f"msg-{rng.randrange(5)}",
            "journey_id": "jrn-1",
            "url": "https://x.test/pricing",
        }
    if name in ("Product Viewed", "Added to Cart"):
        return {"sku": f"sku-{rng.randrange(50)}", "price": rng.randrange(5, 90)}
    return {}


# ---- part 1: incremental ------------------------------------------------------------------


@dataclass
class Incremental:
    profiles: int = 0
    track_events: int = 0
    segments: int = 0
    processed: int = 0
    seconds: float = 0.0
    events_per_second: float = 0.0
    baseline_processed: int = 0
    baseline_seconds: float = 0.0
    baseline_events_per_second: float = 0.0
    segments_us: float = 0.0
    scoring_us: float = 0.0
    #: the same in CPU time of the thread (steadier than the wall clock on a shared machine)
    segments_cpu_us: float = 0.0
    scoring_cpu_us: float = 0.0
    entries_exits: int = 0
    pure_events_per_second: float = 0.0
    pure_evaluations: int = 0
    load: list[Load] = field(default_factory=list)


def _accepted(ws: str, calls: list[dict[str, Any]]) -> list[tracking.AcceptedEvent]:
    out = []
    for c in calls:
        out.append(
            tracking.AcceptedEvent(
                message_id=c["messageId"],
                type=tracking.CallType(c["type"]),
                event=c.get("event"),
                user_id=c["userId"],
                anonymous_id=None,
                timestamp=c["ts"],
                received_at=c["ts"],
                payload={k: v for k, v in c.items() if k != "ts"} | {"timestamp": c["ts"].isoformat()},
            )
        )
    return out


def _log(profiles: int, track_events: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(identify calls, track calls): the same for both workspaces."""
    rng = random.Random(7)
    start = NOW - timedelta(hours=3)
    identifies = []
    for i in range(profiles):
        identifies.append(
            {
                "type": "identify",
                "userId": f"user-{i}",
                "messageId": f"id-{i}",
                "traits": {
                    "email": f"user-{i}@example.com",
                    "plan": rng.choice(PLANS),
                    "country": rng.choice(COUNTRIES),
                    "age": rng.randrange(18, 80),
                    "signed_up_at": (NOW - timedelta(days=rng.randrange(0, 40))).isoformat(),
                },
                "ts": start + timedelta(microseconds=i),
            }
        )
    tracks = []
    step = timedelta(hours=2) / max(track_events, 1)
    for k in range(track_events):
        name = rng.choice(NAMES)
        tracks.append(
            {
                "type": "track",
                "userId": f"user-{rng.randrange(profiles)}",
                "messageId": f"tr-{k}",
                "event": name,
                "properties": _properties(rng, name),
                "ts": start + timedelta(minutes=30) + step * k,
            }
        )
    return identifies, tracks


def _drain(db: Database) -> int:
    """Process every pending event as the worker does (``PipelineWorker.run_once``): the
    partitions with pending events, their oldest events in one transaction
    (``pipeline.process_partitions``, under the bench's leases), ``batch_size`` of them,
    or ``backlog_batch_size`` after a group came back full, until none is pending.
    Returns how many were processed."""
    now = NOW
    with db.write() as conn:
        owned = pipeline_service.claim(conn, OWNER, range(PARTITIONS), now=now, lease=timedelta(hours=1))
    total = 0
    limit = BATCH
    while True:
        with db.read() as conn:
            busy = pipeline.pending_partitions(conn, owned)
        if not busy:
            return total
        while True:  # as a pass: groups until one comes back short
            with db.write() as conn:
                out = pipeline_service.process_partitions(
                    conn, OWNER, busy, limit=limit, secret=SECRET, now=now, partitions=PARTITIONS
                )
            n = out.processed + out.suppressed
            total += n
            full = n >= limit
            limit = BACKLOG_BATCH if full else BATCH
            if not full:
                break


def _append(db: Database, ws: str, calls: list[dict[str, Any]]) -> None:
    for i in range(0, len(calls), 1000):
        with db.write() as conn:
            tracking_service.append(conn, ws, _accepted(ws, calls[i : i + 1000]), partitions=PARTITIONS)


@contextmanager
def _timing(module: Any, name: str, spent: list[float]) -> Iterator[None]:
    """Time every call of ``module.name`` (restored afterwards): ``spent`` is [wall
    seconds, CPU seconds of the calling thread]."""
    original = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += time.thread_time() - c0

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, original)


def bench_incremental(args: argparse.Namespace, target: Target) -> Incremental:
    result = Incremental(profiles=args.log_profiles, track_events=args.log_events)
    db = Database(target.fresh("incremental"), sqlite_synchronous=target.synchronous)
    try:
        upgrade(db)
        with db.write() as conn:
            ws_a = workspaces.create_workspace(conn, "audience", now=NOW).id
            ws_b = workspaces.create_workspace(conn, "baseline", now=NOW).id
            for m in MODELS:
                scoring.save_model(conn, ws_a, m, now=NOW)
            scoring.save_lifecycle(conn, ws_a, LIFECYCLE, now=NOW)
            for n, d in enumerate(definitions()):
                segments.save_segment(conn, ws_a, f"seg-{n:03d}", f"Segment {n}", d, NOW)
            result.segments = len(segments.all_segments(conn, ws_a))
        identifies, tracks = _log(args.log_profiles, args.log_events)
        _say(
            f"  incremental: {result.segments} segments, {len(MODELS)} scoring models; "
            f"{len(identifies):,} people, {len(tracks):,} track events"
        )
        for ws, label in ((ws_a, "audience"), (ws_b, "baseline")):
            _append(db, ws, identifies)
            _drain(db)
            _append(db, ws, tracks)
            seg_spent, score_spent = [0.0, 0.0], [0.0, 0.0]  # wall, CPU
            with (
                _timing(segments, "on_change", seg_spent),
                _timing(scoring, "on_event", score_spent),
                measured(result.load),
            ):
                # As ``whenthen worker`` freezes its start-up heap: the bench's own objects
                # (the log, the definitions) are not in a worker's heap, and a full
                # collection walking them fell inside the timed part.
                freeze_start_up_heap()
                t0 = time.perf_counter()
                processed = _drain(db)
                elapsed = time.perf_counter() - t0
            if label == "audience":
                result.processed, result.seconds = processed, elapsed
                result.events_per_second = processed / elapsed
                result.segments_us = seg_spent[0] / processed * 1e6
                result.scoring_us = score_spent[0] / processed * 1e6
                result.segments_cpu_us = seg_spent[1] / processed * 1e6
                result.scoring_cpu_us = score_spent[1] / processed * 1e6
            else:
                result.baseline_processed, result.baseline_seconds = processed, elapsed
                result.baseline_events_per_second = processed / elapsed
            _say(
                f"    {label}: {processed:,} events (with the system events they emitted) in {elapsed:.2f} s"
                f" = {_rate(processed / elapsed)} events/s; {result.load[-1].line()}"
            )
        with db.read() as conn:
            result.entries_exits = int(
                conn.execute(
                    select(func.count()).where(
                        events.c.workspace_id == ws_a, events.c.event.in_([segments.ENTERED, segments.EXITED])
                    )
                ).scalar_one()
            )
        _say(
            f"    in segments.on_change {result.segments_us:,.0f} µs/event"
            f" ({result.segments_cpu_us:,.0f} CPU),"
            f" scoring.on_event {result.scoring_us:,.0f} µs/event ({result.scoring_cpu_us:,.0f} CPU);"
            f" {result.entries_exits:,} entries and exits announced"
        )
        result.pure_events_per_second, result.pure_evaluations = _pure(db, ws_a, tracks, result.load)
        _say(
            f"    pure evaluation: {result.pure_evaluations:,} segment evaluations"
            f" for {len(tracks):,} events,"
            f" {_rate(result.pure_events_per_second)} events/s; {result.load[-1].line()}"
        )
    finally:
        db.dispose()
    return result


def _pure(db: Database, ws: str, tracks: list[dict[str, Any]], loads: list[Load]) -> tuple[float, int]:
    """The evaluator's share alone: for each track event, the segments its change affects
    are evaluated (and ``next_change`` when time-dependent) on views held in memory."""
    with db.read() as conn:
        segs = segments.all_segments(conn, ws)
        lives = segments.half_lives_of(conn, ws)
        models = scoring.models(conn, ws)
        lifecycle = scoring.lifecycle_of(conn, ws)
        owner = {
            r.value: r.profile_id
            for r in conn.execute(
                select(identities.c.value, identities.c.profile_id).where(
                    identities.c.workspace_id == ws, identities.c.kind == "user_id"
                )
            )
        }
        views = segments.load_views(conn, ws, sorted(set(owner.values())), lives)
    # As the pipeline's relevance rule (``pipeline.service._change``): a score segment is
    # re-evaluated when the event stored a new score, the stage ones when the stage moved.
    # Here: the models with a rule on the event's name (a trait rule awards once, at a
    # person's first event), and the stage when the lifecycle has a rule on it (an upper
    # bound: a rule to a stage already passed moves nothing).
    changes: dict[str, segments.Change] = {}
    for name in NAMES:
        changes[name] = segments.Change(
            event=name,
            scores=frozenset(m.key for m in models if any(r.event == name for r in m.rules)),
            stage=lifecycle is not None and any(r.event == name for r in lifecycle.rules),
        )
    affected = {name: [s for s in segs if c.affects(s)] for name, c in changes.items()}
    evaluations = 0
    # The bench's heap frozen first, as above: one full collection walking it inside the
    # loop (~90 ms) had halved this figure.
    freeze_start_up_heap()
    with measured(loads):
        t0 = time.perf_counter()
        for call in tracks:
            view = views[owner[call["userId"]]]
            for seg in affected[call["event"]]:
                evaluate(seg.definition, view, NOW)
                if seg.timed:
                    next_change(seg.definition, view, NOW)
                evaluations += 1
        elapsed = time.perf_counter() - t0
    return len(tracks) / elapsed, evaluations


# ---- bulk load -----------------------------------------------------------------------------


PROFILE_COLUMNS = [
    "id",
    "workspace_id",
    "traits",
    "trait_times",
    "email",
    "first_seen",
    "last_seen",
    "event_count",
    "created_at",
    "updated_at",
    "version",
]
IDENTITY_COLUMNS = ["workspace_id", "kind", "value", "profile_id", "created_at"]
EVENT_COLUMNS = [
    "workspace_id",
    "message_id",
    "type",
    "event",
    "user_id",
    "timestamp",
    "received_at",
    "payload",
    "partition",
    "state",
    "profile_id",
]


def _sqlite_time(t: datetime) -> str:
    return t.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _pg_time(t: datetime) -> str:
    return t.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds") + "+00"


def _check_time_format() -> None:
    """The SQLite text written here must be what SQLAlchemy writes (the compiler compares
    stored times as text)."""
    d = sqlite_dialect.dialect()
    bind = events.c.timestamp.type.dialect_impl(d).bind_processor(d)
    assert bind is not None
    for t in (NOW, NOW + timedelta(microseconds=7)):
        if bind(t) != _sqlite_time(t):
            raise RuntimeError(f"SQLite time format differs: {bind(t)!r} != {_sqlite_time(t)!r}")


class Population:
    """``profiles`` people with a user id, traits and ``per_profile`` processed track events
    (one of them ``Trial Started`` inside :data:`TRIAL_MINUTE`'s minute, the others over
    the 90 days before :data:`NOW`), written straight into the tables."""

    def __init__(self, db: Database, ws: str, profiles: int, per_profile: int) -> None:
        self.db, self.ws, self.profiles, self.per_profile = db, ws, profiles, per_profile
        self.kind = db.dialect.value
        self.rng = random.Random(11)
        self.props = {n: [orjson.dumps(_properties(self.rng, n)).decode() for _ in range(40)] for n in NAMES}

    @staticmethod
    def pid(i: int) -> str:
        return f"prf_{i:024x}"

    def _time(self, t: datetime) -> str:
        return _sqlite_time(t) if self.kind == "sqlite" else _pg_time(t)

    def _rows(
        self, start: int, stop: int
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        rng, ws, tm = self.rng, self.ws, self._time
        created = tm(NOW - timedelta(days=120))
        spread = timedelta(seconds=59) / max(self.profiles, 1)
        window = 90 * 86400 * 1_000_000
        profile_rows, identity_rows, event_rows = [], [], []
        for i in range(start, stop):
            pid, uid = self.pid(i), f"u{i:08d}"
            part = partition_for(ws, uid, PARTITIONS)
            traits = orjson.dumps(
                {
                    "email": f"{uid}@example.com",
                    "plan": PLANS[rng.randrange(4)],
                    "country": COUNTRIES[rng.randrange(7)],
                    "age": rng.randrange(18, 80),
                }
            ).decode()
            stamps = sorted(
                NOW - timedelta(microseconds=rng.randrange(window)) for _ in range(self.per_profile - 1)
            )
            trial = TRIAL_MINUTE + spread * i
            evs = sorted([(t, NAMES[rng.randrange(12)]) for t in stamps] + [(trial, "Trial Started")])
            profile_rows.append(
                (
                    pid,
                    ws,
                    traits,
                    "{}",
                    f"{uid}@example.com",
                    tm(evs[0][0]),
                    tm(evs[-1][0]),
                    len(evs),
                    created,
                    created,
                    1,
                )
            )
            identity_rows.append((ws, "user_id", uid, pid, created))
            for k, (t, name) in enumerate(evs):
                mid = f"m{i:08d}-{k}"
                props = self.props[name][rng.randrange(40)] if name in self.props else "{}"
                ts = tm(t)
                payload = (
                    f'{{"type":"track","event":"{name}","userId":"{uid}","messageId":"{mid}",'
                    f'"properties":{props},"timestamp":"{t.isoformat()}"}}'
                )
                event_rows.append((ws, mid, "track", name, uid, ts, ts, payload, part, 1, pid))
        return profile_rows, identity_rows, event_rows

    def load(self) -> float:
        """Write everything; returns the seconds taken."""
        t0 = time.perf_counter()
        step = max(1, LOAD_CHUNK // self.per_profile)
        for start in range(0, self.profiles, step):
            rows = self._rows(start, min(self.profiles, start + step))
            with self.db.write() as conn:
                self._write(conn, *rows)
            done = min(self.profiles, start + step)
            if done % (step * 10) == 0 or done == self.profiles:
                _say(
                    f"    loaded {done:,} profiles, {done * self.per_profile:,} events"
                    f" ({time.perf_counter() - t0:.0f} s)"
                )
        if self.kind == "postgresql":
            with self.db.write() as conn:
                for t in ("profiles", "identities", "events"):
                    conn.exec_driver_sql(f"ANALYZE {t}")
        return time.perf_counter() - t0

    def _write(
        self,
        conn: Connection,
        profile_rows: list[tuple[Any, ...]],
        identity_rows: list[tuple[Any, ...]],
        event_rows: list[tuple[Any, ...]],
    ) -> None:
        raw = conn.connection.driver_connection
        assert raw is not None
        tables = (
            ("profiles", PROFILE_COLUMNS, profile_rows),
            ("identities", IDENTITY_COLUMNS, identity_rows),
            ("events", EVENT_COLUMNS, event_rows),
        )
        if self.kind == "postgresql":
            with raw.cursor() as cur:
                for table, cols, rows in tables:
                    with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                        copy.write("".join(_copy_line(r) for r in rows))
            return
        cur = raw.cursor()
        try:
            for table, cols, rows in tables:
                marks = ", ".join("?" * len(cols))
                cur.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows)
        finally:
            cur.close()


def _copy_line(row: Sequence[Any]) -> str:
    return "\t".join("\\N" if v is None else str(v).replace("\\", "\\\\") for v in row) + "\n"


# ---- parts 2 and 3: recompute and expiry -----------------------------------------------------

RECOMPUTED: dict[str, Any] = {
    "condition": {
        "kind": "or",
        "conditions": [
            {
                "kind": "event",
                "event": "Order Completed",
                "where": [{"path": "total", "op": "gt", "value": 50}],
                "at_least": 2,
                "within_last": "30d",
            },
            {
                "kind": "and",
                "conditions": [
                    {"kind": "trait", "path": "plan", "op": "in", "value": ["pro", "team"]},
                    {"kind": "event", "event": "Page Viewed", "within_last": "7d"},
                ],
            },
        ],
    }
}
TRIAL: dict[str, Any] = {"condition": {"kind": "event", "event": "Trial Started", "within_last": "14d"}}


@dataclass
class PopulationResult:
    profiles: int = 0
    events: int = 0
    load_seconds: float = 0.0
    count_seconds: float = 0.0
    recompute_seconds: float = 0.0
    recompute_entered: int = 0
    recompute_timers: int = 0
    again_seconds: float = 0.0
    sample_agrees: str = ""
    trial_save_seconds: float = 0.0
    trial_entered: int = 0
    expiry_seconds: float = 0.0
    expiry_workers: int = 1
    expiry_batches: int = 0
    expiry_batch_size: int = 0
    expiry_first_batch: float = 0.0
    left: int = 0
    still_members: int = 0
    open_stays: int = 0
    exited_events: int = 0
    load: list[Load] = field(default_factory=list)


def _plain_count(db: Database, ws: str) -> float:
    with db.read() as conn:
        t0 = time.perf_counter()
        conn.execute(select(func.count()).select_from(events).where(events.c.workspace_id == ws)).scalar_one()
        conn.execute(
            select(func.count()).select_from(profiles).where(profiles.c.workspace_id == ws)
        ).scalar_one()
        return time.perf_counter() - t0


def _count(conn: Connection, stmt: Any) -> int:
    return int(conn.execute(stmt).scalar_one())


def _agrees(db: Database, ws: str, key: str, population: Population, sample: int = 500) -> str:
    """Membership of a sample of profiles against the evaluator on their stored views."""
    rng = random.Random(3)
    ids = sorted({population.pid(rng.randrange(population.profiles)) for _ in range(sample)})
    with db.read() as conn:
        seg = segments.get_segment(conn, ws, key)
        lives = segments.half_lives_of(conn, ws)
        views = segments.load_views(conn, ws, ids, lives)
        members = set(
            conn.execute(
                select(segment_members.c.profile_id).where(
                    segment_members.c.segment_id == seg.id, segment_members.c.profile_id.in_(ids)
                )
            ).scalars()
        )
    wrong = [p for p in ids if evaluate(seg.definition, views[p], NOW) != (p in members)]
    return f"{len(ids) - len(wrong)}/{len(ids)} agree" + (f" (e.g. {wrong[0]})" if wrong else "")


def bench_population(args: argparse.Namespace, target: Target) -> PopulationResult:
    result = PopulationResult(profiles=args.profiles, events=args.profiles * args.events_per_profile)
    url = target.fresh("audience")
    db = Database(url, sqlite_synchronous=target.synchronous)
    announce = functools.partial(pipeline_service.announce, partitions=PARTITIONS)
    try:
        upgrade(db)
        with db.write() as conn:
            ws = workspaces.create_workspace(conn, "audience", now=NOW).id
        population = Population(db, ws, args.profiles, args.events_per_profile)
        _say(f"  bulk load (setup): {args.profiles:,} profiles, {result.events:,} events")
        with measured(result.load):
            result.load_seconds = population.load()
        _say(
            f"    {result.load_seconds:.1f} s = {_rate(result.events / result.load_seconds)} events/s;"
            f" {result.load[-1].line()}"
        )
        counts = [_plain_count(db, ws) for _ in range(2)]
        with measured(result.load):
            t0 = time.perf_counter()
            with db.write() as conn:
                _, moved = segments.save_segment(
                    conn, ws, "buyers", "Buyers", RECOMPUTED, NOW, announce=announce
                )
            result.recompute_seconds = time.perf_counter() - t0
        result.recompute_entered = moved["entered"]
        with db.read() as conn:
            result.recompute_timers = _count(conn, select(func.count()).select_from(segment_timers))
        counts.append(_plain_count(db, ws))
        result.count_seconds = min(counts)
        _say(
            f"  recompute: {result.recompute_seconds:.2f} s, {result.recompute_entered:,} entered,"
            f" {result.recompute_timers:,} timers; plain count {result.count_seconds:.2f} s"
            f" (ratio {result.recompute_seconds / result.count_seconds:.1f}); {result.load[-1].line()}"
        )
        with measured(result.load):
            t0 = time.perf_counter()
            with db.write() as conn:
                segments.save_segment(conn, ws, "buyers", "Buyers", RECOMPUTED, NOW, announce=announce)
            result.again_seconds = time.perf_counter() - t0
        result.sample_agrees = _agrees(db, ws, "buyers", population)
        _say(f"    saved again (no change): {result.again_seconds:.2f} s; sample: {result.sample_agrees}")
        if args.part in ("all", "expiry"):
            _expiry(db, ws, result, announce, url, args.expiry_workers if target.kind == "postgres" else 1)
    finally:
        db.dispose()
    return result


def _expiry(db: Database, ws: str, result: PopulationResult, announce: Any, url: str, workers: int) -> None:
    with measured(result.load):
        t0 = time.perf_counter()
        with db.write() as conn:
            seg, moved = segments.save_segment(
                conn, ws, "trial", "Trial in its first two weeks", TRIAL, NOW, announce=announce
            )
        result.trial_save_seconds = time.perf_counter() - t0
    result.trial_entered = moved["entered"]
    _say(
        f"  expiry: saved, {result.trial_entered:,} entered in {result.trial_save_seconds:.1f} s;"
        f" {result.load[-1].line()}"
    )
    # Just after the minute in which every window ends.
    clock = ManualClock(TRIAL_MINUTE + timedelta(days=14, minutes=1, microseconds=1))
    limit = _default_limit()
    result.expiry_batch_size = limit
    result.expiry_workers = workers
    if workers > 1:
        _expiry_in_processes(url, clock.now(), result, workers)
    else:
        with measured(result.load):
            t0 = time.perf_counter()
            while True:
                n = segments.timer_step(db, clock, segments.no_emit, announce=announce)
                if not n:
                    break
                result.expiry_batches += 1
                if result.expiry_batches == 1:
                    result.expiry_first_batch = time.perf_counter() - t0
            result.expiry_seconds = time.perf_counter() - t0
    with db.read() as conn:
        result.still_members = _count(
            conn,
            select(func.count()).select_from(segment_members).where(segment_members.c.segment_id == seg.id),
        )
        result.open_stays = _count(
            conn,
            select(func.count())
            .select_from(segment_history)
            .where(segment_history.c.segment_id == seg.id, segment_history.c.exited_at.is_(None)),
        )
        result.left = _count(
            conn,
            select(func.count())
            .select_from(segment_history)
            .where(segment_history.c.segment_id == seg.id, segment_history.c.exited_at.is_not(None)),
        )
        result.exited_events = _count(
            conn, select(func.count()).where(events.c.workspace_id == ws, events.c.event == segments.EXITED)
        )
    _say(
        f"    {result.left:,} left in {result.expiry_seconds:.1f} s{_by_workers(result)}"
        f" ({result.expiry_batches} batches of"
        f" {limit:,}, first after {result.expiry_first_batch:.2f} s); still members {result.still_members:,},"
        f" open stays {result.open_stays:,}, Segment Exited events {result.exited_events:,};"
        f" {result.load[-1].line()}"
    )


def _expiry_worker(url: str, now: datetime, ready: Any, go: Any, out: Any, release: Any) -> None:
    """One of :func:`_expiry_in_processes`' processes: ``segments.timer_step`` in a loop,
    as one ``whenthen worker`` process runs it, until it finds nothing due it can claim
    (the others hold the rest: ``FOR UPDATE SKIP LOCKED``). It reports its batches'
    commit times and its CPU, then keeps its connection (so its server process's CPU is
    still there to be counted) until released."""
    db = Database(url)
    clock = ManualClock(now)
    announce = functools.partial(pipeline_service.announce, partitions=PARTITIONS)
    batches: list[float] = []  # perf_counter after each batch's commit
    cpu0 = 0.0
    try:
        with db.read() as conn:  # connected before the start, as a running worker is
            conn.execute(select(1))
        ready.put(True)
        go.wait()
        cpu0 = _cpu_seconds()
        while segments.timer_step(db, clock, segments.no_emit, announce=announce):
            batches.append(time.perf_counter())
    finally:
        out.put((batches, _cpu_seconds() - cpu0))
        release.wait(600)
        db.dispose()


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _expiry_in_processes(url: str, now: datetime, result: PopulationResult, workers: int) -> None:
    """The expiry fired by ``workers`` processes at once (PostgreSQL), as that many
    ``whenthen worker`` processes share the due timers. They are started and connected
    first; the figure runs from the signal to go until the last one finds nothing due.
    ``perf_counter`` is the same clock in every process on Linux (CLOCK_MONOTONIC)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, out, go, release = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=_expiry_worker, args=(url, now, ready, go, out, release)) for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        batches: list[float] = []
        with measured(result.load) as helpers:
            t0 = time.perf_counter()
            go.set()
            for _ in procs:
                done, cpu = out.get(timeout=3600)
                batches.extend(done)
                helpers.append(cpu)
            result.expiry_seconds = time.perf_counter() - t0
    finally:
        release.set()
        for proc in procs:
            proc.join()
    failed = [proc.exitcode for proc in procs if proc.exitcode]
    if failed:
        raise RuntimeError(f"expiry worker processes failed: exit codes {failed}")
    batches.sort()
    result.expiry_batches = len(batches)
    result.expiry_first_batch = batches[0] - t0 if batches else 0.0


def _by_workers(p: PopulationResult) -> str:
    return f" in {p.expiry_workers} worker processes" if p.expiry_workers > 1 else ""


def _default_limit() -> int:
    default = segments.timer_step.__kwdefaults__ or {}
    return int(default.get("limit", 0))


# ---- report ------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    kind: str
    incremental: Incremental | None = None
    population: PopulationResult | None = None
    failure: str | None = None


def report(results: list[Result]) -> None:
    _say("\n## Results\n")
    _say("| measure | " + " | ".join(r.label for r in results) + " | goal |")
    _say("|---|" + "---:|" * len(results) + "---|")

    def row(name: str, cell: Callable[[Result], str], goal: str = "") -> None:
        _say(f"| {name} | " + " | ".join(cell(r) for r in results) + f" | {goal} |")

    def inc(f: Callable[[Incremental], str]) -> Callable[[Result], str]:
        return lambda r: f(r.incremental) if r.incremental else "-"

    def pop(f: Callable[[PopulationResult], str]) -> Callable[[Result], str]:
        return lambda r: f(r.population) if r.population else "-"

    def flag(loads: list[Load]) -> str:
        return " (disturbed)" if any(x.disturbed for x in loads) else ""

    row(
        "pipeline with 100 segments + 2 models, events/s",
        inc(lambda i: f"{_rate(i.events_per_second)}{flag(i.load[:1])}"),
        f">= {_rate(INCREMENTAL_GOAL)}",
    )
    row("… ratio to the goal", inc(lambda i: f"{i.events_per_second / INCREMENTAL_GOAL:.3f}"), ">= 1")
    row("same pipeline, no audience, events/s", inc(lambda i: _rate(i.baseline_events_per_second)))
    row(
        "in segments.on_change / scoring.on_event, µs per event",
        inc(lambda i: f"{i.segments_us:,.0f} / {i.scoring_us:,.0f}"),
    )
    row(
        "pure evaluation alone, events/s (ratio to goal)",
        inc(
            lambda i: f"{_rate(i.pure_events_per_second)} ({i.pure_events_per_second / INCREMENTAL_GOAL:.2f})"
        ),
        f">= {_rate(INCREMENTAL_GOAL)}",
    )
    row("population", pop(lambda p: f"{p.profiles:,} profiles, {p.events:,} events"))
    row("bulk load (setup)", pop(lambda p: f"{p.load_seconds:.0f} s"))
    row("plain count of the same rows", pop(lambda p: f"{p.count_seconds:.2f} s"))
    row(
        "**full recompute of one segment**",
        pop(lambda p: f"{p.recompute_seconds:.1f} s{flag(p.load[1:2])}"),
        f"< {RECOMPUTE_GOAL:.0f} s",
    )
    row("… ratio to the plain count", pop(lambda p: f"{p.recompute_seconds / p.count_seconds:.1f}"))
    row("… entered / timers set", pop(lambda p: f"{p.recompute_entered:,} / {p.recompute_timers:,}"))
    row("… saved again, nothing changes", pop(lambda p: f"{p.again_seconds:.1f} s"))
    row("… sample checked against the evaluator", pop(lambda p: p.sample_agrees))
    row(
        "save with everyone entering",
        pop(lambda p: f"{p.trial_entered:,} in {p.trial_save_seconds:.1f} s" if p.trial_entered else "-"),
    )
    row(
        "**windows ending in one minute: all left after**",
        pop(
            lambda p: (
                f"{p.expiry_seconds:.1f} s ({p.left:,} left){_by_workers(p)}{flag(p.load[-1:])}"
                if p.left
                else "-"
            )
        ),
        f"< {EXPIRY_GOAL:.0f} s",
    )
    row("… exits/s", pop(lambda p: _rate(p.left / p.expiry_seconds) if p.expiry_seconds else "-"))
    _say("\n## Goals\n")
    for r in results:
        if r.failure:
            _say(f"* {r.label}: FAILED: {r.failure}")
            continue
        if r.incremental:
            i = r.incremental
            _say(
                f"* {r.label}: incremental {_rate(i.events_per_second)} events/s, ratio"
                f" {i.events_per_second / INCREMENTAL_GOAL:.3f}:"
                f" **{_mark(i.events_per_second >= INCREMENTAL_GOAL)}**"
            )
        if r.population:
            p = r.population
            full = p.profiles >= 1_000_000 and p.events >= 10_000_000
            scale = (
                "" if full else f" (at {p.profiles:,} profiles / {p.events:,} events, not the goal's size)"
            )
            _say(
                f"* {r.label}: recompute {p.recompute_seconds:.1f} s, ratio to the count"
                f" {p.recompute_seconds / p.count_seconds:.1f}:"
                f" **{_mark(full and p.recompute_seconds < RECOMPUTE_GOAL)}**{scale}"
            )
            if p.left:
                ok = full and p.expiry_seconds < EXPIRY_GOAL and p.still_members == 0
                _say(
                    f"* {r.label}: expiry {p.expiry_seconds:.1f} s for {p.left:,}{_by_workers(p)}, ratio"
                    f" {p.expiry_seconds / EXPIRY_GOAL:.2f}: **{_mark(ok)}**{scale}"
                )


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.audience",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="20,000 profiles, 200,000 events, a small log")
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--part", choices=("all", "incremental", "recompute", "expiry"), default="all")
    p.add_argument("--postgres-url", default=os.environ.get("WHENTHEN_BENCH_POSTGRES_URL", DEFAULT_POSTGRES))
    p.add_argument("--sqlite-synchronous", default="FULL")
    p.add_argument(
        "--profiles", type=int, help="recompute and expiry: profiles (default 1,000,000; --quick 20,000)"
    )
    p.add_argument("--events-per-profile", type=int, default=10)
    p.add_argument("--log-profiles", type=int, help="incremental: people (default 1,000; --quick 300)")
    p.add_argument("--log-events", type=int, help="incremental: track events (default 5,000; --quick 1,500)")
    p.add_argument(
        "--expiry-workers",
        type=int,
        default=1,
        help="expiry on PostgreSQL: fire the timers in this many processes at once, as that many"
        " `whenthen worker` processes share them (default 1: in the bench process)",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--tmpdir", type=Path, help="folder for SQLite files (default: the system temp folder)")
    args = p.parse_args(argv)
    args.profiles = args.profiles or (20_000 if args.quick else 1_000_000)
    args.log_profiles = args.log_profiles or (300 if args.quick else 1_000)
    args.log_events = args.log_events or (1_500 if args.quick else 5_000)
    if args.events_per_profile < 2:
        p.error("--events-per-profile must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    _check_time_format()
    _say(
        f"whenthen audience bench: {platform.node()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}; a 10-million-step Python loop"
        f" {python_loop_seconds():.2f} s (0.62 on the best days)"
    )
    db = choose_databases(args.db, args.postgres_url, _say)
    if db is None:
        return 2
    args.db = db
    makers = target_makers(args.db, [args.sqlite_synchronous], args.tmpdir, args.postgres_url)
    results: list[Result] = []
    failed = False
    for make in makers:
        target = make()
        result = Result(target.label, target.kind)
        results.append(result)
        _say(f"\n# {target.label}")
        try:
            if args.part in ("all", "incremental"):
                result.incremental = bench_incremental(args, target)
            if args.part in ("all", "recompute", "expiry"):
                result.population = bench_population(args, target)
        except Exception as exc:  # report it, clean up, and go on with the next database
            failed = True
            result.failure = f"{type(exc).__name__}: {exc}"
            _say(f"  FAILED: {result.failure}")
        finally:
            target.cleanup()
    report(results)
    _say(f"\n(run took {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
        _say(f"wrote {args.json}")
    return 1 if failed or not all(_VERDICTS) else 0


if __name__ == "__main__":
    sys.exit(main())
