"""Journeys: event to email through the real server, and a million waiting timers.

    python -m bench.journeys                  # SQLite and PostgreSQL, both parts, ~5.5 min
    python -m bench.journeys --quick          # 2 s phases, 100,000 timers (5,000 due), < 90 s
    python -m bench.journeys --db sqlite --part delivery
    python -m bench.journeys --quick --part delivery --layout both   # API + worker processes too
    python -m bench.journeys --quick --part delivery --layout all    # and a worker per role
    python -m bench.journeys --db postgres --part timers --enrollments 1000000

Part 1, delivery ("event to email handed to the SMTP server"). For each database:

1. a fresh database, a workspace (``whenthen workspace create --json``) and a published
   journey "event Ping -> send_email" (entry every time) whose subject carries the
   event's ``properties.id``;
2. ``whenthen serve`` (API and embedded pipeline worker, as shipped) in its own process,
   or with ``--layout split`` ``whenthen serve --no-worker`` and ``whenthen worker`` as two
   processes, or with ``--layout roles`` ``whenthen serve --no-worker``, ``whenthen worker
   --role pipeline`` and ``whenthen worker --role dispatch`` as three (``--layout both``:
   embedded then split; ``all``: the three; each on a fresh database), its SMTP
   host pointing at a minimal SMTP sink (``_SinkSession``: asyncio, the commands of plain
   delivery) in a process of its own (so its SMTP sessions do not share the bench's GIL
   with the load generator) that timestamps every message it
   receives (``time.perf_counter``: the system's monotonic clock, the same in every
   process, and the clock of the send schedule);
3. ``--users`` people identified with an email address (``/v1/batch``), then a short
   warm-up that is not counted;
4. for each ``--rates`` value: ``/v1/track`` open loop at that rate for ``--seconds``, each
   request on a fixed schedule whatever the server does (no coordinated omission). The
   latency of an event is the SMTP arrival of its email minus its *scheduled* send time.
   Then it waits up to ``--drain`` seconds for the remaining emails. It prints p50, p95,
   p99 and max, the emails/s achieved, the backlog (events sent but not yet emailed) over
   time and where it sits (pending events, open outbox jobs). An email that did not
   arrive within the wait counts as an infinite latency. The stages line splits each
   email's latency at the event's ``received_at`` and its message's ``created_at``
   (API; pipeline; dispatcher + SMTP: see ``_stages``).

Part 2, timers ("one million waiting enrollments"). In this process, per database:

1. a journey "delay 30d -> send_email" is published; waiting enrollments are made in
   stages (1,000, 100,000, then up to ``--enrollments``) by a *bulk fill*: rows made by
   the pure engine (``whenthen.journeys.engine.start``, one call per enrollment, with its
   journal entries) written in transactions of 10,000 rows (SQLite: executemany;
   PostgreSQL: COPY). That is setup, not the product's path, and is printed as such;
2. the product's path is measured on a sample at ~1M waiting: ``runtime.try_enter`` in
   transactions of 500 (as a signal fan-out page or a pipeline batch enters people) and
   ``journeys.enroll`` one per transaction (as ``POST /journeys/{key}/enroll``);
3. the idle poll (nothing due) at each stage: ``repository.due(conn, now, limit=500)``
   alone and the whole ``tasks.fire_timers`` step (its transaction, timers and date
   schedules), with the query plan;
4. bytes per timer at the end: SQLite ``dbstat`` (tables and their indexes) and the file,
   PostgreSQL ``pg_total_relation_size``;
5. wake-up lag: ``--due`` enrollments are set to fall due at one instant a second ahead,
   then (a) the timer step alone (the container's ``TimerStep``: on PostgreSQL further
   batches in ``pipeline.timer_threads`` threads once a batch is full) runs as the worker
   loop runs it (poll interval from the settings while idle) and (b) a second set is
   caught by the real ``PipelineWorker`` thread, which also runs the pipeline and any
   further steps on every pass, with the outbox dispatcher (email captured, no SMTP: each
   woken person has a profile with an email address, so each email is rendered, built
   and recorded with its bodies as a send is) in its background thread; its timer step
   (``steps[0]``, as ``bootstrap.build`` adds it) timestamps each batch, its threads'
   too; then (c) a third set, as spread over the table, by the role layout: that worker
   runs the pipeline role only and a ``whenthen worker --role dispatch`` process sends
   the emails. Lag of an enrollment = wall time after the commit of the batch that
   advanced it minus the due instant.
   (``--quick`` runs (a) only, with 5,000 due.) With ``--timer-processes N`` on
   PostgreSQL, (d) a fourth set is fired by the timer step looped in N processes at once,
   as N ``whenthen worker`` processes share due timers (``FOR UPDATE SKIP LOCKED``).

Nothing is asserted: figures, goals and their ratios are printed. The exit code is 0
when the run completed (goals met or not), 1 when a part failed, 2 when ``--db postgres``
finds no server. Everything made (SQLite files, PostgreSQL databases named
``wt_bench_<random>_*``, the server process) is removed at the end, also on failure.
The machine has 2 cores shared with other work: CPU use per phase is printed, and a phase
where other processes took CPU is flagged, as its figures are then pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection, func, insert, select, text, update

from bench.loadgen import Client, ProtocolError, percentile
from bench.loadgen import Connection as HttpConnection
from bench.targets import (
    BIN,
    CLOCK_TICKS,
    DEFAULT_POSTGRES,
    ServerProcess,
    Target,
    choose_databases,
    create_workspace,
    machine_busy_seconds,
    python_loop_seconds,
    server_env,
    target_makers,
)
from whenthen import journeys, pipeline, workspaces
from whenthen.bootstrap import Container, build, journey_timer_step
from whenthen.journeys import repository as journey_repo
from whenthen.journeys import runtime
from whenthen.journeys.definition import JourneyDefinition, parse_definition
from whenthen.journeys.engine import start as engine_start
from whenthen.journeys.tables import enrollment_journal, enrollments
from whenthen.journeys.tasks import TimerStep, fire_timers, seconds_to_next_timer
from whenthen.kernel.clock import SystemClock
from whenthen.kernel.ids import new_secret
from whenthen.messaging.tables import messages, outbox
from whenthen.profiles.tables import profiles
from whenthen.settings import PipelineSettings, Settings
from whenthen.storage import Database
from whenthen.storage.driver import recorded
from whenthen.tracking.tables import events
from whenthen.worker.heap import freeze_start_up_heap
from whenthen.worker.runner import Role

T = TypeVar("T")

#: The log's partition count the product runs with (events a journey step appends).
PARTITIONS = PipelineSettings().partitions

#: Goals (the issue): p99 event -> SMTP under 100 ms at 1,000 events/s; wake-up lag p99
#: under 1 s with 10,000 due at once; idle poll cost independent of how many wait.
DELIVERY_GOAL_P99 = 0.100
DELIVERY_GOAL_RATE = 1000.0
LAG_GOAL_P99 = 1.0
#: "Independent of how many are waiting": the 1M / 1k ratio of the idle poll's median,
#: within this factor of 1 (timer noise on a shared 2-core machine is larger than that).
IDLE_GOAL_RATIO = 2.0
#: Cores other processes may use before a phase's figures are flagged.
QUIET = 0.15

PING_JOURNEY: dict[str, Any] = {
    "key": "bench-ping",
    "name": "Bench: ping -> email",
    "trigger": {"kind": "event", "event": "Ping"},
    "entry": {"frequency": "every_time"},
    "start": "mail",
    "nodes": {
        "mail": {
            "kind": "send_email",
            "email": {
                "subject": "Ping {{ event.properties.id }}",
                "text": "Hello {{ traits.email }}, this is ping {{ event.properties.id }}.",
            },
        }
    },
}

WAIT_JOURNEY: dict[str, Any] = {
    "key": "bench-wait",
    "name": "Bench: wait 30 days -> email",
    "trigger": {"kind": "api"},
    "entry": {"frequency": "once"},
    "start": "wait",
    "nodes": {
        "wait": {"kind": "delay", "duration": "30d", "next": "mail"},
        "mail": {
            "kind": "send_email",
            # Text and HTML with two links (rewritten to tracked ones), as a reminder is.
            "email": {
                "subject": "A month later",
                "text": "Hello {{ traits.email }}, a month has passed.",
                "html": (
                    "<p>Hello {{ traits.email }},</p><p>a month has passed since you joined on the"
                    " {{ traits.plan }} plan.</p><p>"
                    "<a href='https://shop.example/offers?plan={{ traits.plan }}'>See this month's offers</a>"
                    " or <a href='https://shop.example/account'>your account</a>.</p>"
                ),
            },
        },
    },
}

SUBJECT_LINE = re.compile(rb"Subject: Ping ([A-Za-z0-9_.-]+)")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _ms(seconds: float) -> str:
    if math.isinf(seconds):
        return "not delivered"
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:,.1f} ms"


def _cell(seconds: float) -> str:
    """A latency for a table cell: ms below 10 s, else s; 'lost' when it never came."""
    if math.isinf(seconds):
        return "lost"
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _short_label(label: str, kind: str) -> str:
    if kind == "sqlite":
        return label.replace("synchronous=", "")
    return label.split(",")[0] + (", sync commit on" if "synchronous_commit=on" in label else "")


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


_VERDICTS: list[bool] = []  # every goal report() judged, so main's exit status says it


def _mark(ok: bool) -> str:
    _VERDICTS.append(ok)
    return "MET" if ok else "NOT MET"


# ---- CPU ------------------------------------------------------------------------------


@dataclass
class Cpu:
    """Average CPU use over a phase, in cores (2.0 = both cores of this machine)."""

    server: float = 0.0
    bench: float = 0.0
    postgres: float = 0.0
    machine: float = 0.0
    worker: float = 0.0  # `whenthen worker` beside the API (--layout split), or all of them
    #: per role, with --layout roles
    roles: dict[str, float] = field(default_factory=dict)
    #: the phase's wall-clock seconds (the averages above are over it)
    wall: float = 0.0

    def core_seconds(self) -> float:
        """CPU seconds the phase's own processes used (server, workers, bench, PostgreSQL)."""
        return (self.server + self.worker + self.bench + self.postgres) * self.wall

    @property
    def other(self) -> float:
        return max(0.0, self.machine - self.server - self.worker - self.bench - self.postgres)

    def text(self) -> str:
        server = f"server {self.server:.2f}, " if self.server >= 0.005 else ""
        if self.worker >= 0.005:
            each = ", ".join(f"{role} {c:.2f}" for role, c in self.roles.items())
            server += f"worker {self.worker:.2f}{f' ({each})' if len(self.roles) > 1 else ''}, "
        pg = f", postgres {self.postgres:.2f}" if self.postgres >= 0.005 else ""
        note = "  WARNING: other processes competed for the CPU" if self.other > QUIET else ""
        return (
            f"cpu (cores): {server}bench {self.bench:.2f}{pg}, other processes {self.other:.2f}; "
            f"machine {self.machine:.2f} of {os.cpu_count()}{note}"
        )


