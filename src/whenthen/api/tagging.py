"""Admin API for tag rules: add or remove a tag when a person does something."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from whenthen import tagging
from whenthen.api.auth import admin, container
from whenthen.api.bodies import read_json
from whenthen.api.responses import JSONBody
from whenthen.kernel.errors import DomainError
from whenthen.workspaces import Principal

router = APIRouter(prefix="/api/v1", tags=["tag rules"])
Admin = Annotated[Principal, Depends(admin)]


def _doc(rule: tagging.TagRule) -> dict[str, Any]:
    return rule.model_dump(mode="json", exclude_none=True)


@router.get("/tag-rules")
async def list_rules(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return {"data": [_doc(r) for r in tagging.rules(conn, principal.workspace_id)]}

    return JSONBody(await run_in_threadpool(run))


@router.put("/tag-rules/{key}")
async def save_rule(request: Request, principal: Admin, key: str) -> JSONBody:
    """Create or replace a rule. It applies to events processed from now on."""
    c = container(request)
    data = await read_json(request)
    if not isinstance(data, dict) or data.get("key", key) != key:
        raise DomainError("invalid_definition", "the body must be a rule whose key matches the URL")
    data = {**data, "key": key}

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            return _doc(tagging.save_rule(conn, principal.workspace_id, data, now=c.clock.now()))

    return JSONBody(await run_in_threadpool(run))


@router.get("/tag-rules/{key}")
async def get_rule(request: Request, principal: Admin, key: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return _doc(tagging.get_rule(conn, principal.workspace_id, key))

    return JSONBody(await run_in_threadpool(run))


@router.delete("/tag-rules/{key}")
async def delete_rule(request: Request, principal: Admin, key: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            tagging.delete_rule(conn, principal.workspace_id, key)
        return {"deleted": True}

    return JSONBody(await run_in_threadpool(run))
