"""Tag rules stored, and applied to a person's event in the pipeline's transaction.
Never commits."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, delete, insert, select, update

from whenthen import profiles
from whenthen.kernel.errors import NotFound, invalid_definition
from whenthen.segments import service as segments
from whenthen.segments.evaluator import DecaySpec, evaluate
from whenthen.segments.service import event_names
from whenthen.tagging.model import TagRule, matches
from whenthen.tagging.tables import tag_rules


def save_rule(conn: Connection, ws: str, data: Any, *, now: datetime) -> TagRule:
    """Create or replace a rule (by its key)."""
    try:
        rule = TagRule.model_validate(data)
    except ValidationError as exc:
        raise invalid_definition(exc) from None
    doc = rule.model_dump(mode="json", exclude_none=True)
    where = (tag_rules.c.workspace_id == ws, tag_rules.c.key == rule.key)
    if conn.execute(select(tag_rules.c.key).where(*where)).first():
        conn.execute(update(tag_rules).where(*where).values(definition=doc, updated_at=now))
    else:
        conn.execute(
            insert(tag_rules).values(
                workspace_id=ws, key=rule.key, definition=doc, created_at=now, updated_at=now
            )
        )
    return rule


def rules(conn: Connection, ws: str) -> list[TagRule]:
    rows = conn.execute(
        select(tag_rules.c.definition).where(tag_rules.c.workspace_id == ws).order_by(tag_rules.c.key)
    )
    return [TagRule.model_validate(r[0]) for r in rows]


def get_rule(conn: Connection, ws: str, key: str) -> TagRule:
    row = conn.execute(
        select(tag_rules.c.definition).where(tag_rules.c.workspace_id == ws, tag_rules.c.key == key)
    ).first()
    if row is None:
        raise NotFound("tag rule")
    return TagRule.model_validate(row[0])


def delete_rule(conn: Connection, ws: str, key: str) -> None:
    if not conn.execute(
        delete(tag_rules).where(tag_rules.c.workspace_id == ws, tag_rules.c.key == key)
    ).rowcount:
        raise NotFound("tag rule")


def on_event(
    conn: Connection,
    ws: str,
    profile_id: str,
    *,
    event: str,
    properties: Mapping[str, Any],
    now: datetime,
    workspace_rules: list[TagRule],
    half_lives: dict[str, DecaySpec] | None = None,
) -> list[tuple[str, str]]:
    """Apply the rules this event triggers, in key order; returns the changes made as
    ``(action, tag)``. A change marks the person for a segment recheck."""
    changes: list[tuple[str, str]] = []
    current: set[str] | None = None
    for rule in workspace_rules:
        if not matches(rule, event, properties):
            continue
        if current is None:
            current = set(profiles.tags_of(conn, ws, profile_id))
        if (rule.tag in current) == (rule.action == "add"):
            continue  # nothing to change
        definition = rule.definition
        if definition is not None:
            if half_lives is None:
                half_lives = segments.half_lives_of(conn, ws)
            names = sorted(event_names(definition))
            view = segments.load_view(conn, ws, profile_id, now, half_lives, names=names)
            if not evaluate(definition, view, now):
                continue
        if rule.action == "add":
            profiles.add_tags(conn, ws, profile_id, [rule.tag], now)
            current.add(rule.tag)
        else:
            profiles.remove_tags(conn, ws, profile_id, [rule.tag])
            current.discard(rule.tag)
        changes.append((rule.action, rule.tag))
    if changes:
        profiles.mark_for_recheck(conn, ws, [profile_id], "tag-rule", now)
    return changes
