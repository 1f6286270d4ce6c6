"""Composition root: builds the app and the worker from settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from whenthen.kernel.clock import Clock, SystemClock
from whenthen.settings import Settings
from whenthen.storage import Database
from whenthen.storage.migrate import upgrade
from whenthen.tracking.ratelimit import TokenBuckets
from whenthen.worker.runner import PipelineWorker


@dataclass
class Container:
    """Everything an entrypoint needs, built once."""

    settings: Settings
    clock: Clock
    db: Database
    buckets: TokenBuckets
    worker: PipelineWorker
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def secret(self) -> bytes:
        return self.settings.secret_key.get_secret_value().encode("utf-8")


def build(settings: Settings, *, clock: Clock | None = None, migrate: bool = True) -> Container:
    clock = clock or SystemClock()
    db = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    if migrate:
        upgrade(db)
    secret = settings.secret_key.get_secret_value().encode("utf-8")
    return Container(
        settings=settings,
        clock=clock,
        db=db,
        buckets=TokenBuckets(settings.ingest.rate_limit_events_per_second, settings.ingest.rate_limit_burst),
        worker=PipelineWorker(db=db, clock=clock, settings=settings.pipeline, secret=secret),
    )
