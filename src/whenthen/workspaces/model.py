"""Workspaces and their API keys."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from whenthen.kernel.ids import KeyId, WorkspaceId


class KeyKind(enum.StrEnum):
    #: Ingestion only: may post to the tracking API, read nothing.
    WRITE = "write"
    #: Full access to one workspace's admin API.
    ADMIN = "admin"


KEY_PREFIX = {KeyKind.WRITE: "wk_", KeyKind.ADMIN: "ak_"}


@dataclass(frozen=True, slots=True)
class Workspace:
    id: WorkspaceId
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: KeyId
    workspace_id: WorkspaceId
    kind: KeyKind
    name: str
    display_prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key as created: the only moment its plaintext exists."""

    key: ApiKey
    plaintext: str


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: one workspace, with one kind of key."""

    workspace_id: WorkspaceId
    key_id: KeyId
    kind: KeyKind
