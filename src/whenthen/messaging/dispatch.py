"""The dispatcher: performs outbox jobs after the transactions that queued them commit.

Delivery guarantee (docs/adr/0003-journeys-runtime.md): a job is claimed by hiding it for
a lease, performed outside any transaction, then recorded. A crash between the provider
accepting a message and the record being written makes the job run again after the
lease: that narrow window is the only way to a duplicate. The message row, keyed by the
effect's idempotency key, is checked before sending, so a job whose message is already
recorded as sent is never sent again.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from whenthen import profiles
from whenthen.kernel.clock import Clock
from whenthen.kernel.errors import NotFound
from whenthen.messaging import service
from whenthen.messaging.email import Addressing, build_email, unsubscribe_url
from whenthen.messaging.ports import EmailSender, WebhookCaller
from whenthen.profiles.model import Profile
from whenthen.settings import EmailSettings, WebhookSettings
from whenthen.storage import Database
from whenthen.templates import TemplateError, render

log = logging.getLogger("whenthen.dispatch")


@dataclass(frozen=True, slots=True)
class Outcome:
    """``done``; or ``retry_at`` with the error; or ``failed`` (permanent) with the error."""

    done: bool = True
    retry_at: datetime | None = None
    error: str | None = None


JobHandler = Callable[[Any], Outcome]
#: Attempts after which a job whose handler keeps raising is failed for good.
MAX_CRASHES = 8


def backoff(attempts: int, now: datetime) -> datetime:
    """When to try again after attempt number ``attempts`` (1-based) failed: 15 s, 30 s,
    1 min, ... at most an hour."""
    return now + timedelta(seconds=min(3600, 15 * 2 ** max(0, attempts - 1)))


def attempt_of(job: Any) -> int:
    """Which attempt this run is (1 for the first). ``claim`` returns the row as it was
    before it counted the claim, so the stored count is the number of earlier runs."""
    return int(job.attempts) + 1


class Dispatcher:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        handlers: Mapping[str, JobHandler],
        *,
        batch: int = 50,
        lease: timedelta = timedelta(minutes=5),
    ) -> None:
        self.db = db
        self.clock = clock
        self.handlers = dict(handlers)
        self.batch = batch
        self.lease = lease

    def drain_for(self, budget_seconds: float = 0.25) -> int:
        """Run batches until the outbox has nothing ready or the time budget is spent, so
        delivery keeps pace with the pipeline instead of one batch per worker pass."""
        started = time.monotonic()
        total = 0
        while True:
            done = self.run_once()
            total += done
            if done < self.batch or time.monotonic() - started >= budget_seconds:
                return total

    def run_once(self) -> int:
        with self.db.write() as conn:
            jobs = service.claim(conn, self.clock.now(), limit=self.batch, lease=self.lease)
        for job in jobs:
            handler = self.handlers.get(job.kind)
            try:
                if handler is None:
                    outcome = Outcome(done=False, error=f"no handler for job kind {job.kind!r}")
                else:
                    outcome = handler(job)
            except Exception as exc:
                log.exception("job %s (%s) failed", job.id, job.kind)
                # A handler that keeps raising is a bug, not a busy provider: give up after a few.
                gave_up = job.attempts + 1 >= MAX_CRASHES
                outcome = Outcome(
                    done=False,
                    retry_at=None if gave_up else backoff(job.attempts + 1, self.clock.now()),
                    error=f"{'gave up after repeated errors: ' if gave_up else ''}{exc!r}",
                )
            with self.db.write() as conn:
                now = self.clock.now()
                if outcome.done:
                    service.finish_job(conn, job.id, now)
                elif outcome.retry_at is not None:
                    service.retry_job(conn, job.id, outcome.retry_at, outcome.error or "")
                else:
                    service.fail_job(conn, job.id, now, outcome.error or "failed")
        return len(jobs)


def _unsent(conn: Any, message_id: str) -> Any:
    """The message row if it still waits to be sent; ``None`` when it was erased or an
    earlier run already recorded its outcome (a job run twice never sends twice)."""
    msg = service.message(conn, message_id)
    return msg if msg is not None and msg.status in ("queued", "retrying") else None


def _profile(conn: Any, ws: str, profile_id: str) -> Profile | None:
    try:
        return profiles.get_profile(conn, ws, profile_id)
    except NotFound:
        return None


def render_context(profile: Profile, payload: Mapping[str, Any], message_id: str) -> dict[str, Any]:
    context = dict(payload.get("context") or {})
    event = context.get("event")
    if isinstance(event, dict) and "name" not in event and "event" in event:
        # Templates are documented to see ``event.name`` (whenthen.templates.rendering);
        # the journey stores the trigger's name as ``event``: offer both.
        context["event"] = {**event, "name": event["event"]}
    context["traits"] = profile.traits
    context["profile"] = {
        "id": profile.id,
        "email": profile.email,
        "phone": profile.phone,
        "user_id": profile.user_ids[0] if profile.user_ids else None,
    }
    context["message"] = {"id": message_id}
    return context


class EmailJob:
    """Render, check consent, build and send (or capture) one email."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        settings: EmailSettings,
        *,
        public_url: str,
        secret: bytes,
        sender: EmailSender | None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.public_url = public_url
        self.secret = secret
        self.sender = sender

    def __call__(self, job: Any) -> Outcome:
        payload = job.payload
        mid = payload["message_id"]
        attempt = attempt_of(job)
        with self.db.read() as conn:
            msg = _unsent(conn, mid)
            if msg is None:
                return Outcome()
            profile = _profile(conn, msg.workspace_id, msg.profile_id)
            # The survivor's consent: the profile may have been merged since the message was queued.
            consent = (
                profiles.consent_status(conn, msg.workspace_id, profile.id, "email") if profile else None
            )
        now = self.clock.now()
        if profile is None:
            return self._record(mid, "skipped", reason="profile erased")
        if not profile.email:
            return self._record(mid, "skipped", reason="no email address")
        if payload.get("marketing", True) and consent == "unsubscribed":
            return self._record(mid, "skipped", reason="unsubscribed")
        a = Addressing(
            public_url=self.public_url,
            secret=self.secret,
            workspace_id=msg.workspace_id,
            profile_id=profile.id,
            message_id=mid,
        )
        template = payload["email"]
        context = render_context(profile, payload, mid)
        context["unsubscribe_url"] = unsubscribe_url(a)
        try:
            subject = render(template["subject"], context)
            html = render(template["html"], context, html=True) if template.get("html") else None
            text = render(template["text"], context) if template.get("text") else None
        except TemplateError as exc:
            return self._record(mid, "failed", reason=f"template: {exc}", failed=True, attempts=attempt)
        built = build_email(
            a=a,
            sender=template.get("from") or self.settings.from_address,
            recipient=profile.email,
            subject=subject,
            html=html,
            text=text,
            reply_to=template.get("reply_to"),
            marketing=bool(payload.get("marketing", True)),
            now=now,
        )
        details: dict[str, Any] = {
            "recipient": profile.email,
            "subject": subject,
            "body_html": built.message.get_body(("html",)).get_content() if html else None,  # type: ignore[union-attr]
            "body_text": built.message.get_body(("plain",)).get_content() if text else None,  # type: ignore[union-attr]
            "links": list(built.links),
        }
        if self.sender is None:
            return self._record(
                mid,
                "captured",
                reason="no SMTP server configured: not delivered",
                sent_at=now,
                attempts=attempt,
                **details,
            )
        delivery = self.sender.send(built.message)
        if delivery.accepted:
            return self._record(
                mid,
                "sent",
                sent_at=self.clock.now(),
                attempts=attempt,
                response={"smtp": delivery.detail},
                **details,
            )
        if delivery.permanent or attempt >= self.settings.max_attempts:
            return self._record(
                mid, "failed", reason=delivery.detail, failed=True, attempts=attempt, **details
            )
        with self.db.write() as conn:
            service.record(conn, mid, status="retrying", reason=delivery.detail, attempts=attempt)
        return Outcome(done=False, retry_at=backoff(attempt, now), error=delivery.detail)

    def _record(
        self, mid: str, status: str, *, reason: str | None = None, failed: bool = False, **values: Any
    ) -> Outcome:
        with self.db.write() as conn:
            service.record(conn, mid, status=status, reason=reason, **values)
        return Outcome(done=not failed, error=reason if failed else None)


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _render_value(value: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return render(value, dict(context))
    if isinstance(value, dict):
        return {k: _render_value(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_value(v, context) for v in value]
    return value


def _dig(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


class WebhookJob:
    """POST JSON with an HMAC signature and an idempotency key; retry on 5xx, 408, 429 and
    timeouts with backoff; map fields of a JSON answer back into traits."""

    def __init__(
        self, db: Database, clock: Clock, settings: WebhookSettings, *, secret: bytes, caller: WebhookCaller
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.secret = secret
        self.caller = caller

    def __call__(self, job: Any) -> Outcome:
        payload = job.payload
        mid = payload["message_id"]
        attempt = attempt_of(job)
        with self.db.read() as conn:
            msg = _unsent(conn, mid)
            if msg is None:
                return Outcome()
            profile = _profile(conn, msg.workspace_id, msg.profile_id)
        if profile is None:
            self._record(mid, "skipped", reason="profile erased")
            return Outcome()
        context = render_context(profile, payload, mid)
        try:
            body_doc = (
                _render_value(payload["body"], context)
                if payload.get("body") is not None
                else {"profile": context["profile"], "traits": profile.traits, "event": context.get("event")}
            )
        except TemplateError as exc:
            self._record(mid, "failed", reason=f"template: {exc}", attempts=attempt)
            return Outcome(done=False, error=str(exc))
        body = orjson.dumps(body_doc)
        timestamp = int(self.clock.now().timestamp())
        headers = {
            **{str(k): str(v) for k, v in (payload.get("headers") or {}).items()},
            "Content-Type": "application/json",
            "Idempotency-Key": msg.idempotency_key,
            "X-Whenthen-Signature": signature(self.secret, timestamp, body),
            "X-Whenthen-Message-Id": mid,
        }
        result = self.caller.call(payload["url"], body, headers)
        now = self.clock.now()
        if result.ok:
            mapped = {
                trait: _dig(result.body, path)
                for trait, path in (payload.get("map_response") or {}).items()
                if _dig(result.body, path) is not None
            }
            with self.db.write() as conn:
                service.record(
                    conn,
                    mid,
                    status="sent",
                    sent_at=now,
                    recipient=payload["url"],
                    attempts=attempt,
                    reason=None,
                    response={"status": result.status, "body": result.body},
                )
                if mapped:
                    profiles.update_traits(conn, msg.workspace_id, profile.id, set_=mapped, unset=(), now=now)
            return Outcome()
        error = result.error or f"HTTP {result.status}"
        if result.retryable and attempt < self.settings.max_attempts:
            with self.db.write() as conn:
                service.record(
                    conn, mid, status="retrying", reason=error, recipient=payload["url"], attempts=attempt
                )
            return Outcome(done=False, retry_at=backoff(attempt, now), error=error)
        self._record(
            mid,
            "failed",
            reason=error,
            recipient=payload["url"],
            attempts=attempt,
            response={"status": result.status, "body": result.body},
        )
        return Outcome(done=False, error=error)

    def _record(self, mid: str, status: str, **values: Any) -> None:
        with self.db.write() as conn:
            service.record(conn, mid, status=status, **values)
