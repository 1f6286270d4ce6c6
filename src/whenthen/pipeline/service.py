"""Processing the event log behind the hot path, partition by partition.

Every call is appended to ``events`` with a partition chosen from the person's routing
key (userId, else anonymousId). A worker leases partitions; for each one it takes the
pending events in ``seq`` order, applies them to profiles, and marks them processed, all
in one transaction. One partition is handled by one worker at a time, so the calls of
one person are applied in order. See docs/adr/0002-event-log-pipeline.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from whenthen import journeys, profiles, tracking
from whenthen.pipeline.tables import pipeline_leases
from whenthen.tracking import StoredEvent


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    partition: int
    processed: int
    suppressed: int
    failed: int = 0


def claim(
    conn: Connection,
    owner: str,
    partitions: range,
    *,
    now: datetime,
    lease: timedelta,
    max_partitions: int | None = None,
) -> list[int]:
    """Take (or renew) leases on free or expired partitions; return those now owned.

    A lease is a row per partition; a worker that stops renewing loses its partitions
    after ``lease`` and another worker takes them over. Updates are guarded by the row's
    previous owner and expiry, so two workers racing for one partition cannot both win.
    """
    rows = {
        r.partition: r
        for r in conn.execute(
            select(pipeline_leases).where(pipeline_leases.c.partition.in_(list(partitions)))
        )
    }
    owned: list[int] = []
    expires = now + lease
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    for p in partitions:
        if max_partitions is not None and len(owned) >= max_partitions:
            break
        row = rows.get(p)
        if row is None:
            inserted = conn.execute(
                dialect.insert(pipeline_leases)
                .values(partition=p, owner=owner, expires_at=expires)
                .on_conflict_do_nothing(index_elements=["partition"])
                .returning(pipeline_leases.c.partition)
            ).first()
            if inserted is not None:
                owned.append(p)
            continue
        elif row.owner == owner or row.expires_at <= now:
            result = conn.execute(
                update(pipeline_leases)
                .where(
                    pipeline_leases.c.partition == p,
                    pipeline_leases.c.owner == row.owner,
                    pipeline_leases.c.expires_at == row.expires_at,
                )
                .values(owner=owner, expires_at=expires)
            )
        else:
            continue
        if result.rowcount:
            owned.append(p)
    return owned


def release(conn: Connection, owner: str) -> None:
    conn.execute(delete(pipeline_leases).where(pipeline_leases.c.owner == owner))


def owns(conn: Connection, owner: str, partition: int, now: datetime) -> bool:
    row = conn.execute(
        select(pipeline_leases.c.owner, pipeline_leases.c.expires_at).where(
            pipeline_leases.c.partition == partition
        )
    ).first()
    return row is not None and row.owner == owner and row.expires_at > now


def process_partition(
    conn: Connection, partition: int, *, limit: int, secret: bytes, now: datetime
) -> BatchOutcome:
    """Apply up to ``limit`` pending events of one partition, in log order."""
    return process_events(
        conn, partition, tracking.pending_events(conn, partition, limit), secret=secret, now=now
    )


def process_events(
    conn: Connection, partition: int, events: list[StoredEvent], *, secret: bytes, now: datetime
) -> BatchOutcome:
    processed: dict[int, str | None] = {}
    suppressed: list[int] = []
    # Events are marked with their profile at the end of the batch; a merge later in the
    # same batch must redirect the ones applied before it.
    redirects: dict[str, str] = {}
    # Looked up once per batch and workspace rather than once per event.
    erasures: dict[str, bool] = {}
    active: dict[str, list[Any]] = {}
    for event in events:
        ws = event.workspace_id
        if ws not in erasures:
            erasures[ws] = profiles.has_erasures(conn, ws)
            active[ws] = journeys.active_journeys(conn, ws)
        applied = profiles.apply_event(conn, event, secret=secret, now=now, check_erasures=erasures[ws])
        if applied.suppressed:
            suppressed.append(event.seq)
            continue
        processed[event.seq] = applied.profile_id
        assert applied.profile_id is not None
        if applied.merged_from is not None:
            redirects[applied.merged_from] = applied.profile_id
            journeys.on_merge(conn, event.workspace_id, applied.merged_from, applied.profile_id)
        if active[ws]:
            # Journeys' conditions count the person's events: this one (and the batch's
            # earlier ones) must already be theirs.
            tracking.attribute_event(conn, event.seq, applied.profile_id)
        journeys.on_event(
            conn,
            event,
            applied.profile_id,
            traits_before=applied.traits_before,
            traits_after=applied.traits_after,
            now=now,
            active_journeys=active[ws],
        )
    if redirects:
        processed = {seq: _follow(redirects, pid) for seq, pid in processed.items()}
    tracking.finish_events(conn, processed, suppressed)
    return BatchOutcome(partition=partition, processed=len(processed), suppressed=len(suppressed))


def _follow(redirects: dict[str, str], profile_id: str | None) -> str | None:
    seen: set[str] = set()
    while profile_id is not None and profile_id in redirects and profile_id not in seen:
        seen.add(profile_id)
        profile_id = redirects[profile_id]
    return profile_id


def park(conn: Connection, partition: int, event: StoredEvent) -> BatchOutcome:
    """Set aside an event that fails on its own, so it cannot block its partition."""
    tracking.finish_events(conn, {}, (), [event.seq])
    return BatchOutcome(partition=partition, processed=0, suppressed=0, failed=1)


def pending_partitions(conn: Connection) -> list[int]:
    return tracking.pending_partitions(conn)


def count_pending(conn: Connection) -> int:
    return tracking.count_pending(conn)
