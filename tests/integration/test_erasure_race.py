"""An erasure cannot interleave with a pipeline batch in flight (PostgreSQL, where they
run in separate transactions at once; SQLite has one writer at a time)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.conftest import make_settings
from tests.support.databases import PostgresServer
from tests.support.ingest import send
from tests.support.workspace import make_workspace
from whenthen import pipeline, profiles, tracking
from whenthen.bootstrap import Container, build
from whenthen.kernel.clock import ManualClock
from whenthen.kernel.errors import NotFound
from whenthen.storage import locks
from whenthen.tracking.tables import events


@pytest.fixture(params=["postgres"])
def pg_container(request: pytest.FixtureRequest, clock: ManualClock, tmp_path: Path) -> Iterator[Container]:
    server: PostgresServer | None = request.getfixturevalue("pg_server")
    if server is None:
        pytest.skip("PostgreSQL not reachable (set WHENTHEN_TEST_POSTGRES_URL)")
    url = server.create_database()
    c = build(make_settings(url), clock=clock)
    try:
        yield c
    finally:
        c.close()
        server.release_database(url)


def test_an_erasure_waits_for_the_batch_in_flight_and_nothing_of_the_person_survives(
    pg_container: Container,
) -> None:
    c = pg_container
    ws = make_workspace(c)
    send(c, ws.id, {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com"}})
    with c.db.read() as conn:
        pid = profiles.lookup(conn, ws.id, user_id="ann").id
    # A new event of hers is pending; a batch reads it and stalls (as a slow worker would).
    send(c, ws.id, {"type": "track", "userId": "ann", "event": "Order Completed"}, drain=False)
    applied = threading.Event()
    release = threading.Event()
    erased = threading.Event()
    errors: list[BaseException] = []

    def batch() -> None:
        try:
            # Read in a transaction of its own, as the worker does when it isolates a
            # failing event: no lock on her rows is held while the events are applied.
            with c.db.write() as conn:
                partition = tracking.pending_partitions(conn, range(c.settings.pipeline.partitions))[0]
                pending = tracking.pending_events(conn, [partition], 100)
            with c.db.write() as conn:
                # Inside a batch, between its check of the erasure hashes and its writes,
                # no row of hers is locked yet: only the batch lock keeps an erasure out.
                locks.pipeline_batch(conn)
                applied.set()
                assert release.wait(10)
                pipeline.process_events(
                    conn,
                    pending,
                    secret=c.worker.secret,
                    now=c.clock.now(),
                    partitions=c.settings.pipeline.partitions,
                )
        except BaseException as exc:  # reported below
            errors.append(exc)
            applied.set()

    def erase() -> None:
        try:
            with c.db.write() as conn:
                profiles.erase(conn, ws.id, pid, secret=c.worker.secret, now=c.clock.now())
            erased.set()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=batch)
    worker.start()
    assert applied.wait(10)
    eraser = threading.Thread(target=erase)
    eraser.start()
    # The erasure waits for the batch: it has not finished while the batch is open.
    assert not erased.wait(0.5)
    release.set()
    worker.join(10)
    eraser.join(10)
    assert errors == []
    assert erased.is_set()
    with c.db.read() as conn:
        with pytest.raises(NotFound):
            profiles.lookup(conn, ws.id, user_id="ann")
        left = conn.execute(
            select(func.count()).select_from(events).where(events.c.workspace_id == ws.id)
        ).scalar_one()
    assert left == 0
    # And a late copy of her event is suppressed, not a new profile.
    send(c, ws.id, {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "late-1"})
    with c.db.read() as conn, pytest.raises(NotFound):
        profiles.lookup(conn, ws.id, user_id="ann")
