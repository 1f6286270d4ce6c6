"""Admin API for scoring models, scores, lifecycle stages and the stage funnel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from whenthen import profiles, scoring
from whenthen.api.auth import admin, container
from whenthen.api.bodies import read_json
from whenthen.api.responses import JSONBody
from whenthen.kernel.errors import DomainError
from whenthen.workspaces import Principal

router = APIRouter(prefix="/api/v1", tags=["scoring"])
Admin = Annotated[Principal, Depends(admin)]


@router.get("/scoring/models")
async def list_models(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return {"data": [m.model_dump(mode="json") for m in scoring.models(conn, principal.workspace_id)]}

    return JSONBody(await run_in_threadpool(run))


@router.put("/scoring/models/{key}")
async def save_model(request: Request, principal: Admin, key: str) -> JSONBody:
    """Create or replace a model. Existing scores are kept and read with the new rules."""
    c = container(request)
    data = await read_json(request)
    if not isinstance(data, dict) or data.get("key", key) != key:
        raise DomainError("invalid_definition", "the body must be a model whose key matches the URL")
    data = {**data, "key": key}

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            return scoring.save_model(conn, principal.workspace_id, data, now=c.clock.now()).model_dump(
                mode="json"
            )

    return JSONBody(await run_in_threadpool(run))


@router.delete("/scoring/models/{key}")
async def delete_model(request: Request, principal: Admin, key: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            scoring.delete_model(conn, principal.workspace_id, key)
        return {"deleted": True}

    return JSONBody(await run_in_threadpool(run))


@router.get("/profiles/{profile_id}/scores")
async def profile_scores(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    """Every model's score for the person, with decay applied as of now."""
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            return {"scores": scoring.scores_of(conn, principal.workspace_id, pid, c.clock.now())}

    return JSONBody(await run_in_threadpool(run))


@router.get("/lifecycle")
async def get_lifecycle(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any] | None:
        with c.db.read() as conn:
            lc = scoring.lifecycle_of(conn, principal.workspace_id)
        return lc.model_dump(mode="json") if lc else None

    return JSONBody(await run_in_threadpool(run))


@router.put("/lifecycle")
async def put_lifecycle(request: Request, principal: Admin) -> JSONBody:
    c = container(request)
    data = await read_json(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            return scoring.save_lifecycle(conn, principal.workspace_id, data, now=c.clock.now()).model_dump(
                mode="json"
            )

    return JSONBody(await run_in_threadpool(run))


@router.get("/lifecycle/funnel")
async def funnel(request: Request, principal: Admin) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            return scoring.funnel(conn, principal.workspace_id)

    return JSONBody(await run_in_threadpool(run))


class StageBody(BaseModel):
    stage: str = Field(min_length=1, max_length=64)


@router.get("/profiles/{profile_id}/stage")
async def get_stage(request: Request, principal: Admin, profile_id: str) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.read() as conn:
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            return {
                "stage": scoring.stage_of(conn, principal.workspace_id, pid),
                "history": scoring.stage_history_of(conn, principal.workspace_id, pid),
            }

    return JSONBody(await run_in_threadpool(run))


@router.post("/profiles/{profile_id}/stage")
async def set_stage(request: Request, principal: Admin, profile_id: str, body: StageBody) -> JSONBody:
    c = container(request)

    def run() -> dict[str, Any]:
        with c.db.write() as conn:
            pid = profiles.get_profile(conn, principal.workspace_id, profile_id).id
            lc = scoring.lifecycle_of(conn, principal.workspace_id)
            if lc is not None and body.stage not in lc.stages:
                raise DomainError("unknown_stage", f"{body.stage!r} is not a stage of the lifecycle")
            now = c.clock.now()
            changed = scoring.move_stage(
                conn,
                principal.workspace_id,
                pid,
                body.stage,
                source="api",
                now=now,
                partitions=c.settings.pipeline.partitions,
            )
            if changed:
                # Segments reading the stage follow (the worker's recheck step).
                profiles.mark_for_recheck(conn, principal.workspace_id, [pid], "stage", now)
        c.worker.notify()
        return {"stage": body.stage, "changed": changed}

    return JSONBody(await run_in_threadpool(run))
