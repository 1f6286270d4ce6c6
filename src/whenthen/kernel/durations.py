"""Durations as marketers write them: ``"30m"``, ``"2d"``, ``"1w"`` or ISO 8601 (``"PT1H"``, ``"P2D"``)."""

from __future__ import annotations

import re
from datetime import timedelta

_SHORT = re.compile(r"^\s*(-?\d+)\s*(s|m|h|d|w)\s*$")
_ISO = re.compile(
    r"^(?P<sign>-)?P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)S)?)?$"
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX = timedelta(days=3660)


def parse_duration(text: str) -> timedelta:
    """Parse a duration; raises ``ValueError`` with a readable reason."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a duration is a string such as '30m', '2d' or 'PT1H'")
    short = _SHORT.match(text)
    if short:
        value = timedelta(seconds=int(short.group(1)) * _UNITS[short.group(2)])
    else:
        iso = _ISO.match(text.strip().upper())
        if not iso or text.strip().upper() in ("P", "-P", "PT", "-PT"):
            raise ValueError(f"{text!r} is not a duration (use '30m', '2d', '1w' or ISO 8601 like 'PT1H')")
        parts = {k: int(v) for k, v in iso.groupdict().items() if v and k != "sign"}
        value = timedelta(
            weeks=parts.get("w", 0),
            days=parts.get("d", 0),
            hours=parts.get("h", 0),
            minutes=parts.get("m", 0),
            seconds=parts.get("s", 0),
        )
        if iso.group("sign"):
            value = -value
    if abs(value) > MAX:
        raise ValueError(f"{text!r} is longer than ten years")
    return value