def _postgres_ticks() -> dict[int, int]:
    """CPU ticks so far of each running ``postgres`` process, by pid."""
    ticks: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        ticks[int(proc.name)] = int(fields[11]) + int(fields[12])
    return ticks


def _postgres_delta(before: dict[int, int]) -> float:
    """CPU seconds PostgreSQL used since ``before``, per process, so that a backend that
    ends meanwhile takes away only its own time (the time it used is then not counted)."""
    after = _postgres_ticks()
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLOCK_TICKS


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def measure_cpu(server: ServerProcess | None = None, worker: WorkerGroup | None = None) -> Iterator[Cpu]:
    cpu = Cpu()
    s0 = server.cpu_seconds() if server else 0.0
    w0 = worker.cpu_seconds() if worker else 0.0
    r0 = worker.per_role() if worker else {}
    b0 = _own_cpu()
    p0 = _postgres_ticks()
    m0, _ = machine_busy_seconds()
    t0 = time.perf_counter()
    try:
        yield cpu
    finally:
        wall = cpu.wall = max(1e-9, time.perf_counter() - t0)
        if server is not None and server.proc.poll() is None:
            cpu.server = (server.cpu_seconds() - s0) / wall
        if worker is not None and worker.alive():
            cpu.worker = (worker.cpu_seconds() - w0) / wall
            cpu.roles = {role: (c - r0.get(role, 0.0)) / wall for role, c in worker.per_role().items()}
        cpu.bench = (_own_cpu() - b0) / wall
        cpu.postgres = max(0.0, _postgres_delta(p0)) / wall
        cpu.machine = (machine_busy_seconds()[0] - m0) / wall


def wait_quiet(limit: float) -> None:
    """Wait up to ``limit`` seconds for a second in which the machine is nearly idle."""
    if limit <= 0:
        return
    deadline = time.perf_counter() + limit
    load = machine_load()
    while load > QUIET and time.perf_counter() < deadline:
        load = machine_load()
    note = "" if load <= QUIET else "  WARNING: not idle; figures will be pessimistic"
    _say(f"\n  machine load: {load:.2f} cores busy{note}")


def machine_load(seconds: float = 1.0) -> float:
    busy0, _ = machine_busy_seconds()
    t0 = time.perf_counter()
    time.sleep(seconds)
    return (machine_busy_seconds()[0] - busy0) / (time.perf_counter() - t0)


# ---- the SMTP sink that timestamps arrivals ----------------------------------------------


EHLO_REPLY = b"250-127.0.0.1\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 33554432\r\n"


class _SinkSession(asyncio.Protocol):
    """One SMTP session of the sink: the commands a client sends for plain delivery
    (RFC 5321: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT), each answered at once, and
    PIPELINING offered as mail servers do (RFC 2920: the replies to the commands of one
    read go back in one write);
    the message itself is only searched for the event id in its subject and timestamped
    when its final ``.`` line arrives, before the ``250`` reply.

    Written out rather than aiosmtpd's server: the sink runs on the machine it measures,
    and aiosmtpd's per-command machinery (handler look-ups, session and envelope objects,
    the message decoded) took ~0.3 of a core at 1,000 messages/s, CPU the product's
    processes then lacked. The product's own SMTP client (aiosmtplib) speaks to it, and
    the tests keep aiosmtpd (``messaging.smtp_sink``)."""

    def __init__(self, arrivals: list[tuple[str | None, float]]) -> None:
        self.arrivals = arrivals
        self.buffer = b""
        self.in_data = False
        self.event_id: str | None = None  # from the message's subject, while in DATA
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"220 127.0.0.1 bench sink ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        *lines, self.buffer = (self.buffer + chunk).split(b"\r\n")
        replies: list[bytes] = []
        for line in lines:
            if self.in_data:
                if line == b".":
                    self.arrivals.append((self.event_id, time.perf_counter()))
                    self.in_data, self.event_id = False, None
                    replies.append(b"250 OK: queued\r\n")
                elif self.event_id is None and (found := SUBJECT_LINE.match(line)):
                    self.event_id = found.group(1).decode("ascii")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(EHLO_REPLY)
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                replies.append(b"250 OK\r\n")
            elif verb == b"DATA":
                self.in_data = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 Bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            else:
                replies.append(b"502 Command not implemented\r\n")
        if replies:
            self.transport.write(b"".join(replies))


