"""An in-memory ``Facts`` for engine tests and simulation-style checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from whenthen.journeys.matching import event_matches
from whenthen.journeys.model import EventFacts
from whenthen.kernel.filters import Filter


@dataclass
class MemoryFacts:
    trait_values: dict[str, Any] = field(default_factory=dict)
    tz: str | None = None
    events: list[EventFacts] = field(default_factory=list)
    opened: set[str] = field(default_factory=set)
    clicked: dict[str, list[str]] = field(default_factory=dict)

    def traits(self) -> Mapping[str, Any]:
        return self.trait_values

    def timezone(self) -> str | None:
        return self.tz

    def count_events(self, name: str, where: tuple[Filter, ...], since: datetime | None) -> int:
        return sum(
            1
            for e in self.events
            if event_matches(e, name, where) and (since is None or e.timestamp >= since)
        )

    def engaged(self, kind: str, message_ids: tuple[str, ...], link: str | None) -> bool:
        if kind == "opened":
            return any(m in self.opened for m in message_ids)
        return any(
            link is None or any(link in url for url in self.clicked.get(m, []))
            for m in message_ids
            if m in self.clicked
        )
