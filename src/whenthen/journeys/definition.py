"""Journey definitions ("journeys as code"): the models, their JSON Schema, and checks.

A definition is JSON or YAML. Pydantic validates its shape (and publishes the JSON
Schema); :func:`check_graph` then checks what a schema cannot: that every ``next`` names
a node, that the start node exists, that every node is reachable, and that no loop of
nodes can run without waiting. Errors carry the node id, the field and the reason.
"""

from __future__ import annotations

import enum
import re
from datetime import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from whenthen.kernel.durations import parse_duration
from whenthen.kernel.filters import Filter, Op
from whenthen.templates import check as check_template

NODE_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
KEY = r"^[a-z0-9][a-z0-9_-]{0,79}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(value: str) -> str:
    parse_duration(value)
    return value


Duration = Annotated[str, Field(description="'30m', '2h', '2d', '1w' or ISO 8601 such as 'PT1H'")]


class EventMatch(_Model):
    event: str = Field(min_length=1, max_length=255)
    where: list[Filter] = Field(default_factory=list)


# ---- conditions ------------------------------------------------------------------------


class TraitCondition(_Model):
    trait: str = Field(min_length=1, max_length=200)
    op: Op = Op.EQ
    value: Any = None


class EventCondition(_Model):
    """The person did (``did``) or did not (``did_not``) perform an event, at least
    ``min_count`` times, within the last ``within`` (or ever)."""

    did: str | None = Field(default=None, max_length=255)
    did_not: str | None = Field(default=None, max_length=255)
    where: list[Filter] = Field(default_factory=list)
    within: Duration | None = None
    min_count: int = Field(default=1, ge=1)

    @field_validator("within")
    @classmethod
    def _within(cls, v: str | None) -> str | None:
        return _duration(v) if v is not None else v

    @model_validator(mode="after")
    def _one(self) -> EventCondition:
        if (self.did is None) == (self.did_not is None):
            raise ValueError("give exactly one of did, did_not")
        return self


class EngagementCondition(_Model):
    """Engagement with a message this journey sent from ``node`` (or any of its messages)."""

    engaged: Literal["opened", "clicked", "not_opened", "not_clicked"]
    node: str | None = None
    link: str | None = Field(default=None, description="with clicked: the URL must contain this")


class AllCondition(_Model):
    all: list[Condition]


class AnyCondition(_Model):
    any: list[Condition]


class NotCondition(_Model):
    not_: Condition = Field(alias="not")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


Condition = TraitCondition | EventCondition | EngagementCondition | AllCondition | AnyCondition | NotCondition
AllCondition.model_rebuild()
AnyCondition.model_rebuild()
NotCondition.model_rebuild()


# ---- triggers ---------------------------------------------------------------------------


class EventTrigger(_Model):
    kind: Literal["event"]
    event: str = Field(min_length=1, max_length=255)
    where: list[Filter] = Field(default_factory=list)


class TraitChangeTrigger(_Model):
    """A trait changed (optionally from / to given values), e.g. ``address.city``: a move."""

    kind: Literal["trait_change"]
    trait: str = Field(min_length=1, max_length=200)
    to: Any = None
    from_: Any = Field(default=None, alias="from")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DateTrigger(_Model):
    """A date relative to a date trait, in the profile's time zone: ``offset`` before (-)
    or after the date, at ``at`` local time; ``annual`` repeats it every year (birthdays)."""

    kind: Literal["date"]
    trait: str = Field(min_length=1, max_length=200)
    offset: Duration = "0d"
    at: time = time(9, 0)
    annual: bool = False

    @field_validator("offset")
    @classmethod
    def _offset(cls, v: str) -> str:
        return _duration(v)


class SignalTrigger(_Model):
    """An outside signal (``POST /api/v1/signals``) enrolls every profile matching ``where``."""

    kind: Literal["signal"]
    signal: str = Field(min_length=1, max_length=255)
    where: list[TraitCondition] = Field(default_factory=list)


class ApiTrigger(_Model):
    kind: Literal["api"]


Trigger = Annotated[
    EventTrigger | TraitChangeTrigger | DateTrigger | SignalTrigger | ApiTrigger, Field(discriminator="kind")
]


class Frequency(enum.StrEnum):
    ONCE = "once"
    ONCE_PER_KEY = "once_per_key"
    COOLDOWN = "cooldown"
    EVERY_TIME = "every_time"


