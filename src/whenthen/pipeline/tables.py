from __future__ import annotations

from sqlalchemy import Column, SmallInteger, String, Table

from whenthen.storage.metadata import UTCDateTime, metadata

#: Which worker owns which partition of the event log, until when.
pipeline_leases = Table(
    "pipeline_leases",
    metadata,
    Column("partition", SmallInteger, primary_key=True, autoincrement=False),
    Column("owner", String(100), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
)
