"""Opens, clicks and unsubscribes from tracking links. Never commits.

Each becomes an event in the person's log (``Email Opened``, ``Email Link Clicked``,
``Email Unsubscribed``) with ``message_id``, ``journey_id`` and ``node`` properties, so
segments and wait-for-event nodes can use them. An unsubscribe also records consent at
once, in the same transaction, so no further marketing email goes out even before the
event is processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from whenthen import profiles
from whenthen.kernel.errors import NotFound
from whenthen.kernel.ids import new_secret
from whenthen.messaging import service
from whenthen.messaging.links import BadToken, verify


@dataclass(frozen=True, slots=True)
class Link:
    workspace_id: str
    profile_id: str
    message_id: str
    kind: str
    url: str | None


def read_token(secret: bytes, token: str, kind: str) -> Link:
    try:
        p = verify(secret, token)
    except BadToken:
        raise NotFound("link") from None
    if p.get("k") != kind:
        raise NotFound("link")
    return Link(workspace_id=p["w"], profile_id=p["p"], message_id=p["m"], kind=kind, url=p.get("u"))


def record(
    conn: Connection,
    link: Link,
    event: str,
    properties: dict[str, Any],
    *,
    now: datetime,
    partitions: int,
    message_id: str | None = None,
) -> bool:
    """Append the engagement event for the link's person; False when they no longer exist."""
    msg = service.message(conn, link.message_id)
    props = {
        "message_id": link.message_id,
        "journey_id": msg.journey_id if msg else None,
        "node": msg.node if msg else None,
        "channel": "email",
        **properties,
    }
    return profiles.emit_event(
        conn,
        link.workspace_id,
        link.profile_id,
        event,
        props,
        message_id=message_id or f"wt-{event.lower().replace(' ', '-')}-{new_secret(12)}",
        library="whenthen-links",
        now=now,
        partitions=partitions,
    )


def click_target(conn: Connection, link: Link) -> str:
    """The URL to redirect to: only one that was in the message we sent.

    A message's links are recorded with its outcome, after the SMTP server accepted its
    batch; until then (a link scanner fetching on delivery, or a quick reader) the signed
    URL of a message still in flight is trusted on its signature alone."""
    msg = service.message(conn, link.message_id)
    if link.url is None or msg is None:
        raise NotFound("link")
    if msg.status in service.STILL_TO_SEND and not msg.links:
        return link.url
    if link.url not in (msg.links or []):
        raise NotFound("link")
    return link.url


def unsubscribe(conn: Connection, link: Link, *, now: datetime, partitions: int, source: str) -> bool:
    """Record the unsubscribe (and its event, once); False when the person no longer exists."""
    try:
        # The survivor, when the person was merged since the email went out: consent is
        # read from the survivor, so it must be recorded there.
        profile = profiles.get_profile(conn, link.workspace_id, link.profile_id)
    except NotFound:
        return False
    changed = profiles.set_consent(
        conn, link.workspace_id, profile.id, "email", "unsubscribed", source=source, now=now
    )
    if changed:
        record(
            conn,
            link,
            "Email Unsubscribed",
            {"source": source},
            now=now,
            partitions=partitions,
            message_id=f"wt-unsub-{link.message_id}",
        )
    return True
