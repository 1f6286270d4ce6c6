"""Tag rules: definitions and the pure matching. No I/O.

A rule adds (or removes) one tag when the person performs an event whose properties pass
the filters and, optionally, a condition in the segment language holds for them at that
moment (it sees this event too). Example, from the loan offer that was retried by push,
then SMS, then WeChat: tag ``prefers-wechat`` when a WeChat message is clicked and no
push or SMS message was clicked in the last 30 days::

    {"key": "prefers-wechat", "tag": "prefers-wechat",
     "event": "Message Clicked", "where": [{"path": "channel", "value": "wechat"}],
     "condition": {"kind": "not", "condition": {"kind": "event", "event": "Message Clicked",
                   "where": [{"path": "channel", "op": "in", "value": ["push", "sms"]}],
                   "within_last": "30d"}}}

Rules run in the pipeline, in key order, after scoring and before segments and journeys;
a rule that changes nothing (the tag is already there, or already absent) does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from whenthen.kernel.filters import Filter, compare, lookup_path
from whenthen.segments.definition import SegmentDefinition, parse_segment

KEY = r"^[a-z0-9][a-z0-9_-]{0,79}$"


class TagRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(pattern=KEY)
    name: str | None = Field(default=None, max_length=200)
    tag: str = Field(min_length=1, max_length=100)
    action: Literal["add", "remove"] = "add"
    event: str = Field(min_length=1, max_length=255)
    where: list[Filter] = Field(default_factory=list, max_length=50)
    #: A condition in the segment language (``{"kind": "trait", ...}``), checked when the
    #: event matches.
    condition: dict[str, Any] | None = None

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        if not v.strip() or v != v.strip():
            raise ValueError("a tag has no leading or trailing spaces")
        return v

    @field_validator("condition")
    @classmethod
    def _condition(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            parse_segment({"condition": v})  # InvalidSegment is a ValueError: reported
        return v

    @property
    def definition(self) -> SegmentDefinition | None:
        return parse_segment({"condition": self.condition}) if self.condition is not None else None


def matches(rule: TagRule, event: str, properties: Mapping[str, Any]) -> bool:
    """Whether the event (name and properties) is the rule's trigger."""
    return rule.event == event and all(
        compare(lookup_path(properties, f.path.removeprefix("properties.")), f.op, f.value)
        for f in rule.where
    )
