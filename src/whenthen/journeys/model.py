"""Enrollment state, stimuli and effects: the data the pure engine works on."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from whenthen.journeys.definition import EmailTemplate
from whenthen.kernel.filters import Filter


class Status(enum.StrEnum):
    ACTIVE = "active"  # waiting at a delay or wait node
    COMPLETED = "completed"  # reached the end of a path
    CONVERTED = "converted"  # the goal happened
    EXITED = "exited"  # an exit rule, an exit node, a holdout, or a jump
    FAILED = "failed"  # dead letter: the reason says why

    @property
    def ended(self) -> bool:
        return self is not Status.ACTIVE


@dataclass(frozen=True, slots=True)
class EventFacts:
    """An event as the engine sees it."""

    name: str
    properties: Mapping[str, Any]
    timestamp: datetime
    message_id: str = ""
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class State:
    enrollment_id: str
    status: Status
    node: str | None
    wake_at: datetime | None
    entered_at: datetime
    steps: int = 0
    #: trigger: the triggering event's name and properties; messages: node -> message id;
    #: last_message: the id of the message sent last; variant: split choices.
    context: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None


# ---- stimuli --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wake:
    """A timer fell due."""

    at: datetime


@dataclass(frozen=True, slots=True)
class EventSeen:
    event: EventFacts


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str


Stimulus = Wake | EventSeen | Cancel


# ---- effects --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendEmail:
    node: str
    idempotency_key: str
    email: EmailTemplate
    marketing: bool
    #: The message it queues (``engine.message_id_for(idempotency_key)``), derived once.
    message_id: str


@dataclass(frozen=True, slots=True)
class CallWebhook:
    node: str
    idempotency_key: str
    url: str
    body: Mapping[str, Any] | None
    headers: Mapping[str, str]
    map_response: Mapping[str, str]
    #: The message it queues (``engine.message_id_for(idempotency_key)``), derived once.
    message_id: str


@dataclass(frozen=True, slots=True)
class UpdateProfile:
    node: str
    set: Mapping[str, Any]
    unset: tuple[str, ...]
    add_tags: tuple[str, ...]
    remove_tags: tuple[str, ...]
    stage: str | None = None


@dataclass(frozen=True, slots=True)
class ChangeList:
    node: str
    list_key: str
    add: bool


@dataclass(frozen=True, slots=True)
class EnrollElsewhere:
    node: str
    journey_key: str


Effect = SendEmail | CallWebhook | UpdateProfile | ChangeList | EnrollElsewhere


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """What happened, for the message log, analytics and simulation output."""

    at: datetime
    kind: str  # entered, waiting, branched, sent, converted, exited, completed, failed, ...
    node: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition:
    state: State
    effects: tuple[Effect, ...]
    journal: tuple[JournalEntry, ...]


class Facts(Protocol):
    """What the engine may ask about the person; read-only."""

    def traits(self) -> Mapping[str, Any]:
        """The profile's traits."""
        raise NotImplementedError

    def timezone(self) -> str | None:
        """The profile's IANA time zone, if known."""
        raise NotImplementedError

    def count_events(self, name: str, where: tuple[Filter, ...], since: datetime | None) -> int:
        """How many events ``name`` matching ``where`` the person performed since ``since``."""
        raise NotImplementedError

    def engaged(self, kind: str, message_ids: tuple[str, ...], link: str | None) -> bool:
        """Whether the person ``opened``/``clicked`` one of the messages (link containing ``link``)."""
        raise NotImplementedError
