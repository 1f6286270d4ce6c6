"""Ingestion: validate calls and append them to the durable log. Never commits.

The hot path does nothing else: profiles, merges and triggers happen behind it, in the
pipeline, from the log (docs/adr/0002-event-log-pipeline.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from whenthen.kernel.bucketing import partition_for
from whenthen.tracking import repository
from whenthen.tracking.model import AcceptedEvent, CallType, IngestResult, Rejection
from whenthen.tracking.parsing import loads, loads_exact
from whenthen.tracking.validation import (
    AmbiguousNumber,
    CallChecker,
    Invalid,
    Limits,
    parse_timestamp,
    reject,
)

_NUL_ESCAPE = b"\\u0000"


@dataclass(frozen=True, slots=True)
class Prepared:
    accepted: list[AcceptedEvent]
    rejected: list[Rejection]
    #: Calls dropped because an earlier call of the same batch had their messageId.
    duplicates: int = 0


def write_key_in_body(value: Any) -> str | None:
    if isinstance(value, dict):
        key = value.get("writeKey")
        if isinstance(key, str) and key:
            return key
        batch = value.get("batch")
        if isinstance(batch, list) and batch and isinstance(batch[0], dict):
            inner = batch[0].get("writeKey")
            if isinstance(inner, str) and inner:
                return inner
    return None


def prepare(
    body: bytes,
    value: Any,
    exact: bool,
    *,
    forced_type: CallType | None,
    received_at: datetime,
    limits: Limits,
    max_batch_events: int,
) -> Prepared:
    """Validate a parsed request: one call (``forced_type`` set) or a batch.

    Raises ``Invalid`` when the request as a whole is unusable; otherwise each call is
    accepted or rejected on its own, so one bad call never costs the good ones.
    """
    try:
        return _prepare(
            body,
            value,
            exact,
            forced_type=forced_type,
            received_at=received_at,
            limits=limits,
            max_batch_events=max_batch_events,
        )
    except AmbiguousNumber:
        return _prepare(
            body,
            loads_exact(body),
            True,
            forced_type=forced_type,
            received_at=received_at,
            limits=limits,
            max_batch_events=max_batch_events,
        )


def _prepare(
    body: bytes,
    value: Any,
    exact: bool,
    *,
    forced_type: CallType | None,
    received_at: datetime,
    limits: Limits,
    max_batch_events: int,
) -> Prepared:
    # JSON writes NUL only as this escape: without it no string of the body holds one.
    nul_free = _NUL_ESCAPE not in body
    if forced_type is not None:
        checker = CallChecker(
            received_at=received_at, batch_sent_at=None, limits=limits, exact_numbers=exact, nul_free=nul_free
        )
        return Prepared([checker.check(value, forced_type=forced_type, encoded_size=len(body))], [])

    if not isinstance(value, dict):
        raise Invalid("invalid_type", "a batch must be a JSON object with a 'batch' array")
    calls = value.get("batch")
    if not isinstance(calls, list):
        raise Invalid("missing_field", "batch must be an array of calls")
    if len(calls) > max_batch_events:
        raise Invalid(
            "too_many_events",
            f"a batch may hold at most {max_batch_events} calls; this one has {len(calls)}",
            413,
        )
    checker = CallChecker(
        received_at=received_at,
        batch_sent_at=parse_timestamp(value.get("sentAt"), "sentAt"),
        limits=limits,
        exact_numbers=exact,
        nul_free=nul_free,
    )
    shared_context = value.get("context")
    shared_integrations = value.get("integrations")
    envelope = (isinstance(shared_context, dict) and bool(shared_context)) or (
        isinstance(shared_integrations, dict) and bool(shared_integrations)
    )
    check = checker.check
    accepted: list[AcceptedEvent] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    duplicates = 0
    for index, raw in enumerate(calls):
        try:
            if envelope and isinstance(raw, dict):
                raw = _with_envelope(raw, shared_context, shared_integrations)
            # The checker measures the call itself, once its values are known to be
            # storable: measuring first would have to encode lone surrogates, NaN markers
            # and deep nesting, which JSON encoders refuse.
            event = check(raw)
        except Invalid as error:
            rejected.append(reject(index, error, raw))
            continue
        if event.message_id in seen:
            duplicates += 1  # a duplicate inside the batch is a duplicate, not an error
            continue
        seen.add(event.message_id)
        accepted.append(event)
    return Prepared(accepted, rejected, duplicates)


def _with_envelope(raw: dict[str, Any], context: Any, integrations: Any) -> dict[str, Any]:
    if isinstance(context, dict) and context:
        own = raw.get("context")
        raw = {**raw, "context": {**context, **own} if isinstance(own, dict) else own or context}
    if isinstance(integrations, dict) and integrations and "integrations" not in raw:
        raw = {**raw, "integrations": integrations}
    return raw


def parse(body: bytes) -> tuple[Any, bool]:
    return loads(body)


def append(
    conn: Connection,
    workspace_id: str,
    accepted: list[AcceptedEvent],
    *,
    partitions: int,
) -> tuple[int, int]:
    """Append accepted calls to the log; returns (newly stored, duplicates)."""
    # The calls of a request mostly come from few people: hash each one's key once.
    by_key: dict[str, int] = {}
    rows = []
    for ev in accepted:
        key = _routing_key(ev)
        partition = by_key.get(key)
        if partition is None:
            partition = by_key[key] = partition_for(workspace_id, key, partitions)
        rows.append(log_row(workspace_id, ev, partition))
    inserted = repository.append(conn, rows)
    return inserted, len(rows) - inserted


def log_row(workspace_id: str, ev: AcceptedEvent, partition: int) -> tuple[Any, ...]:
    """The ``events`` row of an accepted call, pending in ``partition``, in
    ``repository.APPEND_COLUMNS`` order."""
    return (
        workspace_id,
        ev.message_id,
        _TYPE_NAMES[ev.type],
        ev.event,
        ev.user_id,
        ev.anonymous_id,
        ev.timestamp,
        ev.received_at,
        ev.payload,
        partition,
        repository.PENDING,
    )


def partition_of(workspace_id: str, ev: AcceptedEvent, partitions: int) -> int:
    """The log partition of an accepted call: its person's (userId first)."""
    return partition_for(workspace_id, _routing_key(ev), partitions)


_TYPE_NAMES = {t: t.value for t in CallType}


def _routing_key(ev: AcceptedEvent) -> str:
    # userId first: every call of a known person lands in one partition, in order.
    key = ev.user_id or ev.anonymous_id
    assert key is not None  # validate_call guarantees one of them
    return key


def result(stored: int, duplicates: int, rejected: list[Rejection]) -> IngestResult:
    return IngestResult(accepted=stored, duplicates=duplicates, rejected=tuple(rejected))
