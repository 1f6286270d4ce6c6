"""Ingest throughput and latency, against the raw insert rate measured in the same run.

    python -m bench.ingest                 # SQLite (FULL and NORMAL) and PostgreSQL, ~2.5 min
    python -m bench.ingest --quick         # SQLite FULL and PostgreSQL, 2 s phases, < 1 min
    python -m bench.ingest --db sqlite --sqlite-synchronous FULL --seconds 10
    python -m bench.ingest --wait-quiet 120 --json bench/results/ingest.json

For each database the bench:

1. makes a fresh database, creates a workspace with ``whenthen workspace create --json``
   and starts the API in its own process on 127.0.0.1 (pipeline worker off unless
   ``--worker``), with the rate limit raised far above what it can send;
2. ``/v1/batch``: keeps ``--concurrency`` requests of 100 calls in flight for
   ``--seconds`` (closed loop), a phase for each level given (default 4 and 8), counts
   the events the server says it stored, and keeps the best level's rate;
3. ``/v1/track`` open loop: one call per request on a fixed schedule of ``--track-rate``
   requests/s, latency from the scheduled send time (no coordinated omission);
4. ``/v1/track`` closed loop: the most single calls per second it can take;
5. stops the server, checks that the table holds every event it counted, and measures the
   raw insert rate of the same rows straight into another fresh database (bench/raw.py);
6. prints both and their ratio, and whether each goal is met.

Everything it creates (SQLite files, PostgreSQL databases, the server process) is removed
at the end, also on failure or Ctrl-C. Goals (docs/benchmarks.md): batch >= 50 % of the
raw rate; batch >= 10,000 events/s on SQLite; p99 of single track < 25 ms at 500 req/s.
It exits 0 when every goal is met, 1 when one is not, 2 when ``--db postgres`` finds no
server. CPU use is printed per phase: when other processes take CPU the phase is flagged,
as its figures are then low (the machine has 2 cores, shared with the load generator).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select

from bench import raw
from bench.loadgen import Client, Outcome, closed_loop, open_loop
from bench.raw import RawOutcome
from bench.targets import (
    DEFAULT_POSTGRES,
    ServerProcess,
    Target,
    choose_databases,
    create_workspace,
    machine_busy_seconds,
    postgres_cpu_seconds,
    server_env,
    target_makers,
)
from bench.workload import Workload
from whenthen.storage import Database
from whenthen.tracking.tables import events

T = TypeVar("T")

BATCH_GOAL_RATIO = 0.50
SQLITE_GOAL_EVENTS = 10_000.0
TRACK_GOAL_P99 = 0.025


@dataclass
class Cpu:
    """Average CPU use during a phase, in cores (2.0 = both cores of this machine busy).

    ``other`` is what the machine spent beyond the server, the bench and PostgreSQL: other
    processes competing for the cores, which make the figures of that phase low.
    """

    server: float = 0.0
    client: float = 0.0
    postgres: float = 0.0
    machine: float = 0.0

    @property
    def other(self) -> float:
        return max(0.0, self.machine - self.server - self.client - self.postgres)

    def text(self) -> str:
        pg = f", postgres {self.postgres:.2f}" if self.postgres >= 0.005 else ""
        return (
            f"cpu (cores): server {self.server:.2f}, bench {self.client:.2f}{pg}, "
            f"other processes {self.other:.2f}; machine {self.machine:.2f} of {os.cpu_count()}"
        )


@dataclass
class Phase:
    outcome: Outcome
    cpu: Cpu


@dataclass
class Result:
    label: str
    kind: str
    synchronous: str
    server: str
    batch: Phase | None = None
    batch_concurrency: int = 0
    batch_by_concurrency: dict[int, float] = field(default_factory=dict)
    track_open: Phase | None = None
    track_closed: Phase | None = None
    raw: list[RawOutcome] = field(default_factory=list)
    raw_cpu: list[Cpu] = field(default_factory=list)
    stored_checked: int = 0
    failure: str | None = None

    @property
    def disturbed(self) -> bool:
        """Whether other processes took CPU during any phase (see ``Cpu.other``)."""
        phases = [p.cpu for p in (self.batch, self.track_open, self.track_closed) if p is not None]
        return any(c.other > QUIET for c in [*phases, *self.raw_cpu])

    @property
    def best_raw(self) -> RawOutcome | None:
        return max(self.raw, key=lambda r: r.rows_per_second, default=None)

    @property
    def ratio(self) -> float:
        best = self.best_raw
        if self.batch is None or best is None or not best.rows_per_second:
            return float("nan")
        return float(self.batch.outcome.events_per_second / best.rows_per_second)


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Measures a phase's CPU use. ``postgres`` says whether PostgreSQL's processes work for
    the bench (on SQLite their CPU is other processes' load)."""

    def __init__(self, server: ServerProcess | None, *, postgres: bool) -> None:
        self.server = server
        self.postgres = postgres

    @contextlib.contextmanager
    def measure(self) -> Iterator[Cpu]:
        cpu = Cpu()
        s0 = self.server.cpu_seconds() if self.server else 0.0
        c0 = _client_cpu()
        p0 = postgres_cpu_seconds()
        busy0, _ = machine_busy_seconds()
        t0 = time.perf_counter()
        yield cpu
        wall = time.perf_counter() - t0
        busy1, _ = machine_busy_seconds()
        cpu.server = ((self.server.cpu_seconds() if self.server else 0.0) - s0) / wall
        cpu.client = (_client_cpu() - c0) / wall
        if self.postgres:
            cpu.postgres = max(0.0, postgres_cpu_seconds() - p0) / wall
        cpu.machine = (busy1 - busy0) / wall


