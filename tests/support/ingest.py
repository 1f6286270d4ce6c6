"""Appending calls to the log without HTTP, as the tracking API does."""

from __future__ import annotations

from typing import Any

import orjson

from whenthen.bootstrap import Container
from whenthen.tracking import service
from whenthen.tracking.validation import Limits


def send(c: Container, workspace_id: str, *calls: dict[str, Any], drain: bool = True) -> tuple[int, int]:
    """Validate and append ``calls`` as one batch; optionally run the pipeline to the end."""
    body = orjson.dumps({"batch": list(calls)})
    value, exact = service.parse(body)
    prepared = service.prepare(
        body,
        value,
        exact,
        forced_type=None,
        received_at=c.clock.now(),
        limits=Limits(),
        max_batch_events=c.settings.ingest.max_batch_events,
    )
    assert not prepared.rejected, prepared.rejected
    with c.db.write() as conn:
        result = service.append(
            conn, workspace_id, prepared.accepted, partitions=c.settings.pipeline.partitions
        )
    if drain:
        c.worker.drain()
    return result