class Entry(_Model):
    frequency: Frequency = Frequency.ONCE
    key: str | None = Field(default=None, description="with once_per_key: e.g. properties.cart_id")
    cooldown: Duration | None = None
    condition: Condition | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Entry:
        if self.frequency is Frequency.ONCE_PER_KEY and not self.key:
            raise ValueError("frequency once_per_key needs key")
        if self.frequency is Frequency.COOLDOWN:
            if not self.cooldown:
                raise ValueError("frequency cooldown needs cooldown")
            _duration(self.cooldown)
        return self


class ExitOnEvent(_Model):
    kind: Literal["event"]
    event: str = Field(min_length=1, max_length=255)
    where: list[Filter] = Field(default_factory=list)
    correlate: str | None = None


class ExitOnUnsubscribe(_Model):
    kind: Literal["unsubscribed"]


ExitRule = Annotated[ExitOnEvent | ExitOnUnsubscribe, Field(discriminator="kind")]


class Goal(_Model):
    """A conversion: the event within ``within`` of entry ends the journey as converted."""

    event: str = Field(min_length=1, max_length=255)
    where: list[Filter] = Field(default_factory=list)
    within: Duration = "30d"
    correlate: str | None = None

    @field_validator("within")
    @classmethod
    def _within(cls, v: str) -> str:
        return _duration(v)


# ---- nodes ----------------------------------------------------------------------------

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class DelayNode(_Model):
    """Wait a duration; or until a local time of day on allowed weekdays; or until a date
    trait plus ``offset``. Local times are in the profile's time zone."""

    kind: Literal["delay"]
    duration: Duration | None = None
    until_time: time | None = None
    weekdays: list[Weekday] | None = None
    until_trait: str | None = None
    offset: Duration = "0d"
    next: str | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> DelayNode:
        modes = [self.duration is not None, self.until_time is not None, self.until_trait is not None]
        if sum(modes) != 1:
            raise ValueError("give exactly one of duration, until_time, until_trait")
        if self.duration is not None and parse_duration(self.duration).total_seconds() < 0:
            raise ValueError("duration must not be negative")
        _duration(self.offset)
        if self.weekdays is not None and (self.until_time is None or not self.weekdays):
            raise ValueError("weekdays go with until_time and must not be empty")
        return self


class WaitForEventNode(_Model):
    """Wait for an event; ``on_event`` when it comes, ``on_timeout`` after ``timeout``.

    ``correlate`` ties the awaited event to this enrollment: a property name (such as
    ``cart_id``) that must equal the same property of the event that started the journey,
    or ``message`` to require the ``message_id`` property of the message this journey sent
    last (email opens and clicks carry it)."""

    kind: Literal["wait_for_event"]
    event: str = Field(min_length=1, max_length=255)
    where: list[Filter] = Field(default_factory=list)
    correlate: str | None = None
    timeout: Duration
    on_event: str | None = None
    on_timeout: str | None = None

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: str) -> str:
        if parse_duration(v).total_seconds() <= 0:
            raise ValueError("timeout must be positive")
        return v


class Branch(_Model):
    when: Condition
    next: str | None = None


class ConditionNode(_Model):
    """The first branch whose condition holds is taken; ``else`` otherwise."""

    kind: Literal["condition"]
    branches: list[Branch] = Field(min_length=1)
    else_: str | None = Field(default=None, alias="else")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Variant(_Model):
    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(gt=0)
    next: str | None = None


class SplitNode(_Model):
    """A random split with weights, deterministic per enrollment. A ``holdout`` weight
    sends that share to the control group, which exits without messages."""

    kind: Literal["split"]
    variants: list[Variant] = Field(min_length=1)
    holdout: float = Field(default=0, ge=0)


class EmailTemplate(_Model):
    subject: str = Field(min_length=1, max_length=2000)
    html: str | None = Field(default=None, max_length=500_000)
    text: str | None = Field(default=None, max_length=500_000)
    from_: str | None = Field(default=None, alias="from")
    reply_to: str | None = None
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _body(self) -> EmailTemplate:
        if not self.html and not self.text:
            raise ValueError("an email needs html or text")
        return self


class SendEmailNode(_Model):
    kind: Literal["send_email"]
    email: EmailTemplate
    marketing: bool = Field(default=True, description="marketing mail honours unsubscribes")
    next: str | None = None


class WebhookNode(_Model):
    kind: Literal["webhook"]
    url: str = Field(min_length=8, max_length=2000)
    body: dict[str, Any] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    map_response: dict[str, str] = Field(
        default_factory=dict, description="trait name -> dotted path in the JSON response"
    )
    next: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("url must start with http:// or https://")
        return v


