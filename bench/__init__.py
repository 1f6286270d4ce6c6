"""Benchmarks. Speed goals are measured here, never asserted in tests.

``python -m bench`` (``make bench``) runs them all and summarises the goals;
``python -m bench.ingest``, ``bench.journeys`` and ``bench.audience`` run one each. Each
measures its goals against limits measured in the same run (see docs/benchmarks.md).
"""
