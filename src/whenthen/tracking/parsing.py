"""Turning request bytes into JSON values, with limits. Pure."""

from __future__ import annotations

import json
import zlib
from typing import Any

import orjson

from whenthen.tracking.validation import Invalid, NotRepresentable

BOM = b"\xef\xbb\xbf"
#: Longest integer literal that may fit in 64 bits: "-9223372036854775808".
_MAX_INT_LITERAL = 20


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip``/``deflate``; never inflate past ``limit`` bytes.

    Concatenated gzip members are all read (RFC 1952); a truncated stream, or bytes
    after a deflate stream, are refused rather than silently cut.
    """
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate", "x-gzip"):
        raise Invalid("unsupported_encoding", f"Content-Encoding {enc!r} is not supported", 415)
    wbits = 16 + zlib.MAX_WBITS if enc in ("gzip", "x-gzip") else zlib.MAX_WBITS
    out = bytearray()
    data = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            # max_length is at least 1 here: a max_length of 0 would mean "no limit".
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error:
            raise Invalid("invalid_encoding", f"the body is not valid {enc} data") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise Invalid("payload_too_large", f"the decoded body is larger than {limit} bytes", 413)
        if not inflater.eof:
            raise Invalid("invalid_encoding", f"the {enc} data is truncated")
        data = inflater.unused_data
        if not data:
            return bytes(out)
        if wbits == zlib.MAX_WBITS:
            raise Invalid("invalid_encoding", f"the body has bytes after the end of the {enc} data")


def loads(body: bytes) -> tuple[Any, bool]:
    """Parse with orjson, falling back to the exact parser where orjson refuses.

    Returns the value and whether its numbers are exact (see ``check_value``). A leading
    UTF-8 byte order mark is ignored.
    """
    body = body.removeprefix(BOM)
    try:
        return orjson.loads(body), False
    except orjson.JSONDecodeError as exc:
        return loads_exact(body, fast_error=str(exc)), True


def _parse_int(text: str) -> int | NotRepresentable:
    # Longer literals cannot fit in 64 bits (JSON has no leading zeros), and converting
    # thousands of digits is slow enough that Python refuses it (int_max_str_digits).
    if len(text) > _MAX_INT_LITERAL:
        return NotRepresentable(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def loads_exact(body: bytes, fast_error: str | None = None) -> Any:
    """The standard library parser: slower, but it keeps big integers exact and lets
    ``NaN``, ``Infinity`` and lone surrogates through as values, so that the per-call
    checks can refuse just the call that holds them and keep the rest of a batch."""
    try:
        text = body.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("invalid_json", "the body is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=NotRepresentable, parse_int=_parse_int)
    except RecursionError:
        raise Invalid("nesting_too_deep", "the body nests too deeply") from None
    except ValueError as exc:
        detail = fast_error or str(exc)
        raise Invalid("invalid_json", f"the body is not valid JSON: {detail}") from None
