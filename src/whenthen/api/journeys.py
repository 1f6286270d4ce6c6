"""Admin API for journeys, signals, the message log and the local mailbox."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import yaml
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from whenthen import journeys, messaging, profiles
from whenthen.api.auth import admin, container
from whenthen.api.responses import JSONBody
from whenthen.kernel.errors import DomainError
from whenthen.workspaces import Principal

router = APIRouter(prefix="/api/v1", tags=["journeys"])
Admin = Annotated[Principal, Depends(admin)]
MAX_DEFINITION_BYTES = 1_000_000


def info_json(i: journeys.JourneyInfo) -> dict[str, Any]:
    return {
        "id": i.id,
        "key": i.key,
        "name": i.name,
        "status": i.status,
        "active_version": i.active_version,
        "versions": list(i.versions),
        "active_enrollments": i.active_enrollments,
    }


def message_json(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "profile_id": m.profile_id,
        "journey_id": m.journey_id,
        "enrollment_id": m.enrollment_id,
        "node": m.node,
        "channel": m.channel,
        "status": m.status,
        "delivered": m.status == "sent",
        "reason": m.reason,
        "recipient": m.recipient,
        "subject": m.subject,
        "body_text": m.body_text,
        "body_html": m.body_html,
        "links": m.links,
        "attempts": m.attempts,
        "created_at": m.created_at,
        "sent_at": m.sent_at,
    }


async def read_document(request: Request) -> Any:
    """A definition as JSON or YAML (by Content-Type; YAML is a superset, so both parse)."""
    body = await request.body()
    if len(body) > MAX_DEFINITION_BYTES:
        raise DomainError("payload_too_large", "a definition may be at most 1 MB", status=413)
    ctype = request.headers.get("content-type", "")
    try:
        if "yaml" in ctype:
            return yaml.safe_load(body)
        return orjson.loads(body)
    except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
        raise DomainError("invalid_document", f"the body is not valid JSON or YAML: {exc}") from None


def _invalid(exc: journeys.InvalidDefinition) -> DomainError:
    return DomainError(
        "invalid_definition",
        "the journey definition is not valid",
        details={"problems": [p.model_dump() for p in exc.problems]},
    )


@router.get("/journeys/schema", tags=["journeys"])
async def schema() -> JSONBody:
    """The published JSON Schema of journey definitions."""
    return JSONBody(journeys.json_schema())


@router.post("/journeys/validate")
async def validate(request: Request, principal: Admin) -> JSONBody:
    data = await read_document(request)
    try:
        d = journeys.parse_definition(data)
    except journeys.InvalidDefinition as exc:
        raise _invalid(exc) from None
    return JSONBody({"valid": True, "key": d.key, "nodes": len(d.nodes)})


@router.post("/journeys", status_code=201)
async def push(request: Request, principal: Admin) -> JSONBody:
    """Create a journey or replace its draft. Published versions are never changed."""
    data = await read_document(request)
    c = container(request)

    def run() -> dict[str, Any]:
        try:
            with c.db.write() as conn:
                return info_json(journeys.push(conn, principal.workspace_id, data, now=c.clock.now()))
        except journeys.InvalidDefinition as exc:
            raise _invalid(exc) from None

    return JSONBody(await run_in_threadpool(run), status_code=201)


@router.get("/journeys")
async def list_journeys(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return {"data": [info_json(i) for i in journeys.list_all(conn, principal.workspace_id)]}

    return JSONBody(await run_in_threadpool(run))


@router.get("/journeys/{key}")
async def show(request: Request, principal: Admin, key: str, version: int | None = None) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            body = info_json(journeys.info(conn, principal.workspace_id, key))
            body["definition"] = journeys.version_definition(conn, principal.workspace_id, key, version)
            body["stats"] = journeys.stats(conn, principal.workspace_id, key)
            return body

    return JSONBody(await run_in_threadpool(run))


@router.post("/journeys/{key}/publish")
async def publish(request: Request, principal: Admin, key: str, migrate: bool = False) -> JSONBody:
    """Publish the draft. In-flight people stay on their version unless ``migrate=true``."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            now = c.clock.now()
            return info_json(journeys.publish(conn, principal.workspace_id, key, now=now, migrate=migrate))

    return JSONBody(await run_in_threadpool(run))


def _status_route(action: str, status: str) -> None:
    async def endpoint(request: Request, principal: Admin, key: str) -> JSONBody:
        c = container(request)

        def run() -> dict[str, Any]:
            with c.db.write() as conn:
                return info_json(
                    journeys.set_status(conn, principal.workspace_id, key, status, now=c.clock.now())
                )

        return JSONBody(await run_in_threadpool(run))

    endpoint.__name__ = f"journey_{action}"
    router.add_api_route(
        f"/journeys/{{key}}/{action}", endpoint, methods=["POST"], summary=f"{action} a journey"
    )


_status_route("pause", "paused")
_status_route("resume", "active")
_status_route("archive", "archived")


