"""Profiles: identity resolution, traits, merges, erasure."""

from whenthen.profiles.model import Identity, IdentityKind, Merge, Profile
from whenthen.profiles.service import (
    Applied,
    Erasure,
    apply_event,
    erase,
    events_of,
    export,
    get_profile,
    groups_of,
    lookup,
    merges_of,
    search,
)

__all__ = [
    "Applied",
    "Erasure",
    "Identity",
    "IdentityKind",
    "Merge",
    "Profile",
    "apply_event",
    "erase",
    "events_of",
    "export",
    "get_profile",
    "groups_of",
    "lookup",
    "merges_of",
    "search",
]