def _say(text: str) -> None:
    print(text, flush=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _describe(o: Outcome) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(o.errors.items())) or "none"
    return (
        f"{o.ok} ok in {o.elapsed:.1f} s = {o.requests_per_second:,.0f} req/s, "
        f"{o.events_per_second:,.0f} events/s; latency p50 {_ms(o.percentile(50))}, "
        f"p95 {_ms(o.percentile(95))}, p99 {_ms(o.percentile(99))}, max {_ms(o.percentile(100))}; "
        f"errors {errors}"
    )


async def _phase(
    args: argparse.Namespace,
    meter: CpuMeter,
    make: Callable[[], Coroutine[Any, Any, Outcome]],
    title: str,
    stored: list[int],
) -> Phase:
    """Run a load phase; with ``--retries``, run it again while other processes disturb it
    and keep the least disturbed. Adds the events stored by every attempt to ``stored``."""
    _say(f"  {title} ...")
    best: Phase | None = None
    for attempt in range(args.retries + 1):
        if attempt:
            _say("    measuring again")
            await wait_quiet_async(args.wait_quiet)
        with meter.measure() as cpu:
            outcome = await make()
        stored[0] += outcome.events
        _say(f"    {_describe(outcome)}")
        per_request = cpu.server * outcome.elapsed / outcome.requests * 1000 if outcome.requests else 0.0
        _say(f"    {cpu.text()}; server CPU {per_request:.2f} ms a request{_disturbed(cpu)}")
        if best is None or cpu.other < best.cpu.other:
            best = Phase(outcome, cpu)
        if cpu.other <= QUIET:
            break
    assert best is not None
    return best


#: Cores other processes may use before a phase's figures are flagged as disturbed.
QUIET = 0.15


def _disturbed(cpu: Cpu) -> str:
    if cpu.other <= QUIET:
        return ""
    return "\n    WARNING: other processes competed for the CPU; this phase's figures are low"


async def drive(args: argparse.Namespace, result: Result, server: ServerProcess, write_key: str) -> int:
    """Runs the HTTP phases; returns how many events the server said it stored."""
    client = Client("127.0.0.1", server.port, write_key)
    work = Workload(f"b{os.getpid()}")
    meter = CpuMeter(server, postgres=result.kind == "postgres")
    seconds: float = args.seconds
    batch_size: int = args.batch_size

    def batch() -> bytes:
        return work.batch_body(batch_size)

    stored = [0]
    # Warm up: connection pools, statement caches, SQLite's page cache, the server's imports.
    for path, body, conc in (("/v1/batch", batch, 2), ("/v1/track", work.track_body, 4)):
        warm = await closed_loop(client, path, body, concurrency=conc, seconds=args.warmup, name="warm-up")
        if warm.errors or not warm.ok:
            raise RuntimeError(f"warm-up of {path} failed: {warm.errors}")
        stored[0] += warm.events

    # The server's batch rate is its best over the levels of concurrency (as the raw rate
    # is the best of its variants): with group commit, requests in flight share commits,
    # so too few in flight leave it waiting on the disk rather than working.
    for conc in args.concurrency:
        phase = await _phase(
            args,
            meter,
            lambda conc=conc: closed_loop(  # type: ignore[misc]
                client, "/v1/batch", batch, concurrency=conc, seconds=seconds, name="batch"
            ),
            f"/v1/batch, {batch_size} calls a request, {conc} in flight, {seconds:g} s",
            stored,
        )
        result.batch_by_concurrency[conc] = phase.outcome.events_per_second
        if result.batch is None or phase.outcome.events_per_second > result.batch.outcome.events_per_second:
            result.batch = phase
            result.batch_concurrency = conc
    result.track_open = await _phase(
        args,
        meter,
        lambda: open_loop(
            client,
            "/v1/track",
            work.track_body,
            rate=args.track_rate,
            seconds=seconds,
            connections=args.track_connections,
            name="track open loop",
        ),
        f"/v1/track open loop, {args.track_rate:g} req/s scheduled for {seconds:g} s",
        stored,
    )
    result.track_closed = await _phase(
        args,
        meter,
        lambda: closed_loop(
            client,
            "/v1/track",
            work.track_body,
            concurrency=args.track_concurrency,
            seconds=seconds,
            name="track closed loop",
        ),
        f"/v1/track closed loop, {args.track_concurrency} in flight, {seconds:g} s",
        stored,
    )
    return stored[0]


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _count(url: str) -> int:
    db = Database(url)
    try:
        with db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one())
    finally:
        db.dispose()