class EnrollBody(BaseModel):
    user_id: str | None = Field(default=None, max_length=255)
    profile_id: str | None = Field(default=None, max_length=40)
    payload: dict[str, Any] = Field(default_factory=dict)


@router.post("/journeys/{key}/enroll")
async def enroll(request: Request, principal: Admin, key: str, body: EnrollBody) -> JSONBody:
    """Enter one person, with a payload templates can use as ``payload``."""
    if (body.user_id is None) == (body.profile_id is None):
        raise DomainError("invalid_query", "give exactly one of user_id, profile_id")
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            if body.user_id is not None:
                pid = profiles.lookup(conn, principal.workspace_id, user_id=body.user_id).id
            else:
                assert body.profile_id is not None
                pid = profiles.get_profile(conn, principal.workspace_id, body.profile_id).id
            enrollment = journeys.enroll(
                conn,
                principal.workspace_id,
                key,
                pid,
                payload=body.payload,
                now=c.clock.now(),
                partitions=c.settings.pipeline.partitions,
            )
        c.worker.notify()
        return {"enrolled": enrollment is not None, "enrollment_id": enrollment, "profile_id": pid}

    return JSONBody(await run_in_threadpool(run))


@router.get("/journeys/{key}/messages")
async def journey_messages(
    request: Request, principal: Admin, key: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            j = journeys.info(conn, principal.workspace_id, key)
            return {
                "data": [
                    message_json(m)
                    for m in messaging.log_for_journey(conn, principal.workspace_id, j.id, limit)
                ]
            }

    return JSONBody(await run_in_threadpool(run))


class SignalBody(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    properties: dict[str, Any] = Field(default_factory=dict)


@router.post("/signals", status_code=202)
async def signal(request: Request, principal: Admin, body: SignalBody) -> JSONBody:
    """An outside signal (``storm_warning``...): every profile matching a signal-triggered
    journey's filter is entered, in the background, a page at a time."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            job = messaging.enqueue_job(
                conn,
                principal.workspace_id,
                "signal",
                {"name": body.name, "properties": body.properties},
                c.clock.now(),
            )
        c.worker.notify()
        return {"accepted": True, "job_id": job}

    return JSONBody(await run_in_threadpool(run), status_code=202)


@router.get("/profiles/{profile_id}/messages")
async def profile_messages(
    request: Request, principal: Admin, profile_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            p = profiles.get_profile(conn, principal.workspace_id, profile_id)
            return {
                "data": [
                    message_json(m)
                    for m in messaging.log_for_profile(conn, principal.workspace_id, [p.id], limit)
                ]
            }

    return JSONBody(await run_in_threadpool(run))


@router.get("/profiles/{profile_id}/journeys")
async def profile_journeys(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            p = profiles.get_profile(conn, principal.workspace_id, profile_id)
            return {"data": journeys.enrollments_of(conn, principal.workspace_id, p.id)}

    return JSONBody(await run_in_threadpool(run))


@router.get("/mailbox")
async def mailbox(
    request: Request, principal: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> JSONBody:
    """Email captured because no SMTP server is configured: not delivered to anyone."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            rows = messaging.mailbox(conn, principal.workspace_id, limit)
        return {"delivered": False, "data": [message_json(m) for m in rows]}

    return JSONBody(await run_in_threadpool(run))


class SimulateBody(BaseModel):
    definition: dict[str, Any]
    events: list[dict[str, Any]] | None = Field(default=None, max_length=100_000)
    backtest: bool = Field(default=False, description="run over the workspace's stored events")
    limit: int = Field(default=100_000, ge=1, le=1_000_000)
    until: str | None = None


@router.post("/journeys/simulate")
async def simulate(request: Request, principal: Admin, body: SimulateBody) -> JSONBody:
    """What the definition would have done with these events (or, with ``backtest``, with the
    events already stored), per person, with a virtual clock. Nothing is stored or sent."""
    from datetime import datetime

    from whenthen import tracking
    from whenthen.journeys.simulation import SimulationError, backtest_events
    from whenthen.journeys.simulation import simulate as run_simulation

    try:
        definition = journeys.parse_definition(body.definition)
    except journeys.InvalidDefinition as exc:
        raise _invalid(exc) from None
    until = None
    if body.until:
        try:
            until = datetime.fromisoformat(body.until.replace("Z", "+00:00"))
        except ValueError:
            raise DomainError("invalid_until", "until must be an ISO 8601 date-time") from None
        if until.tzinfo is None:
            raise DomainError("invalid_until", "until needs a time zone offset")
    c = container(request)

    def run() -> dict[str, Any]:
        if body.backtest:
            with c.db.read() as conn:
                events = backtest_events(
                    tracking.workspace_history(conn, principal.workspace_id, limit=body.limit)
                )
        else:
            events = body.events or []
        try:
            return run_simulation(definition, events, until=until)
        except SimulationError as exc:
            raise DomainError("invalid_events", str(exc)) from None

    return JSONBody(await run_in_threadpool(run))
