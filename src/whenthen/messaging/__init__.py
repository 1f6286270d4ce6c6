"""Messages: the log of what was sent, the outbox, and the dispatcher that sends."""

from whenthen.messaging.service import (
    delete_for,
    enqueue,
    enqueue_job,
    log_for_journey,
    log_for_profile,
    mailbox,
    message,
    reassign_profile,
)

__all__ = [
    "delete_for",
    "enqueue",
    "enqueue_job",
    "log_for_journey",
    "log_for_profile",
    "mailbox",
    "message",
    "reassign_profile",
]
