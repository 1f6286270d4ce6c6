"""The outbox dispatcher claims small batches while the outbox is quiet and larger ones
while a backlog lasts, and every job is run once. On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from tests.support.workspace import make_workspace
from whenthen import messaging
from whenthen.bootstrap import Container
from whenthen.messaging.dispatch import BACKLOG_FACTOR, Dispatcher, Outcome


def test_a_backlog_is_claimed_in_larger_batches(container: Container) -> None:
    ws = make_workspace(container)
    ran: list[int] = []

    def handler(job: Any) -> Outcome:
        ran.append(int(job.payload["n"]))
        return Outcome()

    with container.db.write() as conn:
        for n in range(31):
            messaging.enqueue_job(conn, ws.id, "count", {"n": n}, container.clock.now())
    dispatcher = Dispatcher(container.db, container.clock, {"count": handler}, batch=5)
    sizes = []
    while done := dispatcher.run_once():
        sizes.append(done)
    # Quiet size first; after a full claim, BACKLOG_FACTOR times it; back to the quiet size
    # once a claim comes back short.
    assert sizes == [5, 5 * BACKLOG_FACTOR, 6]
    assert sorted(ran) == list(range(31))
    assert dispatcher.run_once() == 0
    with container.db.write() as conn:
        messaging.enqueue_job(conn, ws.id, "count", {"n": 99}, container.clock.now())
    assert dispatcher._claim == 5
    assert dispatcher.run_once() == 1
