"""The outbox job that runs list imports, a chunk per transaction."""

from __future__ import annotations

from typing import Any

from whenthen.imports import service
from whenthen.kernel.clock import Clock
from whenthen.messaging import service as outbox
from whenthen.messaging.dispatch import Outcome
from whenthen.storage import Database


class ListImportJob:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def __call__(self, job: Any) -> Outcome:
        with self.db.write() as conn:
            now = self.clock.now()
            payload = service.process_chunk(conn, dict(job.payload), job.workspace_id, now=now)
            done = payload["offset"] >= len(payload["rows"])
            # Keep the job's payload small once done; keep the cursor while it runs.
            outbox.replace_payload(conn, job.id, {**payload, "rows": [] if done else payload["rows"]}, now)
        return Outcome() if done else Outcome(done=False, retry_at=now)
