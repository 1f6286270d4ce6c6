"""Reading JSON request bodies for the admin API, with a size limit and a clear error."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from whenthen.kernel.errors import DomainError


async def read_json(request: Request, *, limit: int = 1_000_000) -> Any:
    body = await request.body()
    if len(body) > limit:
        raise DomainError(
            "payload_too_large", f"a definition may be at most {limit // 1_000_000} MB", status=413
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DomainError("invalid_json", f"the body is not valid JSON: {exc}") from None
