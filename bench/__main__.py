"""Every benchmark in one command: ``python -m bench`` (``make bench``).

Runs the ingest, journeys and audience benchmarks in turn, each printing its own table
(figures, goals, and ratios against limits measured in the same run), then a summary of
which goals each met. ``--quick`` gives each its short form (a few minutes in all);
``--db`` picks the databases. Exit status 0 when every goal was met, 1 otherwise, 2 when
a benchmark could not run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from bench import audience, ingest, journeys

Runner = Callable[[list[str] | None], int]


def _plan(quick: bool, db: str) -> list[tuple[str, Runner, list[str]]]:
    return [
        ("ingest", ingest.main, ["--db", db, *(["--quick"] if quick else [])]),
        ("journeys", journeys.main, ["--db", db, *(["--quick"] if quick else [])]),
        ("audience", audience.main, ["--db", db, *(["--quick"] if quick else [])]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="the short form of each benchmark")
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--only", choices=("ingest", "journeys", "audience"), action="append")
    args = p.parse_args(argv)
    outcomes: list[tuple[str, int, float]] = []
    for name, run, bench_args in _plan(args.quick, args.db):
        if args.only and name not in args.only:
            continue
        print(f"\n===== {name}: python -m bench.{name} {' '.join(bench_args)}", flush=True)
        started = time.perf_counter()
        try:
            status = run(bench_args)
        except Exception as exc:  # one benchmark failing must not hide the others' figures
            print(f"{name} failed: {exc!r}", flush=True)
            status = 2
        outcomes.append((name, status, time.perf_counter() - started))
    print("\n===== summary (details and ratios above; docs/benchmarks.md explains each goal)")
    words = {0: "all goals met", 1: "goals NOT all met", 2: "could not run"}
    for name, status, seconds in outcomes:
        print(f"  {name:<9} {words.get(status, f'exit {status}'):<18} ({seconds:.0f} s)")
    return max((s for _, s, _ in outcomes), default=0)


if __name__ == "__main__":
    sys.exit(main())
