"""Turning request bytes into JSON values, with limits. Pure."""

from __future__ import annotations

import json
import zlib
from typing import Any

import orjson

from whenthen.tracking.validation import Invalid, NotRepresentable


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip``/``deflate``; never inflate past ``limit`` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate", "x-gzip"):
        raise Invalid("unsupported_encoding", f"Content-Encoding {enc!r} is not supported", 415)
    wbits = 16 + zlib.MAX_WBITS if enc in ("gzip", "x-gzip") else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise Invalid("invalid_encoding", f"the body is not valid {enc} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Invalid("payload_too_large", f"the decoded body is larger than {limit} bytes", 413)
    return out


def loads(body: bytes) -> tuple[Any, bool]:
    """Parse with orjson, falling back to the exact parser where orjson refuses.

    Returns the value and whether its numbers are exact (see ``check_value``).
    """
    try:
        return orjson.loads(body), False
    except orjson.JSONDecodeError as exc:
        return loads_exact(body, fast_error=str(exc)), True


def loads_exact(body: bytes, fast_error: str | None = None) -> Any:
    """The standard library parser: slower, but it keeps big integers exact and lets
    ``NaN``, ``Infinity`` and lone surrogates through as values, so that the per-call
    checks can refuse just the call that holds them and keep the rest of a batch."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("invalid_json", "the body is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=NotRepresentable)
    except RecursionError:
        raise Invalid("nesting_too_deep", "the body nests too deeply") from None
    except ValueError as exc:
        detail = fast_error or str(exc)
        raise Invalid("invalid_json", f"the body is not valid JSON: {detail}") from None
