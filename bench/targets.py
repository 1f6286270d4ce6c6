"""Fresh databases and the server under test, each cleaned up by the bench that made it.

* :class:`SqliteTarget` makes database files in a private temporary folder and removes
  the folder at the end.
* :class:`PostgresTarget` creates databases named ``wt_bench_<random>_<name>`` and drops
  them (``WITH (FORCE)``) at the end.
* :class:`ServerProcess` runs the API in its own process on a free port of 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import psycopg
from psycopg import sql

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class SqliteTarget:
    kind = "sqlite"

    def __init__(self, synchronous: str, folder: Path | None = None) -> None:
        self.synchronous = synchronous.upper()
        self.label = f"SQLite, synchronous={self.synchronous}"
        self.folder = Path(tempfile.mkdtemp(prefix="whenthen-bench-", dir=folder))

    def fresh(self, name: str) -> str:
        return f"sqlite:///{self.folder / name}.db"

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class PostgresTarget:
    kind = "postgres"
    synchronous = "FULL"  # not used on PostgreSQL

    def __init__(self, url: str) -> None:
        self.url = url
        self.dsn = url.replace("postgresql+psycopg://", "postgresql://")
        self.prefix = f"wt_bench_{os.urandom(4).hex()}"
        self.created: list[str] = []
        with psycopg.connect(self.dsn, connect_timeout=3, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            sync = conn.execute("SHOW synchronous_commit").fetchone()
        version = row[0] if row else "?"
        commit = sync[0] if sync else "?"
        self.label = f"PostgreSQL {version.split()[0]}, synchronous_commit={commit}"

    def fresh(self, name: str) -> str:
        db = f"{self.prefix}_{name}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        self.created.append(db)
        base = self.url.rpartition("/")[0]
        return f"{base}/{db}"

    def cleanup(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for db in self.created:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        self.created.clear()


Target = SqliteTarget | PostgresTarget


def postgres_available(url: str) -> str | None:
    """None when PostgreSQL answers at ``url``, else why not."""
    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3):
            return None
    except psycopg.OperationalError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def choose_databases(db: str, postgres_url: str, say: Callable[[str], None]) -> str | None:
    """The ``--db`` choice a benchmark can honour: ``both`` falls back to ``sqlite`` (said)
    when PostgreSQL does not answer; ``None`` when only PostgreSQL was asked for and it
    does not answer (said too: the benchmark exits with 2)."""
    if db not in ("postgres", "both"):
        return db
    why = postgres_available(postgres_url)
    if why is None:
        return db
    if db == "postgres":
        say(f"PostgreSQL does not answer at {postgres_url}: {why}")
        return None
    say(f"PostgreSQL does not answer at {postgres_url} ({why}); measuring SQLite only")
    return "sqlite"


def target_makers(
    db: str, synchronous: Sequence[str], folder: Path | None, postgres_url: str
) -> list[Callable[[], Target]]:
    """One maker per database to measure: SQLite once per ``synchronous`` mode, then
    PostgreSQL (each target is made, measured and cleaned up in turn)."""
    makers: list[Callable[[], Target]] = []
    if db in ("sqlite", "both"):
        makers += [functools.partial(SqliteTarget, mode.strip(), folder) for mode in synchronous]
    if db in ("postgres", "both"):
        makers.append(functools.partial(PostgresTarget, postgres_url))
    return makers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Workspace:
    id: str
    write_key: str


def server_env(url: str, synchronous: str) -> dict[str, str]:
    """The environment of the server and the CLI: the database, no demo workspace, and a
    rate limit far above what the bench can send (the bench measures ingest, not the
    limiter)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHENTHEN_")}
    env.update(
        WHENTHEN_DATABASE_URL=url,
        WHENTHEN_SQLITE_SYNCHRONOUS=synchronous,
        WHENTHEN_DEMO_WORKSPACE="false",
        WHENTHEN_INGEST__RATE_LIMIT_EVENTS_PER_SECOND="1000000000",
        WHENTHEN_INGEST__RATE_LIMIT_BURST="1000000000",
    )
    return env


def create_workspace(env: dict[str, str]) -> Workspace:
    """``whenthen workspace create bench --json``: migrates the database and issues keys."""
    done = subprocess.run(
        [str(BIN / "whenthen"), "workspace", "create", "bench", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Workspace(id=str(data["id"]), write_key=str(data["write_key"]))


class ServerProcess:
    """The API in its own process.

    ``mode="cli"`` runs ``whenthen serve`` exactly as shipped (uvicorn access log on, at
    INFO); ``mode="app"`` runs ``python -m bench.server``: the same app, built the same
    way, with uvicorn's access log off.
    """

    def __init__(
        self, env: dict[str, str], *, mode: str, worker: bool, log_path: Path, api_workers: int = 1
    ) -> None:
        self.port = free_port()
        if mode == "cli":
            cmd = [str(BIN / "whenthen"), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
            if not worker:
                cmd.append("--no-worker")
        else:
            cmd = [sys.executable, "-m", "bench.server", "--port", str(self.port)]
            if worker:
                cmd.append("--worker")
        if api_workers > 1:
            cmd += ["--workers", str(api_workers)]
        self.command = cmd
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self._wait_healthy(timeout=30.0)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not answer /health within {timeout} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the server process (all its threads) and of
        its live descendants (the API processes ``--api-workers`` forks)."""
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time so far of process ``root`` and its live descendants."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(proc.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    total = 0
    for pid, tick in ticks.items():
        up = pid
        while up > 1 and up != root:
            up = parents.get(up, 0)
        if up == root:
            total += tick
    return total / CLOCK_TICKS


def postgres_cpu_seconds() -> float:
    """User + system CPU time so far of every running ``postgres`` process (server backends)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def python_loop_seconds(steps: int = 10_000_000, tries: int = 3) -> float:
    """The best of ``tries`` runs of a ``steps``-step Python ``while`` loop: how fast this
    machine runs Python today (it varies from day to day on a shared VM; 0.62 s for
    10 million steps on its best days). Printed with each bench's figures, so figures
    taken on different days can be compared."""
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        i = 0
        while i < steps:
            i += 1
        best = min(best, time.perf_counter() - t0)
    return best


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS
