"""Validation and normalisation of Segment HTTP Tracking API calls. Pure: no I/O, no clock.

Decisions (see docs/design/tracking.md):

* Unknown top-level fields are kept in the stored payload, as Segment passes them on.
* A call needs ``userId`` or ``anonymousId`` (``alias`` needs ``userId`` and ``previousId``).
  Numbers are accepted as ids and turned into strings, as the SDKs do.
* Every value is walked: nesting deeper than the limit, NUL characters, lone surrogates,
  non-finite numbers and integers outside the signed 64-bit range are refused, because
  PostgreSQL cannot store some of them and downstream code cannot compare the others.
* ``timestamp`` is corrected for client clock skew as Segment does:
  ``timestamp = receivedAt - (sentAt - timestamp)`` when ``sentAt`` is known.
  A corrected timestamp more than ``max_future`` ahead of ``receivedAt``, or before
  ``min_year``, or outside what a date-time can hold, is refused.
* A call without ``messageId`` gets a deterministic one (a hash of its type and content,
  ``sentAt`` left out), so an identical retry is still deduplicated.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from whenthen.tracking.model import AcceptedEvent, CallType, Rejection

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_ID_LENGTH = 255
MAX_NAME_LENGTH = 255

OBJECT_FIELDS = ("properties", "traits", "context", "integrations")


@dataclass(frozen=True, slots=True)
class Limits:
    max_event_bytes: int = 32 * 1024
    max_nesting_depth: int = 32
    max_future: timedelta = timedelta(hours=24)
    min_year: int = 2000


class Invalid(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class NotRepresentable:
    """Marks a JSON constant (NaN, Infinity) or an out-of-range number found by the slow
    parser; ``text`` describes it for the error message."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class AmbiguousNumber(Exception):
    """orjson gave a float where the text may have held a big integer: parse again exactly."""


def check_value(value: Any, depth: int, limit: int, path: str, *, exact: bool = True) -> None:
    """Walk a JSON value; raise ``Invalid`` for anything the store cannot keep faithfully.

    With ``exact=False`` (values from orjson) an integral float past 2**63 raises
    ``AmbiguousNumber``: orjson turns integer literals past 64 bits into floats.
    """
    if depth > limit:
        raise Invalid("nesting_too_deep", f"{path} nests deeper than {limit} levels")
    if isinstance(value, str):
        _check_string(value, path)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise Invalid("number_out_of_range", f"{path} is an integer outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid("number_out_of_range", f"{path} is not a finite number")
        if not exact and abs(value) >= 2.0**63 and value.is_integer():
            raise AmbiguousNumber(path)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, f"{path} key")
            check_value(item, depth + 1, limit, f"{path}.{key}", exact=exact)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, depth + 1, limit, f"{path}[{i}]", exact=exact)
    elif isinstance(value, NotRepresentable):
        raise Invalid("number_out_of_range", f"{path} is {value.text}, which cannot be stored")
    else:  # pragma: no cover - parsers produce no other types
        raise Invalid("invalid_value", f"{path} has an unsupported type")


def value_is_clean(value: Any, depth: int, limit: int, *, exact: bool) -> bool:
    """The fast path of ``check_value``: the same checks, no path strings, no exceptions.

    Most calls are clean; only a call this refuses is walked again by ``check_value`` to
    say where the problem is. Strings parsed by orjson (``exact=False``) cannot hold lone
    surrogates (orjson refuses them), so only NUL is looked for there."""
    if depth > limit:
        return False
    kind = type(value)
    if kind is str:
        return "\x00" not in value and (not exact or _utf8_ok(value))
    if kind is dict:
        for key, item in value.items():
            if "\x00" in key or (exact and not _utf8_ok(key)):
                return False
            if not value_is_clean(item, depth + 1, limit, exact=exact):
                return False
        return True
    if kind is list:
        return all(value_is_clean(item, depth + 1, limit, exact=exact) for item in value)
    if kind is bool or value is None:
        return True
    if kind is int:
        return bool(INT64_MIN <= value <= INT64_MAX)
    if kind is float:
        return math.isfinite(value) and (exact or not (abs(value) >= 2.0**63 and value.is_integer()))
    return False


#: 2**63 as a float: orjson floats at least this large (all integral) may be integer
#: literals it could not hold exactly.
_AMBIGUOUS_FLOAT = 2.0**63


