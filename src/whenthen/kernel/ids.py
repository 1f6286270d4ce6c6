"""Typed identifiers and their generation.

Ids are random, URL-safe and prefixed by kind (``ws_``, ``prf_``, ``key_``) so a
stray id in a log says what it is.
"""

from __future__ import annotations

import secrets
from typing import NewType

WorkspaceId = NewType("WorkspaceId", str)
ProfileId = NewType("ProfileId", str)
KeyId = NewType("KeyId", str)


def _token(nbytes: int = 12) -> str:
    return secrets.token_hex(nbytes)


def new_workspace_id() -> WorkspaceId:
    return WorkspaceId(f"ws_{_token()}")


def new_profile_id() -> ProfileId:
    return ProfileId(f"prf_{_token()}")


def new_key_id() -> KeyId:
    return KeyId(f"key_{_token(8)}")


def new_secret(nbytes: int = 24) -> str:
    """An unguessable secret for API keys."""
    return secrets.token_urlsafe(nbytes)
