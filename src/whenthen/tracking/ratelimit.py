"""A token bucket per workspace. Pure apart from its own state; time comes from outside.

The bucket lives in the process: with several API processes each enforces its own
share. A shared (Redis) bucket comes when deployments need it; see docs/design/tracking.md.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_seconds: int = 0


class TokenBuckets:
    def __init__(self, rate_per_second: float, burst: int) -> None:
        if rate_per_second <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate_per_second
        self.burst = float(burst)
        self._state: dict[str, tuple[float, datetime]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, cost: int, now: datetime) -> Decision:
        """Take ``cost`` tokens for ``key`` if there are enough; a call larger than the
        burst is let through when the bucket is full, so a maximal batch is never refused
        forever."""
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            elapsed = max(0.0, (now - last).total_seconds())
            tokens = min(self.burst, tokens + elapsed * self.rate)
            needed = min(float(cost), self.burst)
            if tokens >= needed:
                self._state[key] = (tokens - cost, now)
                return Decision(True)
            self._state[key] = (tokens, now)
            wait = (needed - tokens) / self.rate
            return Decision(False, retry_after_seconds=max(1, math.ceil(wait)))