def plain_value_is_clean(value: dict[str, Any] | list[Any], depth: int, limit: int) -> bool:
    """``value_is_clean(value, depth, limit, exact=False)`` for a container parsed by
    orjson from a body that holds no ``\\u0000`` escape.

    Such strings cannot hold NUL (JSON writes it only as that escape) nor lone surrogates
    (orjson refuses them), and orjson gives no non-finite float, so only nesting and the
    size of numbers are left to check: strings, keys and other scalars are not looked at,
    and only containers cost a call. Agrees with ``value_is_clean`` on every value orjson
    can produce without NUL (``tests/unit/test_value_checks.py``)."""
    if depth >= limit:
        # Anything inside a container at the limit lies past it.
        return depth == limit and not value
    items: Any = value.values() if type(value) is dict else value
    for item in items:
        kind = type(item)
        if kind is str:
            continue
        if kind is dict or kind is list:
            if not plain_value_is_clean(item, depth + 1, limit):
                return False
        elif kind is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return False
        elif kind is float:
            if not -_AMBIGUOUS_FLOAT < item < _AMBIGUOUS_FLOAT:
                return False  # too large to be anything but integral, or not finite
        elif kind is not bool and item is not None:
            return False  # pragma: no cover - orjson produces no other types
    return True


def _plain_encoding(call: dict[str, Any], limit: int) -> bytes | None:
    """The call's JSON when it is, cheaply, seen to be clean; else None (walk it).

    For a call parsed by orjson from a body without ``\\u0000`` (see
    ``plain_value_is_clean``), read from orjson's own writing of it, which is needed for
    its size anyway:

    * nesting: a value deeper than ``limit`` lies inside more than ``limit`` containers,
      each opened by a ``{`` or ``[``; at most ``limit`` of those bytes (strings count
      too, which only errs on the safe side) means no value is too deep;
    * integers: ``OPT_STRICT_INTEGER`` refuses any beyond 53 bits, so none that passes
      lies outside 64 bits;
    * floats: orjson writes every float of 1e16 or more with an exponent, ``e+``; one of
      2**63 or more (which may have been an integer too large for orjson) cannot hide
      without one.

    A call these do not clear (an integer past 53 bits, ``e+`` in a string, many
    containers) is walked by ``plain_value_is_clean``."""
    try:
        encoded = orjson.dumps(call, option=orjson.OPT_STRICT_INTEGER)
    except orjson.JSONEncodeError:  # an integer past 53 bits, or nesting orjson cannot write
        return orjson.dumps(call) if plain_value_is_clean(call, 0, limit) else None
    if encoded.count(b"{") + encoded.count(b"[") <= limit and (
        encoded.find(b"+") < 0 or b"e+" not in encoded  # memchr first: "+" is rare
    ):
        return encoded
    return encoded if plain_value_is_clean(call, 0, limit) else None


