"""Composition root: builds the app and the worker from settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from whenthen.imports.tasks import ListImportJob
from whenthen.journeys.management import JourneyTemplates
from whenthen.journeys.tasks import BackfillDatesJob, SignalJob, TimerStep, seconds_to_next_timer
from whenthen.kernel.clock import Clock, SystemClock
from whenthen.messaging.adapters.smtp import SmtpSender
from whenthen.messaging.adapters.webhook import HttpxWebhookCaller
from whenthen.messaging.dispatch import Dispatcher, EmailJob, WebhookJob
from whenthen.messaging.ports import EmailSender, WebhookCaller
from whenthen.pipeline.service import announce, emit
from whenthen.scoring import decay_step as score_decay
from whenthen.segments.compiler import install_sqlite_functions
from whenthen.segments.rechecks import recheck_step as segment_rechecks
from whenthen.segments.service import timer_step as segment_timers
from whenthen.settings import Settings, webhook_signing_secret
from whenthen.storage import Database, Dialect
from whenthen.storage.migrate import upgrade
from whenthen.tracking.ratelimit import TokenBuckets
from whenthen.worker import wakeups
from whenthen.worker.runner import PipelineWorker


@dataclass
class Container:
    """Everything an entrypoint needs, built once."""

    settings: Settings
    clock: Clock
    db: Database
    buckets: TokenBuckets
    worker: PipelineWorker
    dispatcher: Dispatcher
    extras: dict[str, object] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Release connections, event loops and clients; the container is unusable after."""
        for closer in reversed(self.closers):
            closer()
        self.db.dispose()

    @property
    def secret(self) -> bytes:
        return self.settings.secret_key.get_secret_value().encode("utf-8")


def journey_timer_step(db: Database, clock: Clock, settings: Settings) -> TimerStep:
    """The worker's journey timer step as the container builds it: several threads on
    PostgreSQL (``pipeline.timer_threads``), one on SQLite (one writer)."""
    return TimerStep(
        db,
        clock,
        partitions=settings.pipeline.partitions,
        threads=settings.pipeline.timer_threads if db.dialect is Dialect.POSTGRESQL else 1,
    )


def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    migrate: bool = True,
    email_sender: EmailSender | None = None,
    webhook_caller: WebhookCaller | None = None,
) -> Container:
    """Wire everything. ``email_sender`` and ``webhook_caller`` override the adapters the
    settings choose (tests and demos use this, never patching)."""
    clock = clock or SystemClock()
    db = Database(
        settings.database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        background_checkpoints=True,
    )
    install_sqlite_functions(db.engine)  # segments need power() on SQLite builds without math
    if migrate:
        upgrade(db)
    secret = settings.secret_key.get_secret_value().encode("utf-8")
    closers: list[Callable[[], None]] = []
    if email_sender is None and settings.email.smtp_host:
        smtp = SmtpSender(settings.email, connections=settings.email.smtp_connections)
        closers.append(smtp.close)
        email_sender = smtp
    if webhook_caller is None:
        http = HttpxWebhookCaller(
            timeout=settings.webhooks.timeout_seconds,
            allow_private=settings.webhooks.allow_private_addresses,
        )
        closers.append(http.close)
        webhook_caller = http
    dispatcher = Dispatcher(
        db,
        clock,
        {
            "email": EmailJob(
                db,
                clock,
                settings.email,
                public_url=settings.public_url,
                secret=secret,
                sender=email_sender,
                templates=JourneyTemplates(),
            ),
            "webhook": WebhookJob(
                db, clock, settings.webhooks, secret=webhook_signing_secret(settings), caller=webhook_caller
            ),
            "signal": SignalJob(db, clock, partitions=settings.pipeline.partitions),
            "backfill_dates": BackfillDatesJob(db, clock),
            "list_import": ListImportJob(db, clock),
        },
    )
    wake = wakeups.for_database(db)
    closers.append(wake.close)
    worker = PipelineWorker(db=db, clock=clock, settings=settings.pipeline, secret=secret, wakeups=wake)
    worker.steps.append(journey_timer_step(db, clock, settings))
    worker.next_due.append(lambda: seconds_to_next_timer(db, clock))
    # Its own thread while the worker runs: emails do not wait behind pipeline passes.
    worker.background.append(dispatcher.drain_for)
    worker.steps.append(
        lambda: segment_timers(
            db,
            clock,
            partial(emit, partitions=settings.pipeline.partitions),
            announce=partial(announce, partitions=settings.pipeline.partitions),
        )
    )
    worker.steps.append(
        lambda: segment_rechecks(db, clock, partial(emit, partitions=settings.pipeline.partitions))
    )
    worker.steps.append(
        lambda: score_decay(db, clock, partial(emit, partitions=settings.pipeline.partitions))
    )
    return Container(
        settings=settings,
        clock=clock,
        db=db,
        buckets=TokenBuckets(settings.ingest.rate_limit_events_per_second, settings.ingest.rate_limit_burst),
        worker=worker,
        dispatcher=dispatcher,
        closers=closers,
    )
