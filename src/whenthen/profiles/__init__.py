"""Profiles: identity resolution, traits, merges, erasure."""

from whenthen.profiles.consent import (
    add_tags,
    consent_status,
    consents_of,
    remove_tags,
    set_consent,
    tags_of,
    update_traits,
)
from whenthen.profiles.model import Identity, IdentityKind, Merge, Profile
from whenthen.profiles.rechecks import Recheck
from whenthen.profiles.rechecks import mark as mark_for_recheck
from whenthen.profiles.service import (
    Applied,
    Erasure,
    apply_event,
    emit_event,
    erase,
    events_of,
    export,
    find,
    get_profile,
    groups_of,
    has_erasures,
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
    "Recheck",
    "add_tags",
    "apply_event",
    "consent_status",
    "consents_of",
    "emit_event",
    "erase",
    "events_of",
    "export",
    "find",
    "get_profile",
    "groups_of",
    "has_erasures",
    "lookup",
    "mark_for_recheck",
    "merges_of",
    "remove_tags",
    "search",
    "set_consent",
    "tags_of",
    "update_traits",
]
