"""The worker's journey timer step fires further batches in several threads once a batch
comes back full (ADR 0013): every due enrollment still wakes exactly once, the threads
stop at the budget and the next call goes on where they stopped. Both databases (on
SQLite the threads queue behind its one writer; the container gives it one)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from tests.scenarios.test_delivery_batches import WAIT_THEN_MAIL, sign_up
from tests.support.journey_env import JourneyEnv
from whenthen.bootstrap import journey_timer_step
from whenthen.journeys.tables import enrollment_journal, enrollments
from whenthen.journeys.tasks import TimerStep
from whenthen.messaging.tables import messages
from whenthen.storage import Dialect

PEOPLE = 23


def _counts(env: JourneyEnv) -> tuple[int, int, int, int]:
    """Active enrollments, completed ones, journal rows of sends, messages queued."""
    with env.c.db.read() as conn:

        def count(stmt: object) -> int:
            return int(conn.execute(stmt).scalar_one())  # type: ignore[call-overload]

        return (
            count(select(func.count()).select_from(enrollments).where(enrollments.c.status == "active")),
            count(select(func.count()).select_from(enrollments).where(enrollments.c.status == "completed")),
            count(
                select(func.count())
                .select_from(enrollment_journal)
                .where(enrollment_journal.c.node == "mail", enrollment_journal.c.kind == "send_email")
            ),
            count(select(func.count()).select_from(messages)),
        )


def _due(env: JourneyEnv) -> None:
    env.publish(WAIT_THEN_MAIL)
    sign_up(env, PEOPLE)
    assert _counts(env) == (PEOPLE, 0, 0, 0)
    env.clock.advance(timedelta(days=1, minutes=1))


def test_threads_fire_every_due_timer_exactly_once(env: JourneyEnv) -> None:
    _due(env)
    step = TimerStep(env.c.db, env.clock, partitions=env.c.settings.pipeline.partitions, threads=3, limit=2)
    fired = []
    while n := step():
        fired.append(n)
    assert sum(fired) == PEOPLE
    # The first call's first batch was full, so threads took over in that call.
    assert fired[0] > 2
    assert _counts(env) == (0, PEOPLE, PEOPLE, PEOPLE)
    env.c.worker.drain()
    assert len(env.sink.messages()) == PEOPLE
    assert step() == 0


def test_the_threads_stop_at_the_budget_and_the_next_call_goes_on(env: JourneyEnv) -> None:
    _due(env)
    step = TimerStep(
        env.c.db,
        env.clock,
        partitions=env.c.settings.pipeline.partitions,
        threads=2,
        limit=3,
        budget_seconds=0.0,
    )
    # No budget: one batch alone, then one full batch in each thread.
    assert step() == 3 + 2 * 3
    assert _counts(env)[0] == PEOPLE - 9
    # Still behind: the next call goes to its threads at once (no batch alone first).
    assert step() == 2 * 3
    rest = 0
    while n := step():
        rest += n
    assert 9 + 6 + rest == PEOPLE
    assert _counts(env) == (0, PEOPLE, PEOPLE, PEOPLE)


def test_one_batch_a_call_when_it_comes_back_short(env: JourneyEnv) -> None:
    _due(env)
    step = TimerStep(env.c.db, env.clock, partitions=env.c.settings.pipeline.partitions, threads=4, limit=100)
    assert step() == PEOPLE
    assert step() == 0


def test_the_container_fires_in_threads_on_postgresql_only(env: JourneyEnv) -> None:
    step = journey_timer_step(env.c.db, env.clock, env.c.settings)
    expected = env.c.settings.pipeline.timer_threads if env.c.db.dialect is Dialect.POSTGRESQL else 1
    assert (step.threads, step.limit) == (expected, 1000)
    assert any(isinstance(s, TimerStep) and s.threads == expected for s in env.c.worker.steps)
