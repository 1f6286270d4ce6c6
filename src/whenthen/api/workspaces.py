"""Admin API for the key's own workspace and its keys."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from whenthen import workspaces
from whenthen.api.auth import admin, container
from whenthen.api.responses import JSONBody
from whenthen.workspaces import ApiKey, KeyKind, Principal

router = APIRouter(prefix="/api/v1", tags=["workspace"])
Admin = Annotated[Principal, Depends(admin)]


class CreateKey(BaseModel):
    kind: KeyKind
    name: str = Field(default="", max_length=200)


def key_json(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "kind": k.kind.value,
        "name": k.name,
        "prefix": k.display_prefix,
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
        "active": k.active,
    }


@router.get("/workspace")
async def current_workspace(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            ws = workspaces.get_workspace(conn, principal.workspace_id)
        return {"id": ws.id, "name": ws.name, "created_at": ws.created_at}

    return JSONBody(await run_in_threadpool(run))


@router.get("/keys")
async def list_keys(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return {"data": [key_json(k) for k in workspaces.list_keys(conn, principal.workspace_id)]}

    return JSONBody(await run_in_threadpool(run))


@router.post("/keys", status_code=201)
async def create_key(request: Request, principal: Admin, body: CreateKey) -> JSONBody:
    """Issue a key; its plaintext is in this response only."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            issued = workspaces.issue_key(
                conn, principal.workspace_id, body.kind, name=body.name, now=c.clock.now()
            )
        return {**key_json(issued.key), "key": issued.plaintext}

    return JSONBody(await run_in_threadpool(run), status_code=201)


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, principal: Admin, key_id: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            return key_json(workspaces.revoke(conn, principal.workspace_id, key_id, now=c.clock.now()))

    return JSONBody(await run_in_threadpool(run))