def _load_since(mark: tuple[float, float]) -> float:
    """Cores the machine kept busy since ``mark`` (from :func:`_mark_load`)."""
    busy, start = mark
    return (machine_busy_seconds()[0] - busy) / (time.perf_counter() - start)


def _mark_load() -> tuple[float, float]:
    return machine_busy_seconds()[0], time.perf_counter()


def _report_load(load: float, when: str) -> None:
    note = "" if load <= QUIET else "  WARNING: not idle; figures will be low"
    _say(f"  machine load {when}: {load:.2f} cores busy{note}")


def wait_quiet(limit: float, when: str = "now") -> None:
    """Wait up to ``limit`` seconds for a second in which the machine is nearly idle, and
    say how busy it was: other processes' load makes every figure of the run low."""
    deadline = time.perf_counter() + limit
    while True:
        mark = _mark_load()
        time.sleep(1.0)
        load = _load_since(mark)
        if load <= QUIET or time.perf_counter() >= deadline:
            break
    _report_load(load, when)


async def wait_quiet_async(limit: float) -> None:
    """:func:`wait_quiet` for the event loop (which stays responsive to signals)."""
    deadline = time.perf_counter() + limit
    while True:
        mark = _mark_load()
        await asyncio.sleep(1.0)
        load = _load_since(mark)
        if load <= QUIET or time.perf_counter() >= deadline:
            break
    _report_load(load, "now")


def bench_target(args: argparse.Namespace, target: Target, workdir: Path) -> Result:
    mode = "whenthen serve" if args.server == "cli" else "python -m bench.server (access log off)"
    result = Result(
        label=target.label,
        kind=target.kind,
        synchronous=target.synchronous,
        server=f"{mode}, {args.api_workers} API process(es), pipeline worker "
        f"{'on' if args.worker else 'off'}",
    )
    _say(f"\n== {target.label}: {result.server}")
    wait_quiet(args.wait_quiet, "before the phases")
    url = target.fresh("api")
    env = server_env(url, target.synchronous)
    workspace = create_workspace(env)
    server = ServerProcess(
        env,
        mode=args.server,
        worker=args.worker,
        log_path=workdir / f"server-{target.kind}-{target.synchronous}.log",
        api_workers=args.api_workers,
    )
    try:
        counted = _run_async(drive(args, result, server, workspace.write_key))
    finally:
        server.stop()
    in_table = _count(url)
    if in_table != counted:
        raise RuntimeError(f"the server reported {counted} events stored, the table holds {in_table}")
    result.stored_checked = in_table
    _say(f"  checked: the events table holds the {in_table:,} events the server acknowledged")

    pool = raw.row_pool(workspace.id, 5000, f"r{os.getpid()}", args.batch_size)
    variants: list[tuple[str, int]] = [("append", 1), ("insert", 1)]
    if target.kind == "postgres":
        variants += [("append", n) for n in args.concurrency if n > 1]
    meter = CpuMeter(None, postgres=target.kind == "postgres")
    for variant, threads in variants:
        best: tuple[RawOutcome, Cpu] | None = None
        for attempt in range(args.retries + 1):
            if attempt:
                _say("    measuring again")
                wait_quiet(args.wait_quiet)
            fresh = target.fresh(f"raw_{variant}_{threads}_{attempt}")
            with meter.measure() as cpu:
                outcome = raw.measure(
                    fresh,
                    synchronous=target.synchronous,
                    variant=variant,
                    pool=pool,
                    seconds=args.seconds,
                    rows_per_tx=args.batch_size,
                    threads=threads,
                )
            _say(
                f"  raw {outcome.name:<9} {args.batch_size} rows/tx: {outcome.rows:,} rows in "
                f"{outcome.elapsed:.1f} s = {outcome.rows_per_second:,.0f} rows/s\n"
                f"    {cpu.text()}{_disturbed(cpu)}"
            )
            if best is None or cpu.other < best[1].other:
                best = (outcome, cpu)
            if cpu.other <= QUIET:
                break
        assert best is not None
        result.raw.append(best[0])
        result.raw_cpu.append(best[1])
    return result


