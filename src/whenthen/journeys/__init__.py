"""Journeys: versioned, behavior-triggered workflows."""

from whenthen.journeys.definition import InvalidDefinition, JourneyDefinition, json_schema, parse_definition
from whenthen.journeys.management import (
    JourneyInfo,
    definition_of,
    enrollments_of,
    info,
    list_all,
    publish,
    push,
    set_status,
    stats,
    version_definition,
)
from whenthen.journeys.runtime import (
    active_journeys,
    backfill_dates,
    enroll,
    fire_due,
    fire_due_dates,
    forget,
    on_event,
    on_merge,
    signal_page,
)

__all__ = [
    "InvalidDefinition",
    "JourneyDefinition",
    "JourneyInfo",
    "active_journeys",
    "backfill_dates",
    "definition_of",
    "enroll",
    "enrollments_of",
    "fire_due",
    "fire_due_dates",
    "forget",
    "info",
    "json_schema",
    "list_all",
    "on_event",
    "on_merge",
    "parse_definition",
    "publish",
    "push",
    "set_status",
    "signal_page",
    "stats",
    "version_definition",
]
