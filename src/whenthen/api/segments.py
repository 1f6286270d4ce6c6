"""Admin API for segments: definitions, previews, members, exports and a profile's memberships."""

from __future__ import annotations

import re
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from whenthen import profiles
from whenthen.api.auth import admin, container
from whenthen.api.bodies import read_json
from whenthen.api.responses import JSONBody
from whenthen.kernel.errors import DomainError
from whenthen.pipeline.service import announce, emit
from whenthen.segments import service as segments
from whenthen.workspaces import Principal

router = APIRouter(prefix="/api/v1", tags=["segments"])
Admin = Annotated[Principal, Depends(admin)]

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise DomainError(
            "invalid_key", "a segment key is 1 to 80 letters, digits, '_', '-' or '.', starting alnum"
        )


@router.get("/segments")
async def list_segments(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return {"data": [s.info() for s in segments.all_segments(conn, principal.workspace_id)]}

    return JSONBody(await run_in_threadpool(run))


@router.put("/segments/{key}")
async def save_segment(request: Request, principal: Admin, key: str) -> JSONBody:
    """Create or replace a segment; its membership is recomputed for everyone now, and
    entries and exits are announced as ``Segment Entered`` / ``Segment Exited`` events."""
    _check_key(key)
    c = container(request)
    data = await read_json(request)
    if not isinstance(data, dict) or "definition" not in data:
        raise DomainError("invalid_definition", "the body must be {name, definition}")
    name = data.get("name", key)
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        raise DomainError("invalid_definition", "name must be a string of 1 to 200 characters")
    extra = set(data) - {"name", "definition", "key"}
    if extra or data.get("key", key) != key:
        raise DomainError("invalid_definition", "the body must be {name, definition} with the URL's key")

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            seg, counts = segments.save_segment(
                conn,
                principal.workspace_id,
                key,
                name,
                data["definition"],
                c.clock.now(),
                emit=partial(emit, partitions=c.settings.pipeline.partitions),
                announce=partial(announce, partitions=c.settings.pipeline.partitions),
            )
            return {**seg.info(), **counts}

    return JSONBody(await run_in_threadpool(run))


@router.post("/segments/preview")
async def preview(request: Request, principal: Admin) -> JSONBody:
    """How many profiles a definition selects now, with a sample; nothing is saved. The
    body is ``{definition}`` (or the definition itself)."""
    c = container(request)
    data = await read_json(request)
    if isinstance(data, dict) and "definition" in data and "condition" not in data:
        data = data["definition"]

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return segments.preview(conn, principal.workspace_id, data, c.clock.now())

    return JSONBody(await run_in_threadpool(run))


@router.get("/segments/{key}")
async def get_segment(request: Request, principal: Admin, key: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return segments.get_segment(conn, principal.workspace_id, key).info()

    return JSONBody(await run_in_threadpool(run))


@router.get("/segments/{key}/members")
async def members(
    request: Request,
    principal: Admin,
    key: str,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            page, nxt = segments.members(conn, principal.workspace_id, key, after=cursor or None, limit=limit)
            return {"data": page, "next_cursor": nxt}

    return JSONBody(await run_in_threadpool(run))


@router.get("/segments/{key}/export.csv")
async def export_csv(request: Request, principal: Admin, key: str) -> Response:
    c = container(request)

    def run() -> str:
        with c.db.read() as conn:
            return segments.export_csv(conn, principal.workspace_id, key)

    text = await run_in_threadpool(run)
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="segment-{key}.csv"'},
    )


@router.delete("/segments/{key}")
async def delete_segment(request: Request, principal: Admin, key: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            segments.delete_segment(conn, principal.workspace_id, key)
        return {"deleted": True}

    return JSONBody(await run_in_threadpool(run))


@router.get("/profiles/{profile_id}/segments")
async def profile_segments(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    """The segments the person is in now, and every entry and exit."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            return {"profile_id": pid, **segments.history_of(conn, principal.workspace_id, pid)}

    return JSONBody(await run_in_threadpool(run))
