"""The ASGI application: tracking API, admin API, health, OpenAPI at /openapi.json."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from whenthen import __version__
from whenthen.api import (
    audience,
    errors,
    journeys,
    links,
    profiles,
    scoring,
    segments,
    tagging,
    tracking,
    workspaces,
)
from whenthen.api.responses import JSONBody
from whenthen.bootstrap import Container


def create_app(c: Container, *, run_worker: bool | None = None, owns_container: bool = False) -> FastAPI:
    """Build the app. With ``run_worker`` (default: the settings' ``embedded_worker``) the
    pipeline worker runs in a thread of this process for the app's lifetime."""
    embedded = c.settings.server.embedded_worker if run_worker is None else run_worker

    single_calls = tracking.make_writer(c)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if embedded:
            c.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(single_calls.stop)
            if embedded:
                await run_in_threadpool(c.worker.stop)
            if owns_container:
                # Its wake-up sockets, checkpoint thread and connections: the server
                # process ends by the signal that stopped it, with no other chance.
                await run_in_threadpool(c.close)

    app = FastAPI(
        title="whenthen",
        version=__version__,
        description="Behavior-triggered marketing automation. Segment-compatible tracking API "
        "under /v1, admin API under /api/v1 (Bearer admin key).",
        lifespan=lifespan,
        default_response_class=JSONBody,
    )
    app.state.container = c
    app.state.tracking_writer = single_calls
    # Added before CORS, which so wraps it: tracking POSTs skip the routing, not CORS.
    app.add_middleware(tracking.FastPath)
    # Browsers post tracking calls from other origins (analytics.js); the tracking API is
    # authenticated by write key, not by cookies, so any origin may call it.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["POST", "GET", "DELETE", "OPTIONS"],
        allow_headers=["*"],
        max_age=86400,
    )
    errors.install(app)
    app.include_router(tracking.router)
    app.include_router(profiles.router)
    app.include_router(workspaces.router)
    app.include_router(journeys.router)
    app.include_router(links.router)
    app.include_router(audience.router)
    app.include_router(scoring.router)
    app.include_router(segments.router)
    app.include_router(tagging.router)

    @app.get("/health", tags=["ops"])
    async def health() -> JSONBody:
        return JSONBody({"status": "ok", "version": __version__})

    return app


def create_app_from_environment() -> FastAPI:
    """The app factory for several API processes (``whenthen serve --workers N``): each
    process builds its own container from the ``WHENTHEN_*`` settings (the parent has
    migrated the database already)."""
    from whenthen.bootstrap import build
    from whenthen.settings import load_settings

    return create_app(build(load_settings(), migrate=False), owns_container=True)
