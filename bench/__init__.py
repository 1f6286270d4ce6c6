"""Benchmarks. Speed goals are measured here, never asserted in tests.

``python -m bench.ingest`` measures the tracking API against the raw insert rate of the
same database, in one run (see docs/benchmarks.md).
"""
