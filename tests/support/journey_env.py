"""A whole whenthen with a real SMTP sink and a manual clock, for journey scenarios."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from tests.support.ingest import send
from tests.support.journal import assert_chains_whole
from tests.support.workspace import TestWorkspace, make_workspace
from whenthen import journeys, profiles
from whenthen.bootstrap import Container, build
from whenthen.kernel.clock import ManualClock
from whenthen.messaging.smtp_sink import Received, SmtpSink
from whenthen.settings import EmailSettings, Settings
from whenthen.tracking.tables import events


@dataclass
class JourneyEnv:
    __test__ = False
    c: Container
    clock: ManualClock
    ws: TestWorkspace
    sink: SmtpSink

    def publish(self, definition: dict[str, Any] | str) -> journeys.JourneyInfo:
        data = yaml.safe_load(definition) if isinstance(definition, str) else definition
        with self.c.db.write() as conn:
            journeys.push(conn, self.ws.id, data, now=self.clock.now())
            return journeys.publish(conn, self.ws.id, data["key"], now=self.clock.now())

    def track(self, user: str, event: str, **props: Any) -> None:
        self.calls({"type": "track", "userId": user, "event": event, "properties": props})

    def identify(self, user: str, **traits: Any) -> None:
        self.calls({"type": "identify", "userId": user, "traits": traits})

    def calls(self, *calls: dict[str, Any]) -> None:
        stamped = [{"timestamp": self.clock.now().isoformat(), **c} for c in calls]
        send(self.c, self.ws.id, *stamped)

    def advance(self, **delta: float) -> None:
        """Let time pass, then let the workers catch up (timers, outbox)."""
        self.clock.advance(timedelta(**delta))
        self.c.worker.drain()

    def mail_to(self, address: str) -> list[Received]:
        return [m for m in self.sink.messages() if address in m.recipients]

    def profile(self, user: str) -> profiles.Profile:
        with self.c.db.read() as conn:
            return profiles.lookup(conn, self.ws.id, user_id=user)

    def system_events(self, name: str) -> list[dict[str, Any]]:
        """The workspace's events named ``name`` in log order, as ``{user, **properties}``."""
        with self.c.db.read() as conn:
            rows = conn.execute(
                select(events.c.payload)
                .where(events.c.workspace_id == self.ws.id, events.c.event == name)
                .order_by(events.c.seq)
            )
            return [{"user": r[0].get("userId"), **r[0]["properties"]} for r in rows]

    def enrollments(self, user: str) -> list[dict[str, Any]]:
        with self.c.db.read() as conn:
            return journeys.enrollments_of(conn, self.ws.id, self.profile(user).id)


@contextmanager
def journey_env(db_url: str, clock: ManualClock) -> Iterator[JourneyEnv]:
    with SmtpSink() as sink:
        settings = Settings(
            database_url=db_url,
            secret_key="scenario-secret",
            sqlite_synchronous="NORMAL",
            demo_workspace=False,
            public_url="http://testserver",
            email=EmailSettings(
                smtp_host=sink.host, smtp_port=sink.port, from_address="Shop <shop@example.com>"
            ),
        )
        c = build(settings, clock=clock)
        try:
            yield JourneyEnv(c=c, clock=clock, ws=make_workspace(c), sink=sink)
            # Whatever the scenario did, every enrollment's journal is still one whole chain.
            assert_chains_whole(c.db)
        finally:
            c.close()


@pytest.fixture
def env(db_url: str, clock: ManualClock) -> Iterator[JourneyEnv]:
    with journey_env(db_url, clock) as made:
        yield made


@pytest.fixture
def pg_env(pg_url: str, clock: ManualClock) -> Iterator[JourneyEnv]:
    """``env`` on PostgreSQL only (row locks between transactions)."""
    with journey_env(pg_url, clock) as made:
        yield made