class UpdateProfileNode(_Model):
    kind: Literal["update_profile"]
    set: dict[str, Any] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list)
    add_tags: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(default_factory=list)
    remove_tags: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(default_factory=list)
    stage: str | None = Field(
        default=None, min_length=1, max_length=64, description="move to this lifecycle stage"
    )
    next: str | None = None


class ListNode(_Model):
    kind: Literal["add_to_list", "remove_from_list"]
    list: str = Field(pattern=KEY)
    next: str | None = None


class JumpNode(_Model):
    """Leave this journey and enter another (its entry rules apply)."""

    kind: Literal["jump"]
    journey: str = Field(pattern=KEY)


class ExitNode(_Model):
    kind: Literal["exit"]


Node = Annotated[
    DelayNode
    | WaitForEventNode
    | ConditionNode
    | SplitNode
    | SendEmailNode
    | WebhookNode
    | UpdateProfileNode
    | ListNode
    | JumpNode
    | ExitNode,
    Field(discriminator="kind"),
]


class JourneyDefinition(_Model):
    key: str = Field(pattern=KEY, description="stable identifier, e.g. abandoned-cart")
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    trigger: Trigger
    entry: Entry = Field(default_factory=Entry)
    exit: list[ExitRule] = Field(default_factory=list)
    goal: Goal | None = None
    start: str
    nodes: dict[Annotated[str, Field(pattern=NODE_ID)], Node] = Field(min_length=1)


# ---- graph checks -----------------------------------------------------------------------


class DefinitionProblem(BaseModel):
    """One thing wrong with a definition: where (node id and field) and why."""

    node: str | None
    field: str
    reason: str


def successors(node: Any) -> list[tuple[str, str | None]]:
    """(field, target) pairs of a node's outgoing edges; ``None`` ends the journey."""
    if isinstance(node, WaitForEventNode):
        return [("on_event", node.on_event), ("on_timeout", node.on_timeout)]
    if isinstance(node, ConditionNode):
        return [(f"branches[{i}].next", b.next) for i, b in enumerate(node.branches)] + [("else", node.else_)]
    if isinstance(node, SplitNode):
        return [(f"variants[{i}].next", v.next) for i, v in enumerate(node.variants)]
    if isinstance(node, JumpNode | ExitNode):
        return []
    return [("next", node.next)]


WAITING_KINDS = (DelayNode, WaitForEventNode)


def check_graph(d: JourneyDefinition) -> list[DefinitionProblem]:
    problems: list[DefinitionProblem] = []
    if d.start not in d.nodes:
        problems.append(DefinitionProblem(node=None, field="start", reason=f"no node named {d.start!r}"))
    for node_id, node in d.nodes.items():
        for field, target in successors(node):
            if target is not None and target not in d.nodes:
                problems.append(
                    DefinitionProblem(node=node_id, field=field, reason=f"no node named {target!r}")
                )
        if isinstance(node, SplitNode):
            names = [v.name for v in node.variants]
            if len(set(names)) != len(names):
                problems.append(
                    DefinitionProblem(node=node_id, field="variants", reason="variant names must differ")
                )
            if "control" in names:
                problems.append(
                    DefinitionProblem(
                        node=node_id, field="variants", reason="'control' is reserved for the holdout"
                    )
                )
        if isinstance(node, ConditionNode | SendEmailNode):
            for ref in _engagement_nodes(node):
                if ref not in d.nodes:
                    problems.append(
                        DefinitionProblem(node=node_id, field="when", reason=f"no node named {ref!r}")
                    )
    problems.extend(_template_problems(d))
    if problems:
        return problems
    reachable = _reachable(d)
    for node_id in d.nodes:
        if node_id not in reachable:
            problems.append(DefinitionProblem(node=node_id, field="", reason="not reachable from start"))
    cycle = _instant_cycle(d)
    if cycle:
        problems.append(
            DefinitionProblem(
                node=cycle[0],
                field="next",
                reason="loop without a delay or wait: " + " -> ".join([*cycle, cycle[0]]),
            )
        )
    return problems