def _sink_process(port: int, conn: Any) -> None:
    """The SMTP sink in a process of its own (``TimedSink``): the SMTP sessions' protocol
    work does not share the bench's GIL with the load generator. Arrivals are stamped
    here (``time.perf_counter`` is the system's monotonic clock, the same in every
    process) and sent to the bench every 20 ms; ``"stop"`` from the bench ends it."""

    async def serve() -> None:
        arrivals: list[tuple[str | None, float]] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _SinkSession(arrivals), "127.0.0.1", port)
        conn.send("ready")
        try:
            while not conn.poll(0):
                await asyncio.sleep(0.02)
                if arrivals:
                    batch, arrivals[:] = list(arrivals), []
                    conn.send(batch)
        finally:
            server.close()
            conn.send(list(arrivals))
            conn.send("done")

    asyncio.run(serve())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TimedSink:
    """An SMTP sink that records, per event id in the subject, when each message
    arrived (``time.perf_counter``) instead of parsing and keeping every message (at
    1,000 messages/s parsing would take the CPU the server needs). It runs in a process
    of its own (``_sink_process``); a thread here receives its arrivals."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.lock = threading.Lock()
        self.arrivals: dict[str, float] = {}
        self.per_prefix: dict[str, int] = {}
        self.duplicates = 0
        self.unmatched = 0
        self._conn: Any = None
        self._proc: Any = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> TimedSink:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe()
        self._conn = mine
        self._proc = ctx.Process(target=_sink_process, args=(self.port, theirs), daemon=True)
        self._proc.start()
        if not mine.poll(60) or mine.recv() != "ready":
            raise RuntimeError("the SMTP sink process did not start")
        self._reader = threading.Thread(target=self._read, name="sink-arrivals", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        while True:
            try:
                batch = self._conn.recv()
            except EOFError:
                return
            if batch == "done":
                return
            for event_id, at in batch:
                self.arrived(event_id, at)

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        if self._reader is not None:
            self._reader.join(timeout=30)
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()

    def arrived(self, event_id: str | None, at: float) -> None:
        with self.lock:
            if event_id is None:
                self.unmatched += 1
            elif event_id in self.arrivals:
                self.duplicates += 1
            else:
                self.arrivals[event_id] = at
                prefix = event_id.partition("-")[0]
                self.per_prefix[prefix] = self.per_prefix.get(prefix, 0) + 1

    def count(self, prefix: str) -> int:
        with self.lock:
            return self.per_prefix.get(prefix, 0)

    def arrival(self, event_id: str) -> float | None:
        with self.lock:
            return self.arrivals.get(event_id)


# ---- part 1: delivery -----------------------------------------------------------------


@dataclass
class Sent:
    """One open-loop phase of ``/v1/track`` calls."""

    prefix: str
    rate: float
    seconds: float
    scheduled: int = 0
    due: dict[str, float] = field(default_factory=dict)  # event id -> scheduled send time
    acked: list[str] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0  # when the last request was answered (or given up)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass
class DeliveryPhase:
    name: str
    rate: float
    seconds: float
    scheduled: int
    acked: int
    errors: dict[str, int]
    ack_p99: float
    emailed: int
    p50: float
    p95: float
    p99: float
    max: float
    emails_per_second_during: float  # arrivals while the schedule ran / its length
    emails_per_second_overall: float  # arrivals / (last arrival - first scheduled send)
    backlog_at_end: int  # acked events without their email when the schedule ended
    pending_events_at_end: int  # ... of which the pipeline had not yet processed
    open_jobs_at_end: int  # outbox jobs not done when the schedule ended
    drain_seconds: float
    drained: bool
    backlog_series: list[tuple[float, int]]  # (seconds since start, sent - emailed)
    cpu: Cpu
    duplicates: int = 0
    #: Where the time went, per stage: name -> (p50, p99) seconds (``_stages``).
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class DeliveryResult:
    label: str
    kind: str
    synchronous: str
    server: str
    phases: list[DeliveryPhase] = field(default_factory=list)
    server_errors: int = 0
    failure: str | None = None
    layout: str = "embedded"


def _track_body(event_id: str, user: int) -> bytes:
    return orjson.dumps(
        {"userId": f"u{user}", "event": "Ping", "messageId": event_id, "properties": {"id": event_id}}
    )


async def identify_users(client: Client, users: int) -> None:
    conns = await client.connections(4)
    per_request = 100
    bodies = [
        orjson.dumps(
            {
                "batch": [
                    {"type": "identify", "userId": f"u{i}", "traits": {"email": f"u{i}@example.com"}}
                    for i in range(lo, min(users, lo + per_request))
                ]
            }
        )
        for lo in range(0, users, per_request)
    ]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(conn: HttpConnection) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            status, answer = await conn.send(client.request_bytes("/v1/batch", body))
            if status != 200:
                raise RuntimeError(f"identify batch refused: {status} {answer[:200]!r}")

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def send_events(
    client: Client, *, prefix: str, rate: float, seconds: float, users: int, connections: int
) -> Sent:
    """``rate`` ``/v1/track`` calls a second for ``seconds``, each on its fixed schedule."""
    out = Sent(prefix=prefix, rate=rate, seconds=seconds)
    total = int(rate * seconds)
    out.scheduled = total
    pool: asyncio.Queue[HttpConnection] = asyncio.Queue()
    conns = await client.connections(connections)
    for c in conns:
        pool.put_nowait(c)
    ids = [f"{prefix}-{i}" for i in range(total)]
    requests = [client.request_bytes("/v1/track", _track_body(eid, i % users)) for i, eid in enumerate(ids)]
    tasks: list[asyncio.Task[None]] = []

    async def one(event_id: str, request: bytes, due: float) -> None:
        conn = await pool.get()
        try:
            status, _ = await conn.send(request)
        except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
            out.error(type(exc).__name__)
            await conn.close()
            fresh = await client.connect()
            conns.append(fresh)
            pool.put_nowait(fresh)
            return
        pool.put_nowait(conn)
        if status == 200:
            out.acked.append(event_id)
            out.ack_latencies.append(time.perf_counter() - due)
        else:
            out.error(str(status))

    out.start = time.perf_counter() + 0.05
    try:
        for i, (event_id, request) in enumerate(zip(ids, requests, strict=True)):
            due = out.start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            out.due[event_id] = due
            tasks.append(asyncio.create_task(one(event_id, request, due)))
        unfinished = [t for t in tasks if not t.done()]
        if unfinished:
            await asyncio.wait(unfinished, timeout=15.0)
        out.end = time.perf_counter()
        for task in tasks:
            if not task.done():
                task.cancel()
                out.error("timeout")
            elif task.exception() is not None:
                out.error(type(task.exception()).__name__)
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return out


def _backlog_in_db(db: Database) -> tuple[int, int]:
    """(pending events, outbox jobs not done) as the server's database sees them now."""
    with db.read() as conn:
        pending = pipeline.count_pending(conn)
        jobs = int(
            conn.execute(
                select(func.count()).select_from(outbox).where(outbox.c.done_at.is_(None))
            ).scalar_one()
        )
    return pending, jobs


async def _wait_pipeline_idle(db: Database, limit: float) -> None:
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        pending, jobs = await asyncio.to_thread(_backlog_in_db, db)
        if pending == 0 and jobs == 0:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the server did not finish its backlog within {limit:g} s")


