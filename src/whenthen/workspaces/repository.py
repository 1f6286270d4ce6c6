from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, insert, select, update

from whenthen.kernel.ids import KeyId, WorkspaceId
from whenthen.storage.driver import first_row
from whenthen.workspaces.model import ApiKey, KeyKind, Workspace
from whenthen.workspaces.tables import api_keys, workspaces


def _workspace(row: Any) -> Workspace:
    return Workspace(id=WorkspaceId(row.id), name=row.name, created_at=row.created_at)


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=KeyId(row.id),
        workspace_id=WorkspaceId(row.workspace_id),
        kind=KeyKind(row.kind),
        name=row.name,
        display_prefix=row.display_prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def insert_workspace(conn: Connection, ws: Workspace) -> None:
    conn.execute(insert(workspaces).values(id=ws.id, name=ws.name, created_at=ws.created_at))


def get_workspace(conn: Connection, workspace_id: str) -> Workspace | None:
    row = conn.execute(select(workspaces).where(workspaces.c.id == workspace_id)).first()
    return _workspace(row) if row else None


def list_workspaces(conn: Connection) -> list[Workspace]:
    rows = conn.execute(select(workspaces).order_by(workspaces.c.created_at, workspaces.c.id))
    return [_workspace(r) for r in rows]


def insert_key(conn: Connection, key: ApiKey, key_hash: str) -> None:
    conn.execute(
        insert(api_keys).values(
            id=key.id,
            workspace_id=key.workspace_id,
            kind=key.kind.value,
            name=key.name,
            key_hash=key_hash,
            display_prefix=key.display_prefix,
            created_at=key.created_at,
            revoked_at=None,
        )
    )


class KeyCheck(NamedTuple):
    """What checking a presented key needs to know about the key it hashes to."""

    id: str
    workspace_id: str
    kind: str
    key_hash: str
    active: bool


#: At the driver's level: a key is checked on every tracking request, and SQLAlchemy's
#: execution of this one-row look-up cost about 0.3 ms of CPU (docs/benchmarks.md, "Ingest").
_KEY_BY_HASH = (
    "SELECT id, workspace_id, kind, key_hash, CASE WHEN revoked_at IS NULL THEN 1 ELSE 0 END"
    " FROM api_keys WHERE key_hash = %s"
)


def find_key_by_hash(conn: Connection, key_hash: str) -> KeyCheck | None:
    row = first_row(conn, _KEY_BY_HASH, (key_hash,))
    if row is None:
        return None
    return KeyCheck(row[0], row[1], row[2], row[3], bool(row[4]))


def list_keys(conn: Connection, workspace_id: WorkspaceId) -> list[ApiKey]:
    rows = conn.execute(
        select(api_keys)
        .where(api_keys.c.workspace_id == workspace_id)
        .order_by(api_keys.c.created_at, api_keys.c.id)
    )
    return [_key(r) for r in rows]


def revoke_key(conn: Connection, workspace_id: WorkspaceId, key_id: str, now: datetime) -> bool:
    result = conn.execute(
        update(api_keys)
        .where(
            api_keys.c.id == key_id,
            api_keys.c.workspace_id == workspace_id,
            api_keys.c.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )
    return result.rowcount > 0


def get_key(conn: Connection, workspace_id: WorkspaceId, key_id: str) -> ApiKey | None:
    row = conn.execute(
        select(api_keys).where(api_keys.c.id == key_id, api_keys.c.workspace_id == workspace_id)
    ).first()
    return _key(row) if row else None