def _template_problems(d: JourneyDefinition) -> list[DefinitionProblem]:
    """Liquid syntax errors and unknown filters, found at push time rather than at send time."""
    found: list[DefinitionProblem] = []

    def check_one(node_id: str, field: str, source: str | None, *, html: bool = False) -> None:
        if source:
            error = check_template(source, html=html)
            if error:
                found.append(DefinitionProblem(node=node_id, field=field, reason=f"template: {error}"))

    def check_values(node_id: str, field: str, value: Any) -> None:
        if isinstance(value, str):
            check_one(node_id, field, value)
        elif isinstance(value, dict):
            for k, v in value.items():
                check_values(node_id, f"{field}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                check_values(node_id, f"{field}[{i}]", v)

    for node_id, node in d.nodes.items():
        if isinstance(node, SendEmailNode):
            check_one(node_id, "email.subject", node.email.subject)
            check_one(node_id, "email.html", node.email.html, html=True)
            check_one(node_id, "email.text", node.email.text)
        elif isinstance(node, WebhookNode) and node.body is not None:
            check_values(node_id, "body", node.body)
    return found


def _engagement_nodes(node: Any) -> list[str]:
    refs: list[str] = []

    def walk(c: Any) -> None:
        if isinstance(c, EngagementCondition) and c.node:
            refs.append(c.node)
        elif isinstance(c, AllCondition):
            for x in c.all:
                walk(x)
        elif isinstance(c, AnyCondition):
            for x in c.any:
                walk(x)
        elif isinstance(c, NotCondition):
            walk(c.not_)

    if isinstance(node, ConditionNode):
        for b in node.branches:
            walk(b.when)
    return refs


def reacts_to_events(d: JourneyDefinition) -> bool:
    """Whether an event can move an enrollment of this definition: an exit rule, a goal
    or a wait for an event. Enrollments of one that cannot are left alone by events."""
    waits = any(isinstance(n, WaitForEventNode) for n in d.nodes.values())
    return bool(d.exit) or d.goal is not None or waits


def reads_history(d: JourneyDefinition) -> bool:
    """Whether a condition of this definition (entry, branches, anywhere) reads the
    person's past events or engagement: then an event must be attributed to its person
    before journeys see it."""
    return _holds_history(d)


def _holds_history(value: Any) -> bool:
    if isinstance(value, EventCondition | EngagementCondition):
        return True
    if isinstance(value, BaseModel):
        return any(_holds_history(getattr(value, name)) for name in type(value).model_fields)
    if isinstance(value, list | tuple):
        return any(_holds_history(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_history(v) for v in value.values())
    return False


def _reachable(d: JourneyDefinition) -> set[str]:
    seen: set[str] = set()
    todo = [d.start]
    while todo:
        n = todo.pop()
        if n in seen or n not in d.nodes:
            continue
        seen.add(n)
        todo.extend(t for _, t in successors(d.nodes[n]) if t is not None)
    return seen


def _instant_cycle(d: JourneyDefinition) -> list[str] | None:
    """A cycle through nodes that never wait would spin forever within one advance."""
    instant = {k for k, n in d.nodes.items() if not isinstance(n, WAITING_KINDS)}
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for _, t in successors(d.nodes[n]):
            if t is None or t not in instant:
                continue
            if color.get(t) == 1:
                return stack[stack.index(t) :]
            if t not in color:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(instant):
        if n not in color:
            found = visit(n)
            if found:
                return found
    return None


class InvalidDefinition(Exception):
    def __init__(self, problems: list[DefinitionProblem]) -> None:
        super().__init__("; ".join(f"{p.node or '-'}.{p.field}: {p.reason}" for p in problems))
        self.problems = problems


def parse_definition(data: Any) -> JourneyDefinition:
    """Validate a decoded JSON/YAML document; raise ``InvalidDefinition`` with every problem."""
    try:
        definition = JourneyDefinition.model_validate(data)
    except ValidationError as exc:
        raise InvalidDefinition([_problem(e) for e in exc.errors()]) from None
    problems = check_graph(definition)
    if problems:
        raise InvalidDefinition(problems)
    return definition


def _problem(error: Any) -> DefinitionProblem:
    loc = [str(p) for p in error.get("loc", ())]
    node: str | None = None
    if len(loc) >= 2 and loc[0] == "nodes":
        node = loc[1]
        rest = loc[2:]
        # Drop the discriminator tag pydantic inserts ("delay", "send_email", ...).
        if rest and rest[0] in _NODE_KINDS:
            rest = rest[1:]
        field = ".".join(rest)
    else:
        field = ".".join(p for p in loc if p not in _TRIGGER_KINDS)
    return DefinitionProblem(node=node, field=field, reason=str(error.get("msg", "invalid")))


_NODE_KINDS = {
    "delay",
    "wait_for_event",
    "condition",
    "split",
    "send_email",
    "webhook",
    "update_profile",
    "add_to_list",
    "remove_from_list",
    "jump",
    "exit",
}
_TRIGGER_KINDS = {"event", "trait_change", "date", "signal", "api", "unsubscribed"}


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of a journey definition."""
    schema = JourneyDefinition.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://whenthen.dev/schemas/journey.json"
    return schema
