"""The pipeline behind ingestion: leased partitions of the event log, applied in order."""

from whenthen.pipeline.service import (
    BatchOutcome,
    claim,
    count_pending,
    owned,
    park,
    pending_partitions,
    process_events,
    process_partitions,
    release,
)

__all__ = [
    "BatchOutcome",
    "claim",
    "count_pending",
    "owned",
    "park",
    "pending_partitions",
    "process_events",
    "process_partitions",
    "release",
]
