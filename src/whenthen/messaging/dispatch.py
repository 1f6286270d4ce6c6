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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import orjson

from whenthen import profiles
from whenthen.kernel.clock import Clock
from whenthen.kernel.errors import NotFound
from whenthen.messaging import service
from whenthen.messaging.email import Addressing, BuiltEmail, Outgoing, build_email, unsubscribe_url
from whenthen.messaging.ports import Delivery, EmailBatchSender, EmailSender, TemplateSource, WebhookCaller
from whenthen.profiles.model import Profile
from whenthen.settings import EmailSettings, WebhookSettings
from whenthen.storage import Database
from whenthen.storage.plans import by_key_probes
from whenthen.templates import TemplateError, render

log = logging.getLogger("whenthen.dispatch")


@dataclass(frozen=True, slots=True)
class Outcome:
    """``done``; or ``retry_at`` with the error; or ``failed`` (permanent) with the error.

    ``record``: (message id, columns) to write to the message row in the transaction that
    closes the job (batch handlers), so a batch costs one commit, not two per message."""

    done: bool = True
    retry_at: datetime | None = None
    error: str | None = None
    record: tuple[str, Mapping[str, Any]] | None = None


JobHandler = Callable[[Any], Outcome]


@runtime_checkable
class BatchHandler(Protocol):
    """A handler that performs many jobs of its kind at once; one outcome per job."""

    def run_batch(self, jobs: Sequence[Any]) -> list[Outcome]:
        """Perform the jobs (the records they need go in the outcomes)."""
        raise NotImplementedError


#: A claim after a full one takes this many batches' worth (see ``Dispatcher._claim``).
BACKLOG_FACTOR = 4

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
        #: How many the next claim takes: ``batch``, or ``BACKLOG_FACTOR`` times that after
        #: a full claim. Each batch waits for SQLite's writers twice (claim, record), behind
        #: pipeline batches under load, so a backlog drains in larger batches, while a
        #: quiet outbox keeps small ones (an email waits for the others of its batch).
        self._claim = batch

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
        """Claim a batch of ready jobs, perform them (those of a batch handler together),
        and record every outcome in one transaction."""
        limit = self._claim
        with self.db.write() as conn:
            jobs = service.claim(conn, self.clock.now(), limit=limit, lease=self.lease)
        self._claim = self.batch * BACKLOG_FACTOR if len(jobs) >= limit else self.batch
        if not jobs:
            return 0
        outcomes: dict[int, Outcome] = {}
        by_kind: dict[str, list[Any]] = {}
        for job in jobs:
            by_kind.setdefault(job.kind, []).append(job)
        for kind, group in by_kind.items():
            handler = self.handlers.get(kind)
            if isinstance(handler, BatchHandler):
                try:
                    for job, outcome in zip(group, handler.run_batch(group), strict=True):
                        outcomes[job.id] = outcome
                    continue
                except Exception:
                    log.exception("batch of %s %s jobs failed; one by one", len(group), kind)
            for job in group:
                outcomes[job.id] = self._perform(handler, job)
        self._close(jobs, outcomes)
        return len(jobs)

    def _perform(self, handler: JobHandler | None, job: Any) -> Outcome:
        try:
            if handler is None:
                return Outcome(done=False, error=f"no handler for job kind {job.kind!r}")
            return handler(job)
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.kind)
            # A handler that keeps raising is a bug, not a busy provider: give up after a few.
            gave_up = job.attempts + 1 >= MAX_CRASHES
            return Outcome(
                done=False,
                retry_at=None if gave_up else backoff(job.attempts + 1, self.clock.now()),
                error=f"{'gave up after repeated errors: ' if gave_up else ''}{exc!r}",
            )

    def _close(self, jobs: Sequence[Any], outcomes: Mapping[int, Outcome]) -> None:
        """Write the messages' records and close the jobs: one transaction for the batch,
        else (should that fail) one per job, so one bad row does not lose the others."""
        try:
            with self.db.write() as conn:
                _write_outcomes(conn, [(job, outcomes[job.id]) for job in jobs], self.clock.now())
            return
        except Exception:
            log.exception("recording a batch of %s jobs failed; one by one", len(jobs))
        for job in jobs:
            try:
                with self.db.write() as conn:
                    _write_outcomes(conn, [(job, outcomes[job.id])], self.clock.now())
            except Exception:
                # The job runs again when its lease ends; its message row says what to do.
                log.exception("recording job %s failed", job.id)


