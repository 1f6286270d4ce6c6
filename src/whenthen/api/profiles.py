"""Admin API for profiles: look up, list, events, export, erase. Every query is scoped to
the admin key's workspace; another workspace's ids answer 404, as unknown ones do."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from whenthen import journeys, profiles, scoring
from whenthen.api.auth import admin, container
from whenthen.api.responses import JSONBody
from whenthen.kernel.errors import DomainError
from whenthen.profiles import Erasure, Merge, Profile
from whenthen.segments import service as segments
from whenthen.tracking import StoredEvent
from whenthen.workspaces import Principal

router = APIRouter(prefix="/api/v1/profiles", tags=["profiles"])
Admin = Annotated[Principal, Depends(admin)]


def profile_json(p: Profile) -> dict[str, Any]:
    return {
        "id": p.id,
        "user_ids": p.user_ids,
        "anonymous_ids": p.anonymous_ids,
        "email": p.email,
        "phone": p.phone,
        "timezone": p.timezone,
        "traits": p.traits,
        "first_seen": p.first_seen,
        "last_seen": p.last_seen,
        "event_count": p.event_count,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }


def event_json(e: StoredEvent) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "message_id": e.message_id,
        "type": e.type.value,
        "event": e.event,
        "user_id": e.user_id,
        "anonymous_id": e.anonymous_id,
        "timestamp": e.timestamp,
        "received_at": e.received_at,
        "payload": e.payload,
    }


def merge_json(m: Merge) -> dict[str, Any]:
    return {
        "from_profile_id": m.from_profile_id,
        "into_profile_id": m.into_profile_id,
        "reason": m.reason,
        "message_id": m.message_id,
        "merged_at": m.merged_at,
    }


def _cursor(ts: datetime, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{ts.isoformat()}|{seq}".encode()).decode().rstrip("=")


def _parse_cursor(text: str | None) -> tuple[datetime, int] | None:
    if not text:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        ts, seq = raw.rsplit("|", 1)
        return datetime.fromisoformat(ts), int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise DomainError("invalid_cursor", "the cursor is not one this API returned") from None


@router.get("/lookup")
async def lookup(
    request: Request,
    principal: Admin,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    email: str | None = None,
) -> JSONBody:
    """The merged profile for a userId, an anonymousId or an email."""
    given = [v for v in (user_id, anonymous_id, email) if v is not None]
    if len(given) != 1:
        raise DomainError("invalid_query", "give exactly one of user_id, anonymous_id, email")
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            p = profiles.lookup(
                conn, principal.workspace_id, user_id=user_id, anonymous_id=anonymous_id, email=email
            )
            return _full(conn, principal, p)

    return JSONBody(await run_in_threadpool(run))


def _full(conn: Any, principal: Principal, p: Profile) -> dict[str, Any]:
    body = profile_json(p)
    body["merges"] = [merge_json(m) for m in profiles.merges_of(conn, principal.workspace_id, p.id)]
    body["groups"] = profiles.groups_of(conn, principal.workspace_id, p.id)
    return body


@router.get("")
async def list_profiles(
    request: Request,
    principal: Admin,
    email: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> JSONBody:
    """List or search profiles. Filter by trait with ``trait.<name>=<value>`` (exact, as text)."""
    trait_equals: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("trait."):
            name = key[len("trait.") :]
            if not name or len(name) > 200:
                raise DomainError("invalid_query", "trait filters look like trait.<name>=<value>")
            trait_equals[name] = value
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            found = profiles.search(
                conn,
                principal.workspace_id,
                email=email,
                trait_equals=trait_equals,
                after_id=cursor,
                limit=limit + 1,
            )
        page = found[:limit]
        return {
            "data": [profile_json(p) for p in page],
            "next_cursor": page[-1].id if len(found) > limit else None,
        }

    return JSONBody(await run_in_threadpool(run))


@router.get("/{profile_id}")
async def get_profile(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return _full(conn, principal, profiles.get_profile(conn, principal.workspace_id, profile_id))

    return JSONBody(await run_in_threadpool(run))


@router.get("/{profile_id}/events")
async def profile_events(
    request: Request,
    principal: Admin,
    profile_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> JSONBody:
    """The person's events in time order (ties in arrival order), a page at a time."""
    after = _parse_cursor(cursor)
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            p, events = profiles.events_of(
                conn, principal.workspace_id, profile_id, after=after, limit=limit + 1
            )
        page = events[:limit]
        next_cursor = _cursor(page[-1].timestamp, page[-1].seq) if len(events) > limit else None
        return {"profile_id": p.id, "data": [event_json(e) for e in page], "next_cursor": next_cursor}

    return JSONBody(await run_in_threadpool(run))


@router.get("/{profile_id}/export")
async def export_profile(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    """Everything kept about the person, as one JSON document."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            data = profiles.export(conn, principal.workspace_id, profile_id)
        profile: Profile = data["profile"]
        return {
            "profile": profile_json(profile),
            "merges": [merge_json(m) for m in data["merges"]],
            "groups": data["groups"],
            "events": [event_json(e) for e in data["events"]],
        }

    return JSONBody(
        await run_in_threadpool(run),
        headers={"Content-Disposition": f'attachment; filename="{profile_id}.json"'},
    )


def erase_person(conn: Connection, ws: str, profile_id: str, *, secret: bytes, now: datetime) -> Erasure:
    """Erase the person and, in the same transaction, their journeys and messages, scores
    and stage, memberships, timers and segment history."""
    done = profiles.erase(conn, ws, profile_id, secret=secret, now=now)
    journeys.forget(conn, ws, list(done.profile_ids))
    scoring.forget(conn, ws, list(done.profile_ids))
    segments.forget(conn, ws, list(done.profile_ids))
    return done


@router.delete("/{profile_id}")
async def erase_profile(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    """Erase the person: profile, events and traits. Keeps only keyed hashes of the
    identities, so that events for the same person arriving later are dropped."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            done = erase_person(conn, principal.workspace_id, profile_id, secret=c.secret, now=c.clock.now())
        return {
            "erased": True,
            "profile_id": done.profile_id,
            "profiles_deleted": done.profiles_deleted,
            "events_deleted": done.events_deleted,
        }

    return JSONBody(await run_in_threadpool(run))
