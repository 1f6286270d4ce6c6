"""Journey definitions over time: drafts, immutable published versions, pause, archive.

* ``push`` stores a definition as the journey's draft: a new version after the last
  published one, or a replacement of the current draft. Published versions never change.
* ``publish`` makes the latest draft the active version. People already in the journey
  stay on the version they entered (their enrollment is pinned); with ``migrate=True``
  active enrollments whose current node still exists in the new version, as the same
  kind of node, move to it.
* ``pause`` stops entries and freezes enrollments (timers and date triggers are held,
  events do not move anyone); ``resume`` lets them go on, overdue timers firing once. ``archive`` ends every
  active enrollment (reason "journey archived") and stops the journey for good.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from whenthen import messaging
from whenthen.journeys import repository as repo
from whenthen.journeys.definition import DateTrigger, JourneyDefinition, SendEmailNode, parse_definition
from whenthen.journeys.engine import advance
from whenthen.journeys.model import Cancel
from whenthen.kernel.errors import DomainError, NotFound
from whenthen.kernel.ids import new_secret


@dataclass(frozen=True, slots=True)
class JourneyInfo:
    id: str
    key: str
    name: str
    status: str
    active_version: int | None
    versions: tuple[dict[str, Any], ...]
    active_enrollments: int


def _new_journey_id() -> str:
    return "jrn_" + new_secret(9).replace("-", "a").replace("_", "b")


_CACHE: dict[tuple[str, int], JourneyDefinition] = {}
#: Published send nodes' templates, dumped as an email job reads them, by (journey id,
#: version, node): a version never changes once published.
_TEMPLATES: dict[tuple[str, int, str], dict[str, Any] | None] = {}


class JourneyTemplates:
    """The dispatcher's ``TemplateSource``: an email job queued by a journey names its
    template (journey, version, node) instead of carrying a copy of it (ADR 0022)."""

    def email_template(
        self, conn: Connection, journey_id: str, version: int, node: str
    ) -> dict[str, Any] | None:
        key = (journey_id, version, node)
        if key in _TEMPLATES:
            return _TEMPLATES[key]
        row = repo.version(conn, journey_id, version)
        if row is None or row.published_at is None:
            return None  # only published versions send; a draft may still change
        found = definition_of(conn, journey_id, version).nodes.get(node)
        dumped = (
            found.email.model_dump(mode="json", by_alias=True) if isinstance(found, SendEmailNode) else None
        )
        if len(_TEMPLATES) > 4000:
            _TEMPLATES.clear()
        _TEMPLATES[key] = dumped
        return dumped


def definition_of(conn: Connection, journey_id: str, version: int) -> JourneyDefinition:
    """The parsed definition of a version; published ones are cached, since they never change."""
    cached = _CACHE.get((journey_id, version))
    if cached is not None:
        return cached
    row = repo.version(conn, journey_id, version)
    if row is None:
        raise NotFound("journey version")
    definition = parse_definition(row.definition)
    if row.published_at is not None:
        if len(_CACHE) > 2000:
            _CACHE.clear()
        _CACHE[(journey_id, version)] = definition
    return definition


def push(conn: Connection, ws: str, data: Any, *, now: datetime) -> JourneyInfo:
    definition = parse_definition(data)
    stored = definition.model_dump(mode="json", by_alias=True, exclude_none=False)
    row = repo.journey_by_key(conn, ws, definition.key, lock=True)
    if row is None:
        journey_id = _new_journey_id()
        repo.insert_journey(
            conn,
            {
                "id": journey_id,
                "workspace_id": ws,
                "key": definition.key,
                "name": definition.name,
                "status": "draft",
                "active_version": None,
                "created_at": now,
                "updated_at": now,
            },
        )
        repo.insert_version(conn, journey_id, 1, stored, now)
        return info(conn, ws, definition.key)
    if row.status == "archived":
        raise DomainError("journey_archived", f"journey {definition.key} is archived", status=409)
    versions = repo.versions(conn, row.id)
    latest = versions[-1]
    if latest.published_at is None:
        repo.replace_draft(conn, row.id, latest.version, stored)
    else:
        repo.insert_version(conn, row.id, latest.version + 1, stored, now)
    repo.update_journey(conn, row.id, name=definition.name, updated_at=now)
    return info(conn, ws, definition.key)


def publish(conn: Connection, ws: str, key: str, *, now: datetime, migrate: bool = False) -> JourneyInfo:
    row = _journey(conn, ws, key, lock=True)
    if row.status == "archived":
        raise DomainError("journey_archived", f"journey {key} is archived", status=409)
    latest = repo.versions(conn, row.id)[-1]
    if latest.published_at is not None:
        raise DomainError("nothing_to_publish", f"journey {key} has no draft to publish", status=409)
    definition = definition_of(conn, row.id, latest.version)
    repo.mark_published(conn, row.id, latest.version, now)
    status = "active" if row.status in ("draft", "active") else row.status
    repo.update_journey(conn, row.id, active_version=latest.version, status=status, updated_at=now)
    if migrate and row.active_version is not None:
        _migrate(conn, row.id, definition, latest.version, now)
    if isinstance(definition.trigger, DateTrigger):
        # People who exist already get their date scheduled, a page at a time, behind us.
        messaging.enqueue_job(conn, ws, "backfill_dates", {"journey": key}, now)
    return info(conn, ws, key)


def _migrate(
    conn: Connection, journey_id: str, definition: JourneyDefinition, version: int, now: datetime
) -> None:
    from sqlalchemy import update

    from whenthen.journeys.tables import enrollments

    for r in repo.active_for_journey(conn, journey_id, limit=1_000_000):
        if r.version == version or r.node not in definition.nodes:
            continue
        # Only a node that still waits the same way can take over the person's timer:
        # woken at a node that does not wait, an enrollment would never move again.
        old = definition_of(conn, journey_id, r.version).nodes.get(r.node)
        if type(definition.nodes[r.node]) is type(old):
            conn.execute(
                update(enrollments).where(enrollments.c.id == r.id).values(version=version, updated_at=now)
            )


def set_status(conn: Connection, ws: str, key: str, status: str, *, now: datetime) -> JourneyInfo:
    row = _journey(conn, ws, key, lock=True)
    if row.status == "archived":
        raise DomainError("journey_archived", f"journey {key} is archived", status=409)
    if status in ("active", "paused") and row.active_version is None:
        raise DomainError("not_published", f"journey {key} has never been published", status=409)
    repo.update_journey(conn, row.id, status=status, updated_at=now)
    if status == "archived":
        _cancel_all(conn, row, now)
    return info(conn, ws, key)


def _cancel_all(conn: Connection, row: Any, now: datetime) -> None:
    from whenthen.journeys.runtime import NoFacts

    while True:
        batch = repo.active_for_journey(conn, row.id, limit=500)
        if not batch:
            return
        for e in batch:
            d = definition_of(conn, row.id, e.version)
            t = advance(d, repo.to_state(e), Cancel("journey archived"), now=now, facts=NoFacts())
            repo.save_state(conn, t.state, now)
            repo.write_journal(
                conn,
                ws=e.workspace_id,
                journey_id=row.id,
                enrollment_id=e.id,
                profile_id=e.profile_id,
                entries=t.journal,
            )


def _journey(conn: Connection, ws: str, key: str, *, lock: bool = False) -> Any:
    row = repo.journey_by_key(conn, ws, key, lock=lock)
    if row is None:
        raise NotFound("journey")
    return row


def info(conn: Connection, ws: str, key: str) -> JourneyInfo:
    row = _journey(conn, ws, key)
    versions = tuple(
        {"version": v.version, "published_at": v.published_at, "created_at": v.created_at}
        for v in repo.versions(conn, row.id)
    )
    return JourneyInfo(
        id=row.id,
        key=row.key,
        name=row.name,
        status=row.status,
        active_version=row.active_version,
        versions=versions,
        active_enrollments=repo.count_active(conn, row.id),
    )


def list_all(conn: Connection, ws: str) -> list[JourneyInfo]:
    return [info(conn, ws, r.key) for r in repo.list_journeys(conn, ws)]


def version_definition(conn: Connection, ws: str, key: str, version: int | None) -> dict[str, Any]:
    row = _journey(conn, ws, key)
    number = version or repo.versions(conn, row.id)[-1].version
    v = repo.version(conn, row.id, number)
    if v is None:
        raise NotFound("journey version")
    return dict(v.definition)


def stats(conn: Connection, ws: str, key: str) -> dict[str, Any]:
    """Counts per node of what happened (entered, waiting, sent, branched, converted...)."""
    row = _journey(conn, ws, key)
    per_node: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for r in repo.journal_counts(conn, row.id):
        per_node.setdefault(r.node or "-", {})[r.kind] = int(r.n)
        totals[r.kind] = totals.get(r.kind, 0) + int(r.n)
    return {"totals": totals, "nodes": per_node}


def enrollments_of(conn: Connection, ws: str, profile_id: str) -> list[dict[str, Any]]:
    out = []
    for e in repo.enrollments_of_profile(conn, ws, profile_id):
        j = repo.journey_by_id(conn, e.journey_id)
        out.append(
            {
                "id": e.id,
                "journey": j.key if j else None,
                "version": e.version,
                "status": e.status,
                "node": e.node,
                "wake_at": e.wake_at,
                "entered_at": e.entered_at,
                "ended_at": e.ended_at,
                "reason": e.reason,
                "journal": [
                    {"at": x.at, "kind": x.kind, "node": x.node, "detail": x.detail}
                    for x in repo.journal_of(conn, e.id)
                ],
            }
        )
    return out
