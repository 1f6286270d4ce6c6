"""Admin API for static lists (members, CSV imports) and tags."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from whenthen import lists, profiles
from whenthen.api.auth import admin, container
from whenthen.api.responses import JSONBody
from whenthen.imports import csvfile
from whenthen.imports import service as imports
from whenthen.kernel.errors import DomainError, NotFound
from whenthen.workspaces import Principal

router = APIRouter(prefix="/api/v1", tags=["audience"])
Admin = Annotated[Principal, Depends(admin)]
KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,79}$")
MAX_IMPORT_BYTES = 20 * 1024 * 1024


def _key(key: str) -> str:
    if not KEY.match(key):
        raise DomainError("invalid_key", "a list key is lower-case letters, digits, - and _, at most 80")
    return key


class NewList(BaseModel):
    key: str = Field(max_length=80)
    name: str = Field(default="", max_length=200)


class People(BaseModel):
    """Existing people, by any of their ids."""

    user_ids: list[str] = Field(default_factory=list, max_length=1000)
    emails: list[str] = Field(default_factory=list, max_length=1000)
    profile_ids: list[str] = Field(default_factory=list, max_length=1000)


class Tags(BaseModel):
    tags: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=1, max_length=100)


def _resolve(conn: Any, ws: str, people: People) -> tuple[list[str], list[dict[str, str]]]:
    found: list[str] = []
    missing: list[dict[str, str]] = []
    for kind, values in (
        ("user_id", people.user_ids),
        ("email", people.emails),
        ("profile_id", people.profile_ids),
    ):
        for value in values:
            pid = profiles.find(conn, ws, kind, value)
            if pid is None:
                missing.append({kind: value})
            else:
                found.append(pid)
    return list(dict.fromkeys(found)), missing


@router.get("/lists")
async def all_lists(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return {"data": lists.all_lists(conn, principal.workspace_id)}

    return JSONBody(await run_in_threadpool(run))


@router.post("/lists", status_code=201)
async def create_list(request: Request, principal: Admin, body: NewList) -> JSONBody:
    c = container(request)
    key = _key(body.key)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            lists.ensure_list(conn, principal.workspace_id, key, name=body.name or key, now=c.clock.now())
            return next(x for x in lists.all_lists(conn, principal.workspace_id) if x["key"] == key)

    return JSONBody(await run_in_threadpool(run), status_code=201)


@router.get("/lists/{key}/members")
async def list_members(
    request: Request,
    principal: Admin,
    key: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            _existing(conn, principal.workspace_id, key)
            ids = lists.members(conn, principal.workspace_id, key, after=cursor, limit=limit + 1)
        page = ids[:limit]
        return {"data": page, "next_cursor": page[-1] if len(ids) > limit else None}

    return JSONBody(await run_in_threadpool(run))


def _existing(conn: Any, ws: str, key: str) -> None:
    if not any(x["key"] == key for x in lists.all_lists(conn, ws)):
        raise NotFound("list")


@router.post("/lists/{key}/members")
async def add_members(request: Request, principal: Admin, key: str, body: People) -> JSONBody:
    """Add existing people; unknown ones are reported, not created."""
    c = container(request)
    _key(key)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            ids, missing = _resolve(conn, principal.workspace_id, body)
            now = c.clock.now()
            lists.ensure_list(conn, principal.workspace_id, key, name=None, now=now)
            added = sum(
                lists.add_member(conn, principal.workspace_id, key, pid, source="api", now=now) for pid in ids
            )
            profiles.mark_for_recheck(conn, principal.workspace_id, ids, "list", now)
        c.worker.notify()
        return {"added": added, "already_members": len(ids) - added, "not_found": missing}

    return JSONBody(await run_in_threadpool(run))


@router.delete("/lists/{key}/members/{profile_id}")
async def remove_member(request: Request, principal: Admin, key: str, profile_id: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            _existing(conn, principal.workspace_id, key)
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            removed = lists.remove_member(conn, principal.workspace_id, key, pid)
            profiles.mark_for_recheck(conn, principal.workspace_id, [pid], "list", c.clock.now())
        c.worker.notify()
        return {"removed": removed}

    return JSONBody(await run_in_threadpool(run))


@router.post("/lists/{key}/imports", status_code=202)
async def import_csv(request: Request, principal: Admin, key: str) -> JSONBody:
    """Import a CSV of existing people (columns user_id, email, anonymous_id or profile_id).
    Answers at once; follow the progress and the report of refused rows at the returned URL."""
    c = container(request)
    _key(key)
    body = await request.body()
    if len(body) > MAX_IMPORT_BYTES:
        raise DomainError("payload_too_large", "an import may be at most 20 MB", status=413)
    try:
        rows = csvfile.read(body)
    except csvfile.BadCsv as exc:
        raise DomainError("invalid_csv", str(exc)) from None

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            now = c.clock.now()
            lists.ensure_list(conn, principal.workspace_id, key, name=None, now=now)
            import_id = imports.start(conn, principal.workspace_id, key, rows, now=now)
        c.worker.notify()
        return {
            "import_id": import_id,
            "rows": len(rows),
            "status_url": f"/api/v1/lists/{key}/imports/{import_id}",
        }

    return JSONBody(await run_in_threadpool(run), status_code=202)


@router.get("/lists/{key}/imports/{import_id}")
async def import_status(request: Request, principal: Admin, key: str, import_id: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return imports.status(conn, principal.workspace_id, key, import_id)

    return JSONBody(await run_in_threadpool(run))


@router.get("/profiles/{profile_id}/tags")
async def get_tags(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            return {
                "tags": profiles.tags_of(conn, principal.workspace_id, pid),
                "lists": lists.lists_of(conn, principal.workspace_id, pid),
            }

    return JSONBody(await run_in_threadpool(run))


@router.post("/profiles/{profile_id}/tags")
async def add_tags(request: Request, principal: Admin, profile_id: str, body: Tags) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            profiles.add_tags(conn, principal.workspace_id, pid, body.tags, c.clock.now())
            profiles.mark_for_recheck(conn, principal.workspace_id, [pid], "tags", c.clock.now())
            tags = profiles.tags_of(conn, principal.workspace_id, pid)
        c.worker.notify()
        return {"tags": tags}

    return JSONBody(await run_in_threadpool(run))


@router.delete("/profiles/{profile_id}/tags/{tag}")
async def remove_tag(request: Request, principal: Admin, profile_id: str, tag: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            profiles.remove_tags(conn, principal.workspace_id, pid, [tag])
            profiles.mark_for_recheck(conn, principal.workspace_id, [pid], "tags", c.clock.now())
            tags = profiles.tags_of(conn, principal.workspace_id, pid)
        c.worker.notify()
        return {"tags": tags}

    return JSONBody(await run_in_threadpool(run))
