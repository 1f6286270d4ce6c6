"""Domain errors that edges turn into responses with a status, a code and a message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError


@dataclass
class DomainError(Exception):
    """An error a caller can act on. ``status`` is the HTTP status an edge should use."""

    code: str
    message: str
    status: int = 400
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NotFound(DomainError):
    def __init__(self, what: str) -> None:
        super().__init__(code="not_found", message=f"{what} not found", status=404)


class Unauthorized(DomainError):
    def __init__(self, message: str = "missing or invalid key") -> None:
        super().__init__(code="unauthorized", message=message, status=401)


def invalid_definition(exc: ValidationError) -> DomainError:
    """A definition (scoring model, lifecycle, tag rule) that pydantic refused, as a 400
    listing each problem as ``{field, reason}``."""
    problems = [
        {"field": ".".join(str(p) for p in e["loc"]), "reason": str(e["msg"]).removeprefix("Value error, ")}
        for e in exc.errors()
    ]
    return DomainError("invalid_definition", "the definition is not valid", details={"problems": problems})