#: Jobs whose row leaves the outbox once done: each sends one message, and the message
#: row (status, reason, what was sent) is its record (ADR 0023). Other jobs (signal
#: fan-outs, imports, date back-fills) keep theirs, their payload holding their progress.
MESSAGE_KINDS = frozenset({"email", "webhook"})


def _write_outcomes(conn: Any, closed: Sequence[tuple[Any, Outcome]], now: datetime) -> None:
    with by_key_probes(conn):  # one pair of planner settings for the batch's writes
        _write_closed(conn, closed, now)


def _write_closed(conn: Any, closed: Sequence[tuple[Any, Outcome]], now: datetime) -> None:
    service.record_many(conn, [o.record for _, o in closed if o.record is not None])
    service.close_jobs(
        conn,
        finished=[
            (job.id, now, None if o.done else (o.error or "failed"))
            for job, o in closed
            if (o.done and job.kind not in MESSAGE_KINDS) or (not o.done and o.retry_at is None)
        ],
        retried=[
            (job.id, o.retry_at, o.error or "") for job, o in closed if not o.done and o.retry_at is not None
        ],
        removed=[job.id for job, o in closed if o.done and job.kind in MESSAGE_KINDS],
    )


def _unsent(conn: Any, message_id: str) -> Any:
    """The message row if it still waits to be sent; ``None`` when it was erased or an
    earlier run already recorded its outcome (a job run twice never sends twice)."""
    msg = service.message(conn, message_id)
    return msg if msg is not None and msg.status in service.STILL_TO_SEND else None


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


@runtime_checkable
class OutgoingSender(Protocol):
    """A sender that takes messages already written as bytes (``build_email``'s
    ``outgoing``: envelope and data), as ``SmtpSender`` does; other senders get the
    ``EmailMessage`` the port describes (``BuiltEmail.message``, parsed from those bytes)."""

    def send_outgoing(self, messages: Sequence[Outgoing]) -> list[Delivery]:
        """Hand the messages to the provider: one answer per message, in their order."""
        raise NotImplementedError


@dataclass(slots=True)
class _Pending:
    """An email built and waiting to be handed to the server."""

    index: int
    mid: str
    attempt: int
    built: BuiltEmail
    details: dict[str, Any]


