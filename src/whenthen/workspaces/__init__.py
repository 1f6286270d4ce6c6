"""Workspaces and API keys: the tenancy boundary of every query."""

from whenthen.workspaces.model import ApiKey, IssuedKey, KeyKind, Principal, Workspace
from whenthen.workspaces.service import (
    authenticate,
    create_workspace,
    get_workspace,
    issue_key,
    list_keys,
    list_workspaces,
    revoke,
)

__all__ = [
    "ApiKey",
    "IssuedKey",
    "KeyKind",
    "Principal",
    "Workspace",
    "authenticate",
    "create_workspace",
    "get_workspace",
    "issue_key",
    "list_keys",
    "list_workspaces",
    "revoke",
]
