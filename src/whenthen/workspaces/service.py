"""Creating workspaces, issuing, checking and revoking keys. Never commits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection

from whenthen.kernel.errors import DomainError, NotFound, Unauthorized
from whenthen.kernel.ids import KeyId, WorkspaceId, new_key_id, new_secret, new_workspace_id
from whenthen.kernel.keyed_hash import constant_time_equal, sha256_hex
from whenthen.workspaces import repository
from whenthen.workspaces.model import KEY_PREFIX, ApiKey, IssuedKey, KeyKind, Principal, Workspace


def create_workspace(conn: Connection, name: str, *, now: datetime) -> Workspace:
    name = name.strip()
    if not name or len(name) > 200:
        raise DomainError("invalid_name", "a workspace name is 1 to 200 characters")
    ws = Workspace(id=new_workspace_id(), name=name, created_at=now)
    repository.insert_workspace(conn, ws)
    return ws


def issue_key(
    conn: Connection, workspace_id: WorkspaceId, kind: KeyKind, *, name: str, now: datetime
) -> IssuedKey:
    if repository.get_workspace(conn, workspace_id) is None:
        raise NotFound("workspace")
    plaintext = KEY_PREFIX[kind] + new_secret()
    key = ApiKey(
        id=new_key_id(),
        workspace_id=workspace_id,
        kind=kind,
        name=name or kind.value,
        display_prefix=plaintext[:10],
        created_at=now,
        revoked_at=None,
    )
    repository.insert_key(conn, key, sha256_hex(plaintext))
    return IssuedKey(key=key, plaintext=plaintext)


def authenticate(conn: Connection, plaintext: str, kind: KeyKind) -> Principal:
    """Resolve a presented key to its workspace, or raise ``Unauthorized``.

    Keys are looked up by their SHA-256 and the stored digest is compared in constant time.
    A write key never passes as an admin key, nor the other way round.
    """
    if not plaintext or len(plaintext) > 200:
        raise Unauthorized()
    digest = sha256_hex(plaintext)
    key = repository.find_key_by_hash(conn, digest)
    if key is None:
        raise Unauthorized()
    if not constant_time_equal(key.key_hash, digest) or not key.active:
        raise Unauthorized("missing, invalid or revoked key")
    if key.kind != kind.value:
        raise Unauthorized(f"a {kind.value} key is required")
    return Principal(workspace_id=WorkspaceId(key.workspace_id), key_id=KeyId(key.id), kind=kind)


def revoke(conn: Connection, workspace_id: WorkspaceId, key_id: str, *, now: datetime) -> ApiKey:
    key = repository.get_key(conn, workspace_id, key_id)
    if key is None:
        raise NotFound("key")
    repository.revoke_key(conn, workspace_id, key_id, now)
    revoked = repository.get_key(conn, workspace_id, key_id)
    assert revoked is not None
    return revoked


def list_keys(conn: Connection, workspace_id: WorkspaceId) -> list[ApiKey]:
    return repository.list_keys(conn, workspace_id)


def list_workspaces(conn: Connection) -> list[Workspace]:
    return repository.list_workspaces(conn)


def get_workspace(conn: Connection, workspace_id: str) -> Workspace:
    ws = repository.get_workspace(conn, workspace_id)
    if ws is None:
        raise NotFound("workspace")
    return ws