async def _wait_emails(sink: TimedSink, prefix: str, expected: int, limit: float) -> bool:
    deadline = time.perf_counter() + limit
    while sink.count(prefix) < expected:
        if time.perf_counter() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def delivery_phase(
    args: argparse.Namespace,
    client: Client,
    sink: TimedSink,
    db: Database,
    server: ServerProcess,
    worker: WorkerGroup | None,
    *,
    prefix: str,
    rate: float,
) -> DeliveryPhase:
    series: list[tuple[float, int]] = []
    stop = asyncio.Event()
    holder: dict[str, Sent] = {}
    t0 = time.perf_counter()

    async def sampler() -> None:
        while not stop.is_set():
            sent = holder.get("sent")
            sent_so_far = int(min(rate * (time.perf_counter() - t0), rate * args.seconds))
            scheduled = len(sent.acked) if sent is not None else sent_so_far
            series.append((time.perf_counter() - t0, max(0, scheduled - sink.count(prefix))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)

    with measure_cpu(server, worker) as cpu:
        sampling = asyncio.create_task(sampler())
        sent = await send_events(
            client,
            prefix=prefix,
            rate=rate,
            seconds=args.seconds,
            users=args.users,
            connections=args.connections,
        )
        holder["sent"] = sent
        schedule_end = sent.start + sent.scheduled / rate
        emailed_during = sum(
            1 for e in sent.acked if (a := sink.arrival(e)) is not None and a <= max(schedule_end, sent.end)
        )
        backlog = len(sent.acked) - sink.count(prefix)
        pending, jobs = await asyncio.to_thread(_backlog_in_db, db)
        d0 = time.perf_counter()
        drained = await _wait_emails(sink, prefix, len(sent.acked), args.drain)
        drain_seconds = time.perf_counter() - d0
        stop.set()
        await sampling
    latencies = []
    arrivals = []
    for event_id in sent.acked:
        arrival = sink.arrival(event_id)
        if arrival is None:
            latencies.append(math.inf)
        else:
            latencies.append(arrival - sent.due[event_id])
            arrivals.append(arrival)
    window = max(schedule_end, sent.end) - sent.start
    span = (max(arrivals) - sent.start) if arrivals else 0.0
    stages = await asyncio.to_thread(_stages, db, sent, sink)
    return DeliveryPhase(
        name=prefix,
        rate=rate,
        seconds=args.seconds,
        scheduled=sent.scheduled,
        acked=len(sent.acked),
        errors=sent.errors,
        ack_p99=percentile(sent.ack_latencies, 99),
        emailed=len(arrivals),
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        p99=percentile(latencies, 99),
        max=percentile(latencies, 100),
        emails_per_second_during=emailed_during / window if window > 0 else 0.0,
        emails_per_second_overall=len(arrivals) / span if span > 0 else 0.0,
        backlog_at_end=backlog,
        pending_events_at_end=pending,
        open_jobs_at_end=jobs,
        drain_seconds=drain_seconds,
        drained=drained,
        backlog_series=series,
        cpu=cpu,
        duplicates=sink.duplicates,
        stages=stages,
    )


def _stages(db: Database, sent: Sent, sink: TimedSink) -> dict[str, tuple[float, float]]:
    """p50 and p99 of each stage an event's email went through, from the database's
    timestamps (the server's wall clock, turned into this process's ``perf_counter``,
    which the sink's arrivals share): the scheduled send to the event stored by the API
    (``events.received_at``), to its message made by the pipeline (``messages.created_at``:
    the pipeline's clock when it made the message, before its batch committed), to the
    email's arrival at the SMTP sink. So "dispatcher + SMTP" holds the rest of the
    pipeline's batch and its commit, the wait for the dispatcher, and the sending."""
    offset = time.time() - time.perf_counter()
    ids = list(sent.acked)
    stored: dict[str, float] = {}
    queued: dict[str, float] = {}
    with db.read() as conn:
        for lo in range(0, len(ids), 1_000):
            chunk = ids[lo : lo + 1_000]
            for message_id, at in conn.execute(
                select(events.c.message_id, events.c.received_at).where(events.c.message_id.in_(chunk))
            ):
                stored[message_id] = at.timestamp() - offset
            for subject, at in conn.execute(
                select(messages.c.subject, messages.c.created_at).where(
                    messages.c.subject.in_([f"Ping {e}" for e in chunk])
                )
            ):
                queued[subject.removeprefix("Ping ")] = at.timestamp() - offset
    spans: dict[str, list[float]] = {"API": [], "pipeline": [], "dispatcher + SMTP": []}
    for event_id in ids:
        arrival = sink.arrival(event_id)
        if event_id not in stored or event_id not in queued or arrival is None:
            continue
        spans["API"].append(stored[event_id] - sent.due[event_id])
        spans["pipeline"].append(queued[event_id] - stored[event_id])
        spans["dispatcher + SMTP"].append(arrival - queued[event_id])
    return {name: (percentile(v, 50), percentile(v, 99)) for name, v in spans.items() if v}


def _describe_phase(p: DeliveryPhase) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(p.errors.items())) or "none"
    series = " ".join(f"{n}" for _, n in p.backlog_series[:: max(1, len(p.backlog_series) // 24)])
    drained = (
        f"drained in {p.drain_seconds:.1f} s"
        if p.drained
        else f"NOT drained: {p.acked - p.emailed:,} emails missing after {p.drain_seconds:.0f} s"
    )
    return (
        f"    {p.acked:,}/{p.scheduled:,} events acknowledged (errors: {errors}; ack p99 {_ms(p.ack_p99)}), "
        f"{p.emailed:,} emails arrived\n"
        f"    event -> SMTP: p50 {_ms(p.p50)}, p95 {_ms(p.p95)}, p99 {_ms(p.p99)}, max {_ms(p.max)}\n"
        + (
            "    stages (p50 / p99): "
            + "; ".join(f"{name} {_ms(a)} / {_ms(b)}" for name, (a, b) in p.stages.items())
            + "\n"
            if p.stages
            else ""
        )
        + f"    emails/s while sending {p.emails_per_second_during:,.0f} (offered {p.rate:,.0f}/s), "
        f"overall {p.emails_per_second_overall:,.0f}/s; {drained}\n"
        f"    backlog when the schedule ended: {p.backlog_at_end:,} events without email "
        f"({p.pending_events_at_end:,} not yet through the pipeline, "
        f"{p.open_jobs_at_end:,} open outbox jobs)\n"
        f"    backlog every ~0.5 s: {series}\n"
        + (f"    WARNING: {p.duplicates} emails arrived twice (so far in this run)\n" if p.duplicates else "")
        + f"    {p.cpu.text()}"
    )


async def drive_delivery(
    args: argparse.Namespace,
    result: DeliveryResult,
    server: ServerProcess,
    worker: WorkerGroup | None,
    sink: TimedSink,
    write_key: str,
    url: str,
) -> None:
    client = Client("127.0.0.1", server.port, write_key)
    db = Database(url)
    try:
        t0 = time.perf_counter()
        await identify_users(client, args.users)
        await _wait_pipeline_idle(db, 120.0)
        _say(f"  identified {args.users:,} people with an email in {time.perf_counter() - t0:.1f} s")
        warm = await send_events(
            client, prefix="warm", rate=50.0, seconds=args.warmup, users=args.users, connections=8
        )
        if not await _wait_emails(sink, "warm", len(warm.acked), 30.0):
            raise RuntimeError(
                f"warm-up: {sink.count('warm')} of {len(warm.acked)} emails arrived in 30 s "
                f"(unmatched messages: {sink.unmatched})"
            )
        for n, rate in enumerate(args.rates):
            await _wait_pipeline_idle(db, 30.0)
            _say(f"  /v1/track open loop at {rate:,.0f} events/s for {args.seconds:g} s ...")
            phase = await delivery_phase(
                args, client, sink, db, server, worker, prefix=f"r{n}x{int(rate)}", rate=rate
            )
            result.phases.append(phase)
            _say(_describe_phase(phase))
            if not phase.drained and n + 1 < len(args.rates):
                # The next phase should not start on this backlog: give the server more time.
                t1 = time.perf_counter()
                try:
                    await _wait_pipeline_idle(db, 2 * args.drain)
                except RuntimeError:
                    _say(f"    backlog not cleared {2 * args.drain:g} s later either: stopping here")
                    break
                _say(f"    (backlog cleared {time.perf_counter() - t1:.1f} s later; going on)")
    finally:
        db.dispose()


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def publish(url: str, workspace_id: str, definition: dict[str, Any]) -> None:
    db = Database(url)
    try:
        with db.write() as conn:
            now = SystemClock().now()
            journeys.push(conn, workspace_id, definition, now=now)
            journeys.publish(conn, workspace_id, definition["key"], now=now)
    finally:
        db.dispose()


LAYOUTS = {
    "split": "`whenthen worker`",
    "roles": "`whenthen worker --role pipeline` + `--role dispatch`",
}


class WorkerProcess:
    """``whenthen worker`` in its own process (``--layout split``), beside the API started
    with ``--no-worker``: the layout a business at 1,000 events/s would run; with
    ``role`` (``--layout roles``) one of a pipeline worker and a dispatcher."""

    def __init__(self, env: dict[str, str], log_path: Path, role: str = "all") -> None:
        self.role = role
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "whenthen"), "worker", "--role", role],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        deadline = time.perf_counter() + 30.0
        while b"running" not in log_path.read_bytes():
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"`whenthen worker` did not start; see {log_path}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


class WorkerGroup:
    """The worker processes of a layout, counted together (CPU) and stopped together."""

    def __init__(self, workers: list[WorkerProcess]) -> None:
        self.workers = workers

    def cpu_seconds(self) -> float:
        return sum(w.cpu_seconds() for w in self.workers)

    def per_role(self) -> dict[str, float]:
        return {w.role: w.cpu_seconds() for w in self.workers}

    def alive(self) -> bool:
        return all(w.alive() for w in self.workers)

    def stop(self) -> int:
        """Stop them all; returns the errors their logs show."""
        errors = 0
        for w in self.workers:
            w.stop()
            errors += _errors_in(w.log_path, f"worker ({w.log_path.stem})")
        return errors


def _errors_in(log_path: Path, what: str) -> int:
    log = log_path.read_text(errors="replace")
    errors = log.count("Traceback") + log.count(" ERROR ")
    if errors:
        tail = "\n      ".join(log.splitlines()[-12:])
        _say(f"  WARNING: the {what} logged {errors} errors; last lines:\n      {tail}")
    return errors


def bench_delivery(args: argparse.Namespace, target: Target, logs: Path, layout: str) -> DeliveryResult:
    mode = "whenthen serve" if args.server == "cli" else "python -m bench.server (access log off)"
    split = layout in ("split", "roles")
    result = DeliveryResult(
        label=target.label,
        kind=target.kind,
        synchronous=target.synchronous,
        server=f"{mode}, embedded worker" if not split else f"{mode} --no-worker + " + LAYOUTS[layout],
        layout=layout,
    )
    _say(f"\n== Delivery, {target.label}: {result.server}")
    url = target.fresh(f"delivery_{target.synchronous.lower()}_{layout}")
    with TimedSink() as sink:
        env = server_env(url, target.synchronous)
        env.update(
            WHENTHEN_EMAIL__SMTP_HOST=sink.host,
            WHENTHEN_EMAIL__SMTP_PORT=str(sink.port),
            WHENTHEN_EMAIL__FROM_ADDRESS="Bench <bench@example.com>",
        )
        workspace = create_workspace(env)
        publish(url, workspace.id, PING_JOURNEY)
        log_path = logs / f"server-{target.kind}-{target.synchronous}-{layout}.log"
        server = ServerProcess(env, mode=args.server, worker=not split, log_path=log_path)
        worker: WorkerGroup | None = None
        try:
            if split:
                roles = ["all"] if layout == "split" else ["pipeline", "dispatch"]
                worker = WorkerGroup([])
                for role in roles:
                    worker_log = logs / f"worker-{role}-{target.kind}-{target.synchronous}.log"
                    worker.workers.append(WorkerProcess(env, worker_log, role))
            _run_async(drive_delivery(args, result, server, worker, sink, workspace.write_key, url))
        finally:
            # The measurements are taken: a backlog left in the throwaway database need not
            # be finished (a graceful stop waits for the worker's pass, up to 10 s).
            server.proc.terminate()
            try:
                server.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                server.proc.kill()
            server.stop()
            result.server_errors = _errors_in(log_path, "server")
            if worker is not None:
                result.server_errors += worker.stop()
        if sink.unmatched:
            _say(f"  WARNING: {sink.unmatched} messages without a ping id in their subject")
    return result


# ---- part 2: timers -------------------------------------------------------------------


@dataclass
class IdlePoll:
    waiting: int
    due_median: float
    due_p99: float
    step_median: float
    step_p99: float
    pass_median: float


@dataclass
class Lag:
    name: str
    due: int
    fired: int
    p50: float
    p99: float
    max: float
    first: float  # lag of the first batch: the poll delay
    timers_per_second: float
    cpu: Cpu


@dataclass
class TimerResult:
    label: str
    kind: str
    enrollments: int = 0
    bulk_rows_per_second: float = 0.0  # enrollments/s, with their journal rows
    engine_seconds_per_row: float = 0.0
    batch_per_second: float = 0.0  # runtime.try_enter, 500 per transaction
    single_per_second: float = 0.0  # journeys.enroll, one per transaction
    batch_cpu: Cpu | None = None
    single_cpu: Cpu | None = None
    idle: list[IdlePoll] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    bytes_enrollments: int = 0  # table + indexes
    bytes_journal: int = 0  # table + indexes
    bytes_file: int = 0  # SQLite: the database file; PostgreSQL: the database
    journal_rows: int = 0
    lags: list[Lag] = field(default_factory=list)
    failure: str | None = None

    @property
    def idle_ratio(self) -> float:
        if len(self.idle) < 2 or not self.idle[0].due_median:
            return float("nan")
        return self.idle[-1].due_median / self.idle[0].due_median

    @property
    def pass_ratio(self) -> float:
        if len(self.idle) < 2 or not self.idle[0].pass_median:
            return float("nan")
        return self.idle[-1].pass_median / self.idle[0].pass_median

    @property
    def step_ratio(self) -> float:
        if len(self.idle) < 2 or not self.idle[0].step_median:
            return float("nan")
        return self.idle[-1].step_median / self.idle[0].step_median


ENROLLMENT_COLUMNS = tuple(enrollments.c.keys())
JOURNAL_COLUMNS = tuple(enrollment_journal.c.keys())
BULK_CHUNK = 10_000


def _enrollment_id() -> str:
    # The shape runtime._new_enrollment_id makes.
    return "enr_" + new_secret(12).replace("-", "a").replace("_", "b")


class BulkFill:
    """Writes waiting enrollments made by the pure engine, with their journal rows, as the
    product would store them, without the product's per-enrollment statements."""

    def __init__(
        self, db: Database, kind: str, ws: str, journey_id: str, version: int, definition: JourneyDefinition
    ) -> None:
        self.db = db
        self.kind = kind
        self.ws = ws
        self.journey_id = journey_id
        self.version = version
        self.definition = definition
        self.count = 0
        self.journal_rows = 0
        self.seconds = 0.0
        self.engine_seconds = 0.0
        self.facts = runtime.NoFacts()
        self.now = SystemClock().now()
        # Spread the wakes over (now + 1 day, now + 30 days], as people entering over a month.
        self.spread = int(timedelta(days=29).total_seconds())
        self.delay = timedelta(days=30)
        self.picked: list[str] = []
        #: Ids picked halfway between those of ``picked``, as spread over the table (the
        #: lag of the worker in the role layout), without changing ``picked`` itself.
        self.picked_between: list[str] = []
        #: The people of the picked enrollments (``picked`` and ``picked_between``): they
        #: get profiles with an email address (:meth:`add_people`), so that the emails of
        #: the lag runs are rendered, built and captured as a send's are, not skipped.
        self.people: list[str] = []
        dialect = db.engine.dialect
        self._enroll_processors = [
            enrollments.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in ENROLLMENT_COLUMNS
        ]
        self._journal_processors = [
            enrollment_journal.c[c].type.dialect_impl(dialect).bind_processor(dialect)
            for c in JOURNAL_COLUMNS
        ]

    def _rows(
        self, n: int, pick_every: int, journal_id: int
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """``n`` enrollments and their journal rows, chained as the product chains them
        (``prev_id``, ``journal_tail``: ADR 0018), the journal's ids from ``journal_id``."""
        rows: list[tuple[Any, ...]] = []
        journal: list[tuple[Any, ...]] = []
        engine_time = 0.0
        for i in range(self.count, self.count + n):
            eid = _enrollment_id()
            profile_id = f"prf_bulk{i:010d}"
            offset = (i * 7919) % self.spread
            entered = self.now - timedelta(seconds=offset, microseconds=i % 1_000_000)
            e0 = time.perf_counter()
            t = engine_start(self.definition, eid, trigger=None, payload=None, now=entered, facts=self.facts)
            engine_time += time.perf_counter() - e0
            s = t.state
            prev: int | None = None
            for entry in t.journal:
                j = {
                    "id": journal_id,
                    "workspace_id": self.ws,
                    "journey_id": self.journey_id,
                    "enrollment_id": eid,
                    "profile_id": profile_id,
                    "at": entry.at,
                    "kind": entry.kind,
                    "node": entry.node,
                    "detail": dict(entry.detail),
                    "prev_id": prev,
                }
                journal.append(self._bind(j, JOURNAL_COLUMNS, self._journal_processors))
                prev, journal_id = journal_id, journal_id + 1
            # The values repository.insert_enrollment writes, then the journal its tail.
            row = {
                "id": s.enrollment_id,
                "workspace_id": self.ws,
                "journey_id": self.journey_id,
                "version": self.version,
                "profile_id": profile_id,
                "status": s.status.value,
                "node": s.node,
                "wake_at": s.wake_at,
                "entered_at": s.entered_at,
                "ended_at": None,
                "steps": s.steps,
                "context": dict(s.context),
                "reason": s.reason,
                "entry_key": None,
                "failures": 0,
                "updated_at": entered,
                "journal_tail": prev,
            }
            rows.append(self._bind(row, ENROLLMENT_COLUMNS, self._enroll_processors))
            if pick_every and i % pick_every == 0:
                self.picked.append(eid)
                self.people.append(profile_id)
            elif pick_every > 1 and i % pick_every == pick_every // 2:
                self.picked_between.append(eid)
                self.people.append(profile_id)
        self.engine_seconds += engine_time
        return rows, journal

    def add_people(self) -> int:
        """Profiles, each with an email address, for the people of the picked enrollments
        (the others wait, they are never woken); returns how many were written."""
        now = SystemClock().now()
        rows = [
            {
                "id": pid,
                "workspace_id": self.ws,
                "traits": {"email": f"{pid}@bench.example", "plan": "pro"},
                "trait_times": {"email": now.isoformat(), "plan": now.isoformat()},
                "email": f"{pid}@bench.example",
                "event_count": 0,
                "created_at": now,
                "updated_at": now,
                "version": 1,
            }
            for pid in self.people
        ]
        for lo in range(0, len(rows), BULK_CHUNK):
            with self.db.write() as conn:
                conn.execute(insert(profiles), rows[lo : lo + BULK_CHUNK])
        return len(rows)

    def _bind(
        self, row: dict[str, Any], columns: Sequence[str], processors: Sequence[Any]
    ) -> tuple[Any, ...]:
        if self.kind == "postgres":
            # COPY: psycopg adapts datetimes itself; JSON goes as its text.
            return tuple(
                orjson.dumps(row[c]).decode("utf-8") if c in ("context", "detail") else row[c]
                for c in columns
            )
        return tuple(p(row[c]) if p is not None else row[c] for p, c in zip(processors, columns, strict=True))

    def fill_to(self, total: int, *, pick: int = 0) -> None:
        """Add enrollments up to ``total``; with ``pick``, remember about that many ids
        spread over the new rows (for the wake-up lag)."""
        todo = total - self.count
        if todo <= 0:
            return
        pick_every = max(1, todo // pick) if pick else 0
        t0 = time.perf_counter()
        while self.count < total:
            n = min(BULK_CHUNK, total - self.count)
            with self.db.write() as conn:
                top = conn.execute(select(func.max(enrollment_journal.c.id))).scalar()
                rows, journal = self._rows(n, pick_every, int(top or 0) + 1)
                self._write(conn, rows, journal)
            self.count += n
            self.journal_rows += len(journal)
        self.seconds += time.perf_counter() - t0

    def _write(self, conn: Connection, rows: list[tuple[Any, ...]], journal: list[tuple[Any, ...]]) -> None:
        raw = conn.connection.driver_connection
        assert raw is not None
        if self.kind == "postgres":
            with raw.cursor() as cur:
                with cur.copy(f"COPY enrollments ({', '.join(ENROLLMENT_COLUMNS)}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(r)
                with cur.copy(f"COPY enrollment_journal ({', '.join(JOURNAL_COLUMNS)}) FROM STDIN") as copy:
                    for j in journal:
                        copy.write_row(j)
                # The ids were given: the product's next ones come after them.
                cur.execute(
                    "SELECT setval(pg_get_serial_sequence('enrollment_journal', 'id'),"
                    " (SELECT max(id) FROM enrollment_journal))"
                )
            return
        cur = raw.cursor()
        try:
            marks = ", ".join("?" * len(ENROLLMENT_COLUMNS))
            cur.executemany(
                f"INSERT INTO enrollments ({', '.join(ENROLLMENT_COLUMNS)}) VALUES ({marks})", rows
            )
            marks = ", ".join("?" * len(JOURNAL_COLUMNS))
            cur.executemany(
                f"INSERT INTO enrollment_journal ({', '.join(JOURNAL_COLUMNS)}) VALUES ({marks})", journal
            )
        finally:
            cur.close()


def _analyze(db: Database) -> None:
    """PostgreSQL: refresh the planner's statistics, as autovacuum does soon after a bulk
    load (the plan of the due query should not depend on luck with its timing)."""
    if db.dialect.value == "postgresql":
        with db.write() as conn:
            conn.exec_driver_sql("ANALYZE enrollments")
            conn.exec_driver_sql("ANALYZE enrollment_journal")


def idle_poll(container: Container, waiting: int, reps: int) -> IdlePoll:
    """With nothing due: the due query alone, the timer step (its write transaction, the
    due query, the date schedules), and a whole pass of the worker (partition leases,
    pending partitions, timers, outbox), each as the worker runs them."""
    db = container.db
    clock = SystemClock()
    due_times: list[float] = []
    with db.read() as conn:
        for i in range(reps + 10):
            now = clock.now()
            t0 = time.perf_counter()
            found = journey_repo.due(conn, now, limit=500)
            elapsed = time.perf_counter() - t0
            if found:
                raise RuntimeError(f"{len(found)} enrollments are due; the idle poll needs none")
            if i >= 10:
                due_times.append(elapsed)
    step_times: list[float] = []
    for i in range(reps // 2 + 5):
        t0 = time.perf_counter()
        fire_timers(db, clock, partitions=PARTITIONS)
        elapsed = time.perf_counter() - t0
        if i >= 5:
            step_times.append(elapsed)
    pass_times: list[float] = []
    for i in range(reps // 4 + 3):
        t0 = time.perf_counter()
        handled = container.worker.run_once()
        elapsed = time.perf_counter() - t0
        if handled:
            raise RuntimeError(f"the idle worker pass handled {handled} items")
        if i >= 3:
            pass_times.append(elapsed)
    return IdlePoll(
        waiting=waiting,
        due_median=statistics.median(due_times),
        due_p99=percentile(due_times, 99),
        step_median=statistics.median(step_times),
        step_p99=percentile(step_times, 99),
        pass_median=statistics.median(pass_times),
    )


def due_plan(db: Database) -> list[str]:
    """The plan of the due query as the product sends it (statement and parameters
    captured: the read runs on the driver's cursor, a ``DriverQuery``)."""
    captured: list[tuple[str, Any]] = []
    with recorded(captured), db.read() as conn:
        journey_repo.due(conn, SystemClock().now(), limit=500)
    statement, parameters = [c for c in captured if "FROM enrollments" in c[0]][-1]
    with db.read() as conn:
        if db.dialect.value == "postgresql":
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters)
            return [str(r[0]) for r in rows]
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        return [str(r[-1]) for r in rows]


def measure_bytes(db: Database, result: TimerResult) -> None:
    with db.read() as conn:
        if db.dialect.value == "postgresql":
            result.bytes_enrollments = int(
                conn.execute(text("SELECT pg_total_relation_size('enrollments')")).scalar_one()
            )
            result.bytes_journal = int(
                conn.execute(text("SELECT pg_total_relation_size('enrollment_journal')")).scalar_one()
            )
            result.bytes_file = int(
                conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            )
            return
    with db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes = {
            str(name): int(size)
            for name, size in conn.exec_driver_sql(
                "SELECT m.tbl_name, SUM(s.pgsize) FROM dbstat s JOIN sqlite_master m ON m.name = s.name "
                "WHERE m.tbl_name IN ('enrollments', 'enrollment_journal') GROUP BY m.tbl_name"
            )
        }
        page_size = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
        pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())
    result.bytes_enrollments = sizes.get("enrollments", 0)
    result.bytes_journal = sizes.get("enrollment_journal", 0)
    result.bytes_file = page_size * pages


def real_path(db: Database, ws: str, count: int, per_tx: int, first: int) -> tuple[float, Cpu]:
    """Enter ``count`` people through the product's code; returns enrollments/s."""
    clock = SystemClock()
    key = WAIT_JOURNEY["key"]
    profile_ids = [f"prf_real{first + i:010d}" for i in range(count)]
    with measure_cpu() as cpu:
        t0 = time.perf_counter()
        if per_tx == 1:
            for pid in profile_ids:
                with db.write() as conn:
                    if (
                        journeys.enroll(
                            conn, ws, key, pid, payload=None, now=clock.now(), partitions=PARTITIONS
                        )
                        is None
                    ):
                        raise RuntimeError(f"{pid} was not entered")
        else:
            for lo in range(0, count, per_tx):
                with db.write() as conn:
                    journey = journey_repo.journey_by_key(conn, ws, key)
                    for pid in profile_ids[lo : lo + per_tx]:
                        entered = runtime.try_enter(
                            conn,
                            ws,
                            journey,
                            pid,
                            trigger=None,
                            payload=None,
                            now=clock.now(),
                            partitions=PARTITIONS,
                        )
                        if entered is None:
                            raise RuntimeError(f"{pid} was not entered")
        elapsed = time.perf_counter() - t0
    return count / elapsed, cpu


def _make_due(db: Database, ids: Sequence[str], at: datetime) -> None:
    with db.write() as conn:
        for lo in range(0, len(ids), 500):
            conn.execute(
                update(enrollments).where(enrollments.c.id.in_(list(ids[lo : lo + 500]))).values(wake_at=at)
            )


def _lags(batches: list[tuple[float, int]], due_at: float, due: int, name: str, cpu: Cpu) -> Lag:
    lags: list[float] = []
    for at, n in batches:
        lags.extend([at - due_at] * n)
    fired = len(lags)
    lags.extend([math.inf] * max(0, due - fired))
    last = batches[-1][0] if batches else due_at
    return Lag(
        name=name,
        due=due,
        fired=fired,
        p50=percentile(lags, 50),
        p99=percentile(lags, 99),
        max=percentile(lags, 100),
        first=batches[0][0] - due_at if batches else math.inf,
        timers_per_second=fired / (last - due_at) if last > due_at else 0.0,
        cpu=cpu,
    )


class _RecordedStep(TimerStep):
    """The product's timer step, noting when each of its batches committed and how many
    it fired (its threads' batches too), for the lags."""

    def __init__(self, step: TimerStep) -> None:
        super().__init__(
            step.db,
            step.clock,
            partitions=step.partitions,
            threads=step.threads,
            limit=step.limit,
            budget_seconds=step.budget_seconds,
        )
        self.batches: list[tuple[float, int]] = []
        self.lock = threading.Lock()

    def _batch(self) -> int:
        n = super()._batch()
        if n:
            with self.lock:
                self.batches.append((time.time(), n))
        return n


def lag_timer_step(
    db: Database, step: TimerStep, ids: Sequence[str], lead: float, limit: float, poll: float
) -> Lag:
    """The timer step alone (the product's, as the container builds it: on PostgreSQL it
    fires in ``pipeline.timer_threads`` threads once a batch comes back full), looped as
    ``PipelineWorker.loop`` loops: at once again while it finds work, else after the poll
    interval or, when sooner, when the next timer is due."""
    clock = SystemClock()
    recorded = _RecordedStep(step)
    due_at = time.time() + lead
    _make_due(db, ids, datetime.fromtimestamp(due_at, UTC))
    # Frozen as ``whenthen worker`` freezes its start-up heap: the bench's own objects
    # (the fill's rows, the picked ids, earlier phases' results) are not in a worker's
    # heap, and the full collections walking them took 15-20 % of a 10,000-timer wake-up.
    freeze_start_up_heap()
    fired = 0
    with measure_cpu() as cpu:
        deadline = due_at + limit
        while fired < len(ids) and time.time() < deadline:
            n = recorded()
            if n:
                fired += n
            else:
                # As the worker's idle wait (PipelineWorker._idle_wait): the poll interval,
                # or until the next timer falls due when that is sooner.
                until = seconds_to_next_timer(db, clock)
                time.sleep(min(poll, until + 0.002) if until else poll)
    threads = f"{recorded.threads} thread{'s' if recorded.threads > 1 else ''}"
    name = f"timer step alone ({threads} once a batch is full)"
    return _lags(sorted(recorded.batches), due_at, len(ids), name, cpu)


def _timer_process(url: str, due: int, fired: Any, deadline: float, out: Any) -> None:
    """One timer process of :func:`lag_timer_processes`: the timer step looped as the
    worker loops it, until the processes together fired ``due`` (``fired``, shared)."""
    db = Database(url)
    clock = SystemClock()
    batches: list[tuple[float, int]] = []
    try:
        while time.time() < deadline:
            with fired.get_lock():
                if fired.value >= due:
                    break
            n = fire_timers(db, clock, partitions=PARTITIONS)
            if n:
                batches.append((time.time(), n))
                with fired.get_lock():
                    fired.value += n
            else:
                time.sleep(0.002)
    finally:
        out.put(batches)
        db.dispose()


def lag_timer_processes(url: str, ids: Sequence[str], lead: float, limit: float, processes: int) -> Lag:
    """The timer step in ``processes`` processes at once, as that many ``whenthen worker``
    processes share the due timers on PostgreSQL (``FOR UPDATE SKIP LOCKED``); each
    process's CPU is counted as the workers'."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    fired = ctx.Value("q", 0)
    out = ctx.Queue()
    due_at = time.time() + lead
    db = Database(url)
    try:
        _make_due(db, ids, datetime.fromtimestamp(due_at, UTC))
    finally:
        db.dispose()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with measure_cpu() as cpu:
        procs = [
            ctx.Process(target=_timer_process, args=(url, len(ids), fired, due_at + limit, out))
            for _ in range(processes)
        ]
        for proc in procs:
            proc.start()
        batches: list[tuple[float, int]] = []
        for _ in procs:
            batches.extend(out.get(timeout=limit + lead + 60))
        for proc in procs:
            proc.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    cpu.worker = children / max(1e-9, time.perf_counter() - t0)
    batches.sort()
    return _lags(
        batches,
        due_at,
        len(ids),
        f"timer step in {processes} processes (PostgreSQL; their backends count as other processes)",
        cpu,
    )


def lag_worker(
    container: Container,
    ids: Sequence[str],
    lead: float,
    limit: float,
    *,
    role: Role = Role.ALL,
    name: str = "real worker (pipeline + timers each pass, outbox in its own thread)",
    others: WorkerGroup | None = None,
) -> Lag:
    """The real worker (pipeline and timers on every pass, the outbox dispatcher in its own
    thread; with ``role``, only that role's threads), with its timer step wrapped to
    timestamp each batch after its commit. ``others``: worker processes running beside
    it (their CPU counted as the workers')."""
    timers = container.worker.steps[0]
    assert isinstance(timers, TimerStep), "bootstrap.build adds the journey timer step first"
    recorded = _RecordedStep(timers)
    try:
        container.worker.steps[0] = recorded
        due_at = time.time() + lead
        _make_due(container.db, ids, datetime.fromtimestamp(due_at, UTC))
        freeze_start_up_heap()  # as in lag_timer_step
        with measure_cpu(worker=others) as cpu:
            container.worker.start(role)
            deadline = due_at + limit
            while time.time() < deadline:
                with recorded.lock:
                    if sum(n for _, n in recorded.batches) >= len(ids):
                        break
                time.sleep(0.05)
            container.worker.stop()
    finally:
        container.worker.steps[0] = timers
    return _lags(sorted(recorded.batches), due_at, len(ids), name, cpu)


def lag_worker_roles(
    container: Container, env: dict[str, str], log_path: Path, ids: Sequence[str], lead: float, limit: float
) -> Lag:
    """The role layout (``whenthen worker --role pipeline`` and ``--role dispatch``): this
    process's worker runs the pipeline role (events, timers and the other steps), and a
    ``whenthen worker --role dispatch`` process sends the emails the timers queue, woken
    as in production."""
    dispatcher = WorkerGroup([WorkerProcess(env, log_path, role="dispatch")])
    try:
        return lag_worker(
            container,
            ids,
            lead,
            limit,
            role=Role.PIPELINE,
            name="worker, pipeline role (the outbox in a `--role dispatch` process)",
            others=dispatcher,
        )
    finally:
        dispatcher.stop()


def bench_timers(args: argparse.Namespace, target: Target, logs: Path) -> TimerResult:
    result = TimerResult(label=target.label, kind=target.kind)
    _say(f"\n== Timers, {target.label}")
    url = target.fresh("timers")
    # The worker and its database as ``whenthen worker`` builds them (email captured: no SMTP).
    settings = Settings(database_url=url, sqlite_synchronous=target.synchronous, demo_workspace=False)
    container = build(settings, clock=SystemClock())
    db = container.db
    try:
        now = SystemClock().now()
        with db.write() as conn:
            ws = workspaces.create_workspace(conn, "bench timers", now=now).id
            journeys.push(conn, ws, WAIT_JOURNEY, now=now)
            journeys.publish(conn, ws, WAIT_JOURNEY["key"], now=now)
            journey = journey_repo.journey_by_key(conn, ws, WAIT_JOURNEY["key"])
        definition = parse_definition(WAIT_JOURNEY)
        fill = BulkFill(db, target.kind, ws, journey.id, journey.active_version, definition)
        total = args.enrollments
        real_total = args.sample + args.single
        points = sorted({p for p in (1_000, 100_000) if p < total} | {total})
        multi = args.timer_processes > 1 and target.kind == "postgres"
        lag_sets = (3 if multi else 2) * args.due
        for point in points:
            if point == total:
                bulk_to = total - real_total
                fill.fill_to(bulk_to, pick=lag_sets)
                people = fill.add_people()
                _say(f"  profiles with an email address for the {people:,} people the lag runs wake")
                _analyze(db)
                rate = (fill.count / fill.seconds) if fill.seconds else 0.0
                result.bulk_rows_per_second = rate
                result.engine_seconds_per_row = fill.engine_seconds / max(1, fill.count)
                _say(
                    f"  bulk fill (setup, not the product path): {fill.count:,} enrollments + "
                    f"{fill.journal_rows:,} journal rows in {fill.seconds:.1f} s = {rate:,.0f} enrollments/s "
                    f"(pure engine {_us(result.engine_seconds_per_row)} of it per enrollment)"
                )
                rate, cpu = real_path(db, ws, args.sample, 500, 0)
                result.batch_per_second, result.batch_cpu = rate, cpu
                _say(
                    f"  product path, runtime.try_enter in transactions of 500: {args.sample:,} in "
                    f"{args.sample / rate:.1f} s = {rate:,.0f} enrollments/s ({_us(1 / rate)} each)\n"
                    f"    {cpu.text()}"
                )
                rate, cpu = real_path(db, ws, args.single, 1, args.sample)
                result.single_per_second, result.single_cpu = rate, cpu
                _say(
                    f"  product path, journeys.enroll one per transaction: {args.single:,} in "
                    f"{args.single / rate:.1f} s = {rate:,.0f} enrollments/s ({_us(1 / rate)} each)\n"
                    f"    {cpu.text()}"
                )
                _analyze(db)
            else:
                fill.fill_to(point)
                _analyze(db)
            with db.read() as conn:
                waiting = journey_repo.count_active(conn, journey.id)
            poll = idle_poll(container, waiting, args.idle_reps)
            result.idle.append(poll)
            _say(
                f"  idle poll at {waiting:,} waiting: due() median {_us(poll.due_median)} "
                f"(p99 {_us(poll.due_p99)}); timer step median {_us(poll.step_median)} "
                f"(p99 {_us(poll.step_p99)}); whole worker pass median {_us(poll.pass_median)}"
            )
        result.enrollments = result.idle[-1].waiting
        result.plan = due_plan(db)
        _say("  plan of the due query: " + "\n    ".join(result.plan))
        measure_bytes(db, result)
        result.journal_rows = fill.journal_rows + 2 * real_total
        n = result.enrollments
        _say(
            f"  bytes per waiting enrollment: {result.bytes_enrollments / n:,.0f} (enrollments + indexes), "
            f"{result.bytes_journal / n:,.0f} (its journal + indexes), "
            f"{result.bytes_file / n:,.0f} ({'database' if target.kind == 'postgres' else 'file'} / count)"
        )
        picked = fill.picked
        if len(picked) < lag_sets:
            raise RuntimeError(f"only {len(picked)} enrollments picked for the lag runs, need {lag_sets}")
        poll_interval = PipelineSettings().poll_interval_seconds
        step = journey_timer_step(db, SystemClock(), settings)
        lag = lag_timer_step(db, step, picked[: args.due], 1.0, args.lag_limit, poll_interval)
        result.lags.append(lag)
        _say(_describe_lag(lag))
        if args.lag_worker:
            # The first set's emails are still queued: mark them done, so that the worker's
            # dispatcher has only the second set's own emails to interleave with its timers.
            with db.write() as conn:
                conn.execute(
                    update(outbox).where(outbox.c.done_at.is_(None)).values(done_at=SystemClock().now())
                )
            lag = lag_worker(container, picked[args.due : 2 * args.due], 1.5, args.lag_limit)
            result.lags.append(lag)
            _say(_describe_lag(lag))
            # The role layout, on another set as spread over the table as the others.
            with db.write() as conn:
                conn.execute(
                    update(outbox).where(outbox.c.done_at.is_(None)).values(done_at=SystemClock().now())
                )
            between = fill.picked_between[: args.due]
            lag = lag_worker_roles(
                container,
                server_env(url, target.synchronous),
                logs / f"timers-dispatch-{target.kind}.log",
                between,
                1.5,
                args.lag_limit,
            )
            result.lags.append(lag)
            _say(_describe_lag(lag))
        if multi:
            lag = lag_timer_processes(
                url, picked[2 * args.due : lag_sets], 1.5, args.lag_limit, args.timer_processes
            )
            result.lags.append(lag)
            _say(_describe_lag(lag))
    finally:
        container.close()
    return result


def _describe_lag(lag: Lag) -> str:
    missing = f" ({lag.due - lag.fired:,} NOT fired within the limit)" if lag.fired < lag.due else ""
    return (
        f"  wake-up lag, {lag.due:,} due at once, {lag.name}:{missing}\n"
        f"    p50 {_ms(lag.p50)}, p99 {_ms(lag.p99)}, max {_ms(lag.max)}; "
        f"first batch after {_ms(lag.first)}; "
        f"{lag.timers_per_second:,.0f} timers/s\n    {lag.cpu.text()}\n    {_capacity(lag)}"
    )


def _capacity(lag: Lag) -> str:
    """The phase's CPU per wake-up (what the processes used, the lead before the timers
    fall due included: idle polls, next to nothing) and the wall time that CPU needs at
    the least on this machine's cores, perfectly shared: when that floor is near the
    lag, the machine is full and only less work per wake-up shortens it."""
    cores = os.cpu_count() or 1
    used = lag.cpu.core_seconds()
    return (
        f"cpu per wake-up: {used / max(1, lag.fired) * 1e6:,.0f} µs (processes and PostgreSQL together);"
        f" on {cores} cores that is at least {_ms(used / cores)} for the {lag.fired:,}"
    )


# ---- report ---------------------------------------------------------------------------


def _delivery_label(r: DeliveryResult) -> str:
    return _short_label(r.label, r.kind) + {
        "split": ", API + worker processes",
        "roles": ", API + pipeline + dispatcher processes",
    }.get(r.layout, "")


def report(delivery: list[DeliveryResult], timers: list[TimerResult]) -> None:
    _say("\n== Results")
    if delivery:
        _say("\nEvent -> email handed to the SMTP server (latency from the scheduled send time)")
        w = max([32, *(len(_delivery_label(r)) for r in delivery)])
        _say(
            f"  {'database':<{w}} {'offered':>8} {'emailed':>13} {'p50':>9} {'p95':>9} {'p99':>9} "
            f"{'max':>9} {'emails/s':>8} {'backlog':>7} {'ack p99':>9}"
        )
        for r in delivery:
            label = _delivery_label(r)
            if r.failure:
                _say(f"  {label:<{w}} FAILED: {r.failure}")
            for p in r.phases:
                emailed = f"{p.emailed:,}/{p.acked:,}"
                _say(
                    f"  {label:<{w}} {p.rate:>6,.0f}/s {emailed:>13} {_cell(p.p50):>9} {_cell(p.p95):>9} "
                    f"{_cell(p.p99):>9} {_cell(p.max):>9} {p.emails_per_second_during:>8,.0f} "
                    f"{p.backlog_at_end:>7,} {_cell(p.ack_p99):>9}"
                )
        _say(
            "  (latency: SMTP arrival - scheduled send; 'lost' = no email within the wait;\n"
            "   emails/s: while the schedule ran; backlog: events without their email when it ended;\n"
            "   ack p99: the /v1/track answer)"
        )
        for r in delivery:
            label = _delivery_label(r)
            at_goal = [p for p in r.phases if p.rate == DELIVERY_GOAL_RATE]
            if not at_goal:
                if not r.failure:
                    _say(f"  goal at {DELIVERY_GOAL_RATE:,.0f} events/s, {label}: not measured (see above)")
                continue
            p = at_goal[0]
            ratio = p.p99 / DELIVERY_GOAL_P99
            _say(
                f"  goal p99 < {_ms(DELIVERY_GOAL_P99)} at {DELIVERY_GOAL_RATE:,.0f} events/s, {label}: "
                f"p99 {_ms(p.p99)} = {ratio:,.1f} x the goal: {_mark(p.p99 < DELIVERY_GOAL_P99)}"
                + (
                    f"; it delivered ~{p.emails_per_second_overall:,.0f} emails/s "
                    f"({p.emails_per_second_overall / DELIVERY_GOAL_RATE:.2f} x the offered rate)"
                    if p.p99 >= DELIVERY_GOAL_P99
                    else ""
                )
            )
    if timers:
        _say("\nWaiting enrollments (timers)")
        for t in timers:
            if t.failure:
                _say(f"  {t.label}: FAILED: {t.failure}")
                continue
            n = t.enrollments
            _say(f"  {t.label}, {n:,} waiting")
            _say(
                f"    time to schedule {n:,}: product path {n / t.batch_per_second:,.0f} s "
                f"({t.batch_per_second:,.0f}/s, try_enter x500 per transaction); "
                f"one per transaction {n / t.single_per_second:,.0f} s ({t.single_per_second:,.0f}/s); "
                f"bulk fill (setup) {n / t.bulk_rows_per_second:,.0f} s ({t.bulk_rows_per_second:,.0f}/s)"
            )
            _say(
                f"    bytes per timer: {t.bytes_enrollments / n:,.0f} enrollment + "
                f"{t.bytes_journal / n:,.0f} journal = {(t.bytes_enrollments + t.bytes_journal) / n:,.0f} "
                f"({t.journal_rows / n:.1f} journal rows each); "
                f"whole database / count {t.bytes_file / n:,.0f}"
            )
            idle = ", ".join(f"{_us(p.due_median)} at {p.waiting:,}" for p in t.idle)
            step = ", ".join(f"{_us(p.step_median)}" for p in t.idle)
            ok = t.idle_ratio <= IDLE_GOAL_RATIO
            _say(
                f"    idle poll due(): {idle}; ratio {t.idle[-1].waiting:,}/{t.idle[0].waiting:,} = "
                f"{t.idle_ratio:.2f} (goal ~1, <= {IDLE_GOAL_RATIO:g}): {_mark(ok)}"
            )
            _say(f"    whole idle timer step: {step}; ratio {t.step_ratio:.2f}")
            passes = ", ".join(f"{_us(p.pass_median)}" for p in t.idle)
            _say(f"    whole idle worker pass (run_once): {passes}; ratio {t.pass_ratio:.2f}")
            for lag in t.lags:
                _say(
                    f"    wake-up lag, {lag.due:,} at once, {lag.name}: "
                    f"p50 {_ms(lag.p50)}, p99 {_ms(lag.p99)}, "
                    f"max {_ms(lag.max)} = {lag.p99 / LAG_GOAL_P99:.2f} x the 1 s goal: "
                    f"{_mark(lag.p99 < LAG_GOAL_P99)}"
                )


def _as_json(delivery: list[DeliveryResult], timers: list[TimerResult], args: argparse.Namespace) -> Any:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None if math.isnan(value) else "inf"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "delivery": [asdict(r) for r in delivery],
            "timers": [asdict(t) for t in timers],
        }
    )


# ---- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.journeys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short phases and 100,000 timers (< 90 s)")
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--part", choices=("delivery", "timers", "both"), default="both")
    p.add_argument("--postgres-url", default=os.environ.get("WHENTHEN_BENCH_POSTGRES", DEFAULT_POSTGRES))
    p.add_argument(
        "--sqlite-synchronous",
        help="delivery: comma-separated SQLite synchronous modes (default FULL,NORMAL; --quick: FULL)",
    )
    p.add_argument("--rates", default="200,1000", help="delivery: events/s of each phase (default 200,1000)")
    p.add_argument("--seconds", type=float, help="delivery: length of each phase (default 5; --quick 2)")
    p.add_argument("--drain", type=float, help="delivery: most seconds to wait for the emails after a phase")
    p.add_argument("--users", type=int, help="delivery: people identified first (default 2000; --quick 1000)")
    p.add_argument("--connections", type=int, default=64, help="delivery: connections of the open loop")
    p.add_argument(
        "--server",
        choices=("cli", "app"),
        default="cli",
        help="cli: `whenthen serve` as shipped (default); app: the same app with uvicorn's access log off",
    )
    p.add_argument(
        "--layout",
        choices=("embedded", "split", "roles", "both", "all"),
        default="embedded",
        help="delivery: embedded: `whenthen serve` with its worker (default); split: `whenthen serve "
        "--no-worker` and `whenthen worker` in two processes; roles: `whenthen serve --no-worker`, "
        "`whenthen worker --role pipeline` and `--role dispatch` in three; both: embedded then "
        "split; all: the three in turn",
    )
    p.add_argument(
        "--enrollments", type=int, help="timers: waiting enrollments (default 1,000,000; --quick 100,000)"
    )
    p.add_argument(
        "--due", type=int, help="timers: enrollments falling due at once (default 10,000; --quick 5,000)"
    )
    p.add_argument("--sample", type=int, help="timers: product-path enrollments, 500 per transaction")
    p.add_argument("--single", type=int, help="timers: product-path enrollments, one per transaction")
    p.add_argument(
        "--lag-limit", type=float, default=60.0, help="timers: most seconds to wait for the due ones"
    )
    p.add_argument(
        "--timer-processes",
        type=int,
        default=1,
        metavar="N",
        help="timers, PostgreSQL: also measure the wake-up lag with the timer step in N processes"
        " at once, as N `whenthen worker` processes share the timers (default 1: not measured)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each database, wait up to this long for the machine to be idle (default 0)",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--tmpdir", type=Path, help="folder for SQLite files (default: the system temp folder)")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
    if args.users is None:
        args.users = 1000 if args.quick else 2000
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    if args.drain is None:
        args.drain = 6.0 if args.quick else 15.0
    if args.sqlite_synchronous is None:
        args.sqlite_synchronous = "FULL" if args.quick else "FULL,NORMAL"
    if args.enrollments is None:
        args.enrollments = 100_000 if args.quick else 1_000_000
    if args.due is None:
        args.due = 5_000 if args.quick else 10_000
    if args.sample is None:
        args.sample = 1_000 if args.quick else 10_000
    if args.single is None:
        args.single = 100 if args.quick else 1_000
    args.idle_reps = 60 if args.quick else 300
    # --quick: only the timer step alone for the wake-up lag (the worker-thread run is the
    # same work interleaved with the pipeline and the outbox, and takes as long again).
    args.lag_worker = not args.quick
    args.warmup = 1.0
    if args.enrollments < args.sample + args.single + 2 * args.due + 1_000:
        p.error("--enrollments must exceed --sample + --single + 2 x --due + 1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    _say(
        f"whenthen journeys bench: {platform.node()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; "
        f"machine load before the run {machine_load():.2f} cores busy; "
        f"a 10-million-step Python loop {python_loop_seconds():.2f} s (0.62 on the best days)"
    )
    db = choose_databases(args.db, args.postgres_url, _say)
    if db is None:
        return 2
    args.db = db
    delivery: list[DeliveryResult] = []
    timers: list[TimerResult] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="whenthen-bench-journeys-") as logs:
        if args.part in ("delivery", "both"):
            modes = [m.strip().upper() for m in args.sqlite_synchronous.split(",") if m.strip()]
            layouts = {"both": ["embedded", "split"], "all": ["embedded", "split", "roles"]}.get(
                args.layout, [args.layout]
            )
            for make in target_makers(args.db, modes, args.tmpdir, args.postgres_url):
                target = make()
                try:
                    for layout in layouts:
                        wait_quiet(args.wait_quiet)
                        try:
                            delivery.append(bench_delivery(args, target, Path(logs), layout))
                        except Exception as exc:  # report it and go on with the next one
                            failed = True
                            _say(f"  FAILED: {type(exc).__name__}: {exc}")
                            delivery.append(
                                DeliveryResult(
                                    target.label,
                                    target.kind,
                                    target.synchronous,
                                    args.server,
                                    failure=str(exc),
                                    layout=layout,
                                )
                            )
                finally:
                    target.cleanup()
        if args.part in ("timers", "both"):
            for make in target_makers(args.db, ["FULL"], args.tmpdir, args.postgres_url):
                wait_quiet(args.wait_quiet)
                target = make()
                try:
                    timers.append(bench_timers(args, target, Path(logs)))
                except Exception as exc:  # report it, clean up, and go on with the next database
                    failed = True
                    _say(f"  FAILED: {type(exc).__name__}: {exc}")
                    timers.append(TimerResult(target.label, target.kind, failure=str(exc)))
                finally:
                    target.cleanup()
    report(delivery, timers)
    _say(f"\n(run took {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_as_json(delivery, timers, args), indent=2))
        _say(f"wrote {args.json}")
    return 1 if failed or not all(_VERDICTS) else 0


if __name__ == "__main__":
    sys.exit(main())