def _mark(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report(results: list[Result], args: argparse.Namespace) -> None:
    _say("\n== Results")
    for r in results:
        note = "\n  WARNING: other processes competed for the CPU during this run" if r.disturbed else ""
        _say(f"\n{r.label}  ({r.server}){note}")
        if r.failure:
            _say(f"  FAILED: {r.failure}")
            continue
        assert r.batch
        assert r.track_open
        assert r.track_closed
        best = r.best_raw
        assert best is not None
        batch = r.batch.outcome.events_per_second
        lines = [
            (
                f"/v1/batch ({args.batch_size} calls/request, best: {r.batch_concurrency} in flight)",
                f"{batch:,.0f} events/s ("
                + ", ".join(f"{n} in flight {v:,.0f}" for n, v in r.batch_by_concurrency.items())
                + ")",
            ),
        ]
        lines += [
            (f"raw insert, {o.name} ({args.batch_size} rows/tx)", f"{o.rows_per_second:,.0f} rows/s")
            for o in r.raw
        ]
        ratio_ok = r.ratio >= BATCH_GOAL_RATIO
        lines.append(
            (
                f"ratio batch / best raw ({best.name})",
                f"{r.ratio:.2f}   goal >= {BATCH_GOAL_RATIO:.2f}: {_mark(ratio_ok)}",
            )
        )
        if r.kind == "sqlite":
            lines.append(
                (
                    "batch events/s on SQLite",
                    f"{batch:,.0f}   goal >= {SQLITE_GOAL_EVENTS:,.0f}: {_mark(batch >= SQLITE_GOAL_EVENTS)}",
                )
            )
        o = r.track_open.outcome
        lines.append(
            (
                f"/v1/track at {args.track_rate:g} req/s (open loop)",
                f"{o.requests_per_second:,.0f} req/s achieved, p50 {_ms(o.percentile(50))}, "
                f"p99 {_ms(o.percentile(99))}   "
                f"goal p99 < {_ms(TRACK_GOAL_P99)}: {_mark(_track_ok(r, args))}",
            )
        )
        c = r.track_closed.outcome
        lines.append(
            (
                f"/v1/track max ({args.track_concurrency} in flight)",
                f"{c.requests_per_second:,.0f} req/s, "
                f"p50 {_ms(c.percentile(50))}, p99 {_ms(c.percentile(99))}",
            )
        )
        width = max(len(k) for k, _ in lines)
        for k, v in lines:
            _say(f"  {k:<{width}}  {v}")

    _say("\nMarkdown (docs/benchmarks.md):\n")
    _say(
        "| database | /v1/batch events/s | raw rows/s (best) | ratio (goal >= 0.50) "
        "| /v1/track p99 at 500 req/s (goal < 25 ms) | /v1/track max req/s |"
    )
    _say("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if r.failure or not (r.batch and r.track_open and r.track_closed and r.best_raw):
            _say(f"| {r.label} | failed: {r.failure} | | | | |")
            continue
        best = r.best_raw
        mark = " (disturbed)" if r.disturbed else ""
        _say(
            f"| {r.label}{mark} | {r.batch.outcome.events_per_second:,.0f} "
            f"| {best.rows_per_second:,.0f} ({best.name}) | {r.ratio:.2f} "
            f"| {_ms(r.track_open.outcome.percentile(99))} "
            f"| {r.track_closed.outcome.requests_per_second:,.0f} |"
        )


def _track_ok(r: Result, args: argparse.Namespace) -> bool:
    """p99 under the goal, every scheduled request answered 200, and the rate held."""
    assert r.track_open is not None
    o = r.track_open.outcome
    held = o.requests_per_second >= 0.97 * args.track_rate
    return not o.errors and o.ok == o.scheduled and held and o.percentile(99) < TRACK_GOAL_P99


def goals_met(results: list[Result], args: argparse.Namespace) -> bool:
    ok = True
    for r in results:
        if r.failure or r.batch is None:
            return False
        ok &= r.ratio >= BATCH_GOAL_RATIO and _track_ok(r, args)
        if r.kind == "sqlite":
            ok &= r.batch.outcome.events_per_second >= SQLITE_GOAL_EVENTS
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="Ingest events/s and latency against the raw insert rate of the same database.",
    )
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each measured phase (default 8)")
    p.add_argument(
        "--quick", action="store_true", help="2-second phases, SQLite FULL and PostgreSQL: under a minute"
    )
    p.add_argument(
        "--sqlite-synchronous",
        help="comma-separated SQLite synchronous modes to measure "
        "(default FULL,NORMAL; with --quick FULL, the app's default)",
    )
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("WHENTHEN_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="a PostgreSQL database to connect to for CREATE/DROP DATABASE",
    )
    p.add_argument("--batch-size", type=int, default=100, help="calls per /v1/batch request (default 100)")
    p.add_argument(
        "--concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[4, 8],
        help="batch requests in flight, each level a phase; the best counts (default 4,8)",
    )
    p.add_argument("--track-rate", type=float, default=500.0, help="open-loop /v1/track req/s (default 500)")
    p.add_argument(
        "--track-connections", type=int, default=64, help="connections of the open loop (default 64)"
    )
    p.add_argument(
        "--track-concurrency", type=int, default=8, help="closed-loop /v1/track in flight (default 8)"
    )
    p.add_argument(
        "--server",
        choices=("app", "cli"),
        default="app",
        help="app: the app under uvicorn with the access log off (default); cli: `whenthen serve` as shipped",
    )
    p.add_argument("--worker", action="store_true", help="run the embedded pipeline worker in the server")
    p.add_argument(
        "--api-workers",
        type=int,
        default=1,
        help="API processes (uvicorn workers, `serve --workers`); default 1",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each database and each retry, wait up to this long for the machine to be idle "
        "(default 0)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="measure a phase again, up to this many times, while other processes disturb it; "
        "the least disturbed attempt counts (default 0)",
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--tmpdir", type=Path, help="folder for SQLite files (default: the system temp folder)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 2.0)
    if args.sqlite_synchronous is None:
        args.sqlite_synchronous = "FULL" if args.quick else "FULL,NORMAL"
    args.warmup = 0.5 if args.quick else 1.0
    return args


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server is stopped and the
    # databases are dropped by the ``finally`` blocks.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    _say(
        f"whenthen ingest bench: {platform.node()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {args.seconds:g} s phases"
    )
    db = choose_databases(args.db, args.postgres_url, _say)
    if db is None:
        return 2
    args.db = db
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="whenthen-bench-logs-") as logs:
        for make in target_makers(
            args.db, args.sqlite_synchronous.split(","), args.tmpdir, args.postgres_url
        ):
            target = make()
            try:
                results.append(bench_target(args, target, Path(logs)))
            except (RuntimeError, OSError) as exc:
                _say(f"  FAILED: {exc}")
                failed = Result(target.label, target.kind, target.synchronous, args.server, failure=str(exc))
                results.append(failed)
                for log in sorted(Path(logs).glob("server-*.log")):
                    tail = log.read_text(errors="replace").splitlines()[-20:]
                    _say(f"  --- {log.name} (last lines)\n  " + "\n  ".join(tail))
            finally:
                target.cleanup()
    report(results, args)
    met = goals_met(results, args)
    _say(f"\nall goals met: {'yes' if met else 'no'}   (run took {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_as_json(results, args), indent=2))
        _say(f"wrote {args.json}")
    return 0 if met else 1


def _as_json(results: list[Result], args: argparse.Namespace) -> dict[str, Any]:
    def phase(p: Phase | None) -> dict[str, Any] | None:
        if p is None:
            return None
        o = p.outcome
        return {
            "requests_per_second": o.requests_per_second,
            "events_per_second": o.events_per_second,
            "ok": o.ok,
            "scheduled": o.scheduled,
            "errors": o.errors,
            "elapsed": o.elapsed,
            "p50_ms": o.percentile(50) * 1000,
            "p95_ms": o.percentile(95) * 1000,
            "p99_ms": o.percentile(99) * 1000,
            "max_ms": o.percentile(100) * 1000,
            "cpu": asdict(p.cpu),
        }

    return {
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [
            {
                "database": r.label,
                "server": r.server,
                "failure": r.failure,
                "batch": phase(r.batch),
                "track_open_loop": phase(r.track_open),
                "track_closed_loop": phase(r.track_closed),
                "raw": [
                    {"variant": o.name, "rows_per_second": o.rows_per_second, "rows": o.rows} for o in r.raw
                ],
                "ratio": r.ratio,
            }
            for r in results
        ],
        "goals_met": goals_met(results, args),
    }


if __name__ == "__main__":
    sys.exit(main())