def _utf8_ok(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_string(value: str, path: str) -> None:
    if "\x00" in value:
        raise Invalid("invalid_string", f"{path} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("invalid_string", f"{path} contains a lone surrogate") from None


def parse_timestamp(value: Any, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise Invalid("invalid_timestamp", f"{field} must be an ISO 8601 string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise Invalid("invalid_timestamp", f"{field} is not an ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise Invalid("timestamp_out_of_range", f"{field} is out of range") from None


def _identifier(raw: dict[str, Any], field: str) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    if type(value) is str:
        text = value.strip()
    elif isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Invalid("invalid_type", f"{field} must be a string")
    else:
        text = (value if isinstance(value, str) else _number_id(value)).strip()
    if not text:
        return None
    if len(text) > MAX_ID_LENGTH:
        raise Invalid("invalid_value", f"{field} is longer than {MAX_ID_LENGTH} characters")
    return text


def _number_id(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _name(raw: dict[str, Any], field: str, *, required: bool) -> str | None:
    value = raw.get(field)
    if value is None or value == "":
        if required:
            raise Invalid("missing_field", f"{field} is required")
        return None
    if not isinstance(value, str):
        raise Invalid("invalid_type", f"{field} must be a string")
    if len(value) > MAX_NAME_LENGTH:
        raise Invalid("invalid_value", f"{field} is longer than {MAX_NAME_LENGTH} characters")
    return value


def _skew_corrected(timestamp: datetime | None, sent_at: datetime | None, received_at: datetime) -> datetime:
    if timestamp is None:
        return received_at
    if sent_at is None:
        return timestamp
    try:
        return received_at - (sent_at - timestamp)
    except OverflowError:  # e.g. timestamp in year 1 and sentAt in year 9999
        raise Invalid(
            "timestamp_out_of_range", "timestamp is out of range once corrected for clock skew"
        ) from None


#: Fields left out of a derived message id: ``sentAt`` changes on every retry of the same
#: call; ``messageId`` is absent or null when the id is derived.
_NOT_HASHED = frozenset({"messageId", "sentAt", "writeKey"})


def derived_message_id(raw: dict[str, Any], call_type: CallType) -> str:
    """A stable id for a call sent without ``messageId``: the same call (same type and
    content, whatever its key order or ``sentAt``) always gets the same id."""
    content = {k: v for k, v in raw.items() if k not in _NOT_HASHED}
    content["type"] = call_type.value
    digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"wt-{digest[:40]}"


def validate_call(
    raw: Any,
    *,
    forced_type: CallType | None,
    received_at: datetime,
    batch_sent_at: datetime | None,
    limits: Limits,
    encoded_size: int | None = None,
    exact_numbers: bool = True,
) -> AcceptedEvent:
    """Turn one raw call into an ``AcceptedEvent`` or raise ``Invalid``.

    ``encoded_size`` is the call's size in bytes as JSON when the caller knows it (the
    body of a single call); otherwise the call is measured here, once its values are
    known to be storable (and so writable as JSON). A request of many calls checks them
    with one ``CallChecker``, which does the per-request work once.
    """
    checker = CallChecker(
        received_at=received_at, batch_sent_at=batch_sent_at, limits=limits, exact_numbers=exact_numbers
    )
    return checker.check(raw, forced_type=forced_type, encoded_size=encoded_size)


_CALL_TYPES = {t.value: t for t in CallType}
#: The plain string of each call type (``CallType.value`` is a slower property).
_TYPE_NAMES = {t: t.value for t in CallType}


class CallChecker:
    """Validates the calls of one request: ``check`` is ``validate_call`` with what is the
    same for every call of the request (receipt time and its text, the batch's
    ``sentAt``, the limits) worked out once.

    ``nul_free`` says the body holds no ``\\u0000`` escape; with numbers from orjson
    (``exact_numbers=False``) the values of a call are then checked by the cheaper
    ``plain_value_is_clean``.
    """

    __slots__ = (
        "_batch_sent_at",
        "_batch_sent_iso",
        "_depth",
        "_exact",
        "_latest",
        "_max_bytes",
        "_min_year",
        "_plain",
        "_received_at",
        "_received_iso",
        "limits",
    )

    def __init__(
        self,
        *,
        received_at: datetime,
        batch_sent_at: datetime | None,
        limits: Limits,
        exact_numbers: bool = True,
        nul_free: bool = False,
    ) -> None:
        self.limits = limits
        self._received_at = received_at
        self._received_iso = _iso(received_at)
        self._batch_sent_at = batch_sent_at
        self._batch_sent_iso = _iso(batch_sent_at) if batch_sent_at is not None else None
        self._latest = received_at + limits.max_future
        self._min_year = limits.min_year
        self._max_bytes = limits.max_event_bytes
        self._depth = limits.max_nesting_depth
        self._exact = exact_numbers
        self._plain = nul_free and not exact_numbers

    def check(
        self, raw: Any, *, forced_type: CallType | None = None, encoded_size: int | None = None
    ) -> AcceptedEvent:
        if not isinstance(raw, dict):
            raise Invalid("invalid_type", "each call must be a JSON object")
        # The call's own copy: it becomes the stored payload.
        payload = dict(raw)
        payload.pop("writeKey", None)
        encoded = _plain_encoding(payload, self._depth) if self._plain else None
        if not encoded:
            depth = self._depth
            if not value_is_clean(payload, 0, depth, exact=self._exact):
                check_value(payload, 0, depth, "$", exact=self._exact)
        size = encoded_size if encoded_size is not None else len(encoded or orjson.dumps(payload))
        if size > self._max_bytes:
            raise Invalid(
                "event_too_large",
                f"a call may be at most {self._max_bytes} bytes; this one is {size}",
                status=413,
            )

        if forced_type is not None:
            call_type = forced_type
        else:
            type_value = payload.get("type")
            if not isinstance(type_value, str):
                raise Invalid("missing_field", "type is required in a batch")
            found = _CALL_TYPES.get(type_value.lower())
            if found is None:
                raise Invalid("invalid_value", f"unknown call type {type_value!r}")
            call_type = found

        for field in OBJECT_FIELDS:
            value = payload.get(field)
            if value is not None and not isinstance(value, dict):
                raise Invalid("invalid_type", f"{field} must be an object")

        message_id = payload.get("messageId")
        if message_id is not None and (not isinstance(message_id, str) or not message_id.strip()):
            raise Invalid("invalid_type", "messageId must be a non-empty string")
        if isinstance(message_id, str) and len(message_id) > MAX_ID_LENGTH:
            raise Invalid("invalid_value", f"messageId is longer than {MAX_ID_LENGTH} characters")

        user_id = _identifier(payload, "userId")
        anonymous_id = _identifier(payload, "anonymousId")
        # Other ids, normalised like userId: stored so, as the pipeline reads them from the payload.
        previous_id: str | None = None
        group_id: str | None = None
        if call_type is CallType.ALIAS:
            previous_id = _identifier(payload, "previousId")
            if user_id is None or previous_id is None:
                raise Invalid("missing_identity", "alias needs userId and previousId")
        elif user_id is None and anonymous_id is None:
            raise Invalid("missing_identity", "userId or anonymousId is required")

        event_name: str | None = None
        if call_type is CallType.TRACK:
            event_name = _name(payload, "event", required=True)
        elif call_type is CallType.PAGE or call_type is CallType.SCREEN:
            event_name = _name(payload, "name", required=False)
        elif call_type is CallType.GROUP:
            group_id = _identifier(payload, "groupId")
            if group_id is None:
                raise Invalid("missing_field", "groupId is required")

        context = payload.get("context")
        if context and context.get("timezone") is not None and not isinstance(context["timezone"], str):
            raise Invalid("invalid_type", "context.timezone must be a string")

        received_at = self._received_at
        original = parse_timestamp(payload.get("timestamp"), "timestamp")
        sent_value = payload.get("sentAt")
        if sent_value is not None:
            sent_at: datetime | None = parse_timestamp(sent_value, "sentAt")
            sent_iso = None
        else:
            sent_at, sent_iso = self._batch_sent_at, self._batch_sent_iso
        timestamp = _skew_corrected(original, sent_at, received_at)
        if timestamp > self._latest:
            raise Invalid("timestamp_out_of_range", "timestamp is too far in the future")
        if timestamp.year < self._min_year:
            raise Invalid("timestamp_out_of_range", f"timestamp is before {self._min_year}")

        if isinstance(message_id, str):
            final_message_id = message_id.strip()
        else:
            final_message_id = derived_message_id(payload, call_type)
        payload["type"] = _TYPE_NAMES[call_type]
        payload["messageId"] = final_message_id
        if user_id is not None:
            payload["userId"] = user_id
        if anonymous_id is not None:
            payload["anonymousId"] = anonymous_id
        if previous_id is not None:
            payload["previousId"] = previous_id
        if group_id is not None:
            payload["groupId"] = group_id
        if original is None:
            payload["timestamp"] = self._received_iso  # the call's time is its receipt
            payload["originalTimestamp"] = None
        else:
            original_iso = _iso(original)
            payload["timestamp"] = original_iso if timestamp is original else _iso(timestamp)
            payload["originalTimestamp"] = original_iso
        if sent_at is None:
            payload["sentAt"] = None
        else:
            payload["sentAt"] = sent_iso if sent_iso is not None else _iso(sent_at)
        payload["receivedAt"] = self._received_iso
        # Positional: the fields of AcceptedEvent in order (keywords cost twice the time).
        return AcceptedEvent(
            final_message_id, call_type, event_name, user_id, anonymous_id, timestamp, received_at, payload
        )


def _iso(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, microseconds when there are any: what
    ``value.isoformat()`` gives for UTC (``"+00:00"`` written ``Z``), at a third of its
    cost, which matters at two timestamps a call."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    year = _YEARS.get(value.year)
    if year is None:
        year = _YEARS[value.year] = f"{value.year:04d}"
    text = (
        f"{year}-{_TWO_DIGITS[value.month]}-{_TWO_DIGITS[value.day]}T{_TWO_DIGITS[value.hour]}:"
        f"{_TWO_DIGITS[value.minute]}:{_TWO_DIGITS[value.second]}"
    )
    micro = value.microsecond
    if micro:
        return f"{text}.{_THREE_DIGITS[micro // 1000]}{_THREE_DIGITS[micro % 1000]}Z"
    return text + "Z"


_TWO_DIGITS = tuple(f"{i:02d}" for i in range(100))
_THREE_DIGITS = tuple(f"{i:03d}" for i in range(1000))
#: Filled as years are met (at most 9,999 entries).
_YEARS: dict[int, str] = {}


def reject(index: int, error: Invalid, raw: Any) -> Rejection:
    """The rejection of call ``index``; its ``messageId`` is echoed when it is a string
    that can be written back as JSON (a lone surrogate cannot)."""
    message_id = raw.get("messageId") if isinstance(raw, dict) else None
    return Rejection(
        index=index,
        code=error.code,
        message=error.message,
        status=error.status,
        message_id=message_id if isinstance(message_id, str) and _encodable(message_id) else None,
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
