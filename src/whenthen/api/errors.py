"""One error shape for every endpoint: ``{"error": {"code", "message", ...}}``, never a bare 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from whenthen.api.responses import JSONBody
from whenthen.kernel.errors import DomainError

log = logging.getLogger("whenthen.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """``error`` holds the details; ``code`` and ``message`` are repeated at the top level
    because Segment's libraries read them there when they report a failure."""
    return {
        "success": False,
        "code": code,
        "message": message,
        "error": {"code": code, "message": message, **extra},
    }


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONBody:
    return JSONBody(error_body(code, message, **extra), status_code=status, headers=headers)


def domain_error_response(request: Request, exc: DomainError) -> JSONBody:
    headers = None
    if exc.status == 401:
        # The tracking API takes the write key as a Basic user name; the admin API a Bearer token.
        tracking = request.url.path.startswith("/v1/")
        headers = {"WWW-Authenticate": 'Basic realm="whenthen"' if tracking else "Bearer"}
    return error_response(exc.status, exc.code, exc.message, headers, **exc.details)


def unexpected_error_response(exc: BaseException) -> JSONBody:
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONBody:
        return domain_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONBody:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "reason": e.get("msg", "")}
            for e in exc.errors()
        ]
        return error_response(400, "validation_error", "the request is not valid", problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONBody:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONBody:
        return unexpected_error_response(exc)