class EmailJob:
    """Render, check consent, build and send (or capture) emails: a batch of jobs at a
    time (one read transaction, the sends concurrent when the sender can, the records
    written with the jobs' outcomes by the dispatcher)."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        settings: EmailSettings,
        *,
        public_url: str,
        secret: bytes,
        sender: EmailSender | None,
        templates: TemplateSource | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.public_url = public_url
        self.secret = secret
        self.sender = sender
        self.templates = templates

    def __call__(self, job: Any) -> Outcome:
        """One job on its own, its record written here."""
        outcome = self.run_batch([job])[0]
        if outcome.record is not None:
            mid, values = outcome.record
            with self.db.write() as conn:
                service.record(conn, mid, **values)
        return replace(outcome, record=None)

    def run_batch(self, jobs: Sequence[Any]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        mids = [job.payload["message_id"] for job in jobs]
        with self.db.read() as conn:
            rows = service.heads_by_id(conn, sorted(set(mids)))
            wanted: dict[str, set[str]] = {}
            for head in rows.values():
                if head.status in service.STILL_TO_SEND:
                    wanted.setdefault(head.workspace_id, set()).add(head.profile_id)
            # The survivor's consent: the profile may have been merged since it was queued.
            people: dict[tuple[str, str], tuple[Profile | None, str | None]] = {
                (ws, pid): found
                for ws, ids in wanted.items()
                for pid, found in profiles.recipients(conn, ws, sorted(ids), "email").items()
            }
            templates = self._templates(conn, jobs)
        pending: list[_Pending] = []
        seen: set[str] = set()
        now = self.clock.now()
        for i, job in enumerate(jobs):
            mid = mids[i]
            msg = rows.get(mid)
            if msg is None or msg.status not in service.STILL_TO_SEND or mid in seen:
                # Erased, already recorded by an earlier run, or twice in this batch: never twice.
                outcomes[i] = Outcome()
                continue
            seen.add(mid)
            profile, consent = people[(msg.workspace_id, msg.profile_id)]
            built = self._build(job, msg, profile, consent, now, templates)
            if isinstance(built, Outcome):
                outcomes[i] = built
            else:
                built.index = i
                pending.append(built)
        if pending and self.sender is None:
            for p in pending:
                outcomes[p.index] = _recorded(
                    p.mid,
                    "captured",
                    reason="no SMTP server configured: not delivered",
                    sent_at=now,
                    attempts=p.attempt,
                    **p.details,
                )
        elif pending:
            assert self.sender is not None
            if isinstance(self.sender, OutgoingSender):
                deliveries = self.sender.send_outgoing([p.built.outgoing for p in pending])
            elif isinstance(self.sender, EmailBatchSender):
                deliveries = self.sender.send_many([p.built.message for p in pending])
            else:
                deliveries = [self.sender.send(p.built.message) for p in pending]
            sent_at = self.clock.now()
            for p, delivery in zip(pending, deliveries, strict=True):
                outcomes[p.index] = self._delivered(p, delivery, sent_at, now)
        return [o if o is not None else Outcome() for o in outcomes]

    def _templates(self, conn: Any, jobs: Sequence[Any]) -> dict[_TemplateKey, Mapping[str, Any] | None]:
        """The templates the batch's jobs name (a journey's send queues its job with
        ``{"template": {"journey", "version", "node"}}``; a job with the template itself
        in ``email``, as queued before ADR 0022, needs none), each read once."""
        found: dict[_TemplateKey, Mapping[str, Any] | None] = {}
        for job in jobs:
            key = _template_key(job.payload)
            if key is not None and key not in found:
                found[key] = None if self.templates is None else self.templates.email_template(conn, *key)
        return found

    def _build(
        self,
        job: Any,
        msg: service.MessageHead,
        profile: Profile | None,
        consent: str | None,
        now: datetime,
        templates: Mapping[_TemplateKey, Mapping[str, Any] | None],
    ) -> Outcome | _Pending:
        payload = job.payload
        mid = msg.id
        attempt = attempt_of(job)
        if profile is None:
            return _recorded(mid, "skipped", reason="profile erased")
        if not profile.email:
            return _recorded(mid, "skipped", reason="no email address")
        if payload.get("marketing", True) and consent == "unsubscribed":
            return _recorded(mid, "skipped", reason="unsubscribed")
        a = Addressing(
            public_url=self.public_url,
            secret=self.secret,
            workspace_id=msg.workspace_id,
            profile_id=profile.id,
            message_id=mid,
        )
        key = _template_key(payload)
        template = payload.get("email") if key is None else templates[key]
        if template is None:
            reason = (
                f"template: no email node {key[2]!r} in version {key[1]} of journey {key[0]}"
                if key
                else "template: the job names no template"
            )
            return _recorded(mid, "failed", reason=reason, failed=True, attempts=attempt)
        context = render_context(profile, payload, mid)
        context["unsubscribe_url"] = unsubscribe_url(a)
        try:
            subject = render(template["subject"], context)
            html = render(template["html"], context, html=True) if template.get("html") else None
            text = render(template["text"], context) if template.get("text") else None
        except TemplateError as exc:
            return _recorded(mid, "failed", reason=f"template: {exc}", failed=True, attempts=attempt)
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
            "body_html": built.html,
            "body_text": built.text,
            "links": list(built.links),
        }
        return _Pending(index=-1, mid=mid, attempt=attempt, built=built, details=details)

    def _delivered(self, p: _Pending, delivery: Delivery, sent_at: datetime, now: datetime) -> Outcome:
        if delivery.accepted:
            return _recorded(
                p.mid,
                "sent",
                sent_at=sent_at,
                attempts=p.attempt,
                response={"smtp": delivery.detail},
                **p.details,
            )
        if delivery.permanent or p.attempt >= self.settings.max_attempts:
            return _recorded(
                p.mid, "failed", reason=delivery.detail, failed=True, attempts=p.attempt, **p.details
            )
        return Outcome(
            done=False,
            retry_at=backoff(p.attempt, now),
            error=delivery.detail,
            record=(p.mid, {"status": "retrying", "reason": delivery.detail, "attempts": p.attempt}),
        )


#: (journey id, version, node): a published send node's template.
_TemplateKey = tuple[str, int, str]


def _template_key(payload: Mapping[str, Any]) -> _TemplateKey | None:
    ref = payload.get("template")
    if not isinstance(ref, Mapping):
        return None
    return (str(ref["journey"]), int(ref["version"]), str(ref["node"]))


def _recorded(
    mid: str, status: str, *, reason: str | None = None, failed: bool = False, **values: Any
) -> Outcome:
    """The outcome of a job whose message ends (or is skipped) with ``status``."""
    return Outcome(
        done=not failed,
        error=reason if failed else None,
        record=(mid, {"status": status, "reason": reason, **values}),
    )


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
                    # Segments reading those traits follow (the worker's recheck step).
                    profiles.mark_for_recheck(conn, msg.workspace_id, [profile.id], "webhook", now)
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
