"""Normalising the traits that matter for reaching a person. Pure.

* ``email``: trimmed, lower-cased, syntax-checked (no DNS look-up). An invalid address
  stays in the traits as sent but is not used as the profile's email.
* ``phone``: E.164 when ``phonenumbers`` can parse it (with the region of
  ``address.country`` or ``country`` when the number has no ``+``); otherwise kept as sent.
* ``timezone``: an IANA name from the traits or ``context.timezone``; unknown names ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from email_validator import EmailNotValidError, validate_email


@dataclass(frozen=True, slots=True)
class Reachability:
    email: str | None
    phone: str | None
    timezone: str | None


def normalise_email(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > 320:
        return None
    try:
        info = validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        return None
    return info.normalized.lower()


def normalise_phone(value: Any, region: str | None) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        return None
    try:
        parsed = phonenumbers.parse(value, region.upper() if region else None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def normalise_timezone(value: Any) -> str | None:
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    if value.startswith(("/", ".")) or ".." in value:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return value


def _region(traits: dict[str, Any]) -> str | None:
    address = traits.get("address")
    candidates = [address.get("country") if isinstance(address, dict) else None, traits.get("country")]
    for c in candidates:
        if isinstance(c, str) and len(c) == 2 and c.isalpha():
            return c
    return None


def normalise_traits(traits: dict[str, Any]) -> dict[str, Any]:
    """Return traits with ``email`` and ``phone`` rewritten where they parse."""
    out = dict(traits)
    email = normalise_email(traits.get("email"))
    if email is not None:
        out["email"] = email
    phone = normalise_phone(traits.get("phone"), _region(traits))
    if phone is not None:
        out["phone"] = phone
    return out


def reachability(traits: dict[str, Any], context_timezone: Any = None) -> Reachability:
    return Reachability(
        email=normalise_email(traits.get("email")),
        phone=normalise_phone(traits.get("phone"), _region(traits)),
        timezone=normalise_timezone(traits.get("timezone")) or normalise_timezone(context_timezone),
    )
