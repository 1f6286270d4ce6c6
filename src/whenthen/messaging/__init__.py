"""Messages: the log of what was sent, the outbox, and the dispatcher that sends."""

from whenthen.messaging.service import (
    Queued,
    delete_for,
    enqueue,
    enqueue_job,
    enqueue_many,
    log_for_journey,
    log_for_profile,
    mailbox,
    message,
    reassign_profile,
)

__all__ = [
    "Queued",
    "delete_for",
    "enqueue",
    "enqueue_job",
    "enqueue_many",
    "log_for_journey",
    "log_for_profile",
    "mailbox",
    "message",
    "reassign_profile",
]
