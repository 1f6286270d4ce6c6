"""What the dispatcher needs from the outside world."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Delivery:
    """The provider's answer: accepted (with its id) or refused (with the reason)."""

    accepted: bool
    detail: str
    permanent: bool = False


class EmailSender(Protocol):
    def send(self, message: EmailMessage) -> Delivery:
        """Hand one message to the provider."""
        raise NotImplementedError


@runtime_checkable
class EmailBatchSender(Protocol):
    """A sender that can hand over many messages at once (concurrently, over kept-open
    sessions); the dispatcher uses it when the sender offers it."""

    def send(self, message: EmailMessage) -> Delivery:
        """Hand one message to the provider."""
        raise NotImplementedError

    def send_many(self, messages: Sequence[EmailMessage]) -> list[Delivery]:
        """Hand the messages to the provider: one answer per message, in their order."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class WebhookResult:
    status: int | None
    body: Any
    error: str | None
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        if self.permanent:
            return False
        return (
            self.error is not None or self.status is None or self.status >= 500 or self.status in (408, 429)
        )


class WebhookCaller(Protocol):
    def call(self, url: str, body: bytes, headers: dict[str, str]) -> WebhookResult:
        """POST ``body`` to ``url``."""
        raise NotImplementedError


class TemplateSource(Protocol):
    """Where an email job that names its template (``{"template": {"journey", "version",
    "node"}}``) finds it: a published journey version's send node (ADR 0022)."""

    def email_template(self, conn: Any, journey_id: str, version: int, node: str) -> Mapping[str, Any] | None:
        """The node's email template as the job would carry it (``subject``, ``html``,
        ``text``, ``from``, ``reply_to``); ``None`` when there is no such node."""
        raise NotImplementedError
