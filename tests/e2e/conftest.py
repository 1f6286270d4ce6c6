"""End-to-end fixtures: the real app over a real socket (see tests/support/live_server.py)."""

from __future__ import annotations

from tests.support.live_server import live_server

__all__ = ["live_server"]
