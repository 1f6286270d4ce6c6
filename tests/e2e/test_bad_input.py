"""Bad input to the Segment HTTP Tracking API: every case answers a clear 4xx with a JSON
error code and message (never a 5xx), and stores exactly what it should.

The table of cases and the decisions behind them are in docs/design/tracking.md; each
row there names the test (and the ``id`` of the parametrized case) that covers it.

Conventions used below:

* ``BODY_CASES``: the request as a whole is refused; nothing is stored.
* ``BAD_CALLS``: one call is refused. Alone (single endpoint, or a batch of only that
  call) the request is refused and nothing is stored; inside a batch between two good
  calls, only that call is rejected and the good ones are stored.
* ``ACCEPTED_CALLS`` / ``TIMESTAMP_CASES``: odd but valid input, with what is stored.
* ``AUTH_FAILURES``: 401 cases; nothing is stored.

The app runs in process (``TestClient``), which re-raises any server error: a 5xx
cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import gzip
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Row, select

from tests.conftest import make_settings
from tests.support.workspace import TestWorkspace, make_workspace
from whenthen import workspaces
from whenthen.api.app import create_app
from whenthen.bootstrap import Container, build
from whenthen.kernel.clock import ManualClock
from whenthen.kernel.ids import WorkspaceId
from whenthen.settings import IngestSettings
from whenthen.tracking.tables import events
from whenthen.workspaces import KeyKind

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
NOW_ISO = "2026-11-25T12:00:00Z"
KB = 1024
DROP = object()  # a field to leave out of a call

Headers = list[tuple[bytes, bytes]]


# --------------------------------------------------------------------------- helpers


def basic(key: str, password: str = "") -> bytes:
    return b"Basic " + base64.b64encode(f"{key}:{password}".encode())


def json_headers(ws: TestWorkspace | None) -> Headers:
    headers: Headers = [(b"content-type", b"application/json")]
    if ws is not None:
        headers.append((b"authorization", basic(ws.write_key)))
    return headers


def post(client: TestClient, path: str, body: bytes, headers: Headers) -> Any:
    return client.post(path, content=body, headers=headers)


def call(type: object = "track", **fields: object) -> dict[str, Any]:
    """A call that is valid except for what ``fields`` change (``DROP`` removes a field)."""
    base: dict[str, Any] = {"type": type, "messageId": "bad", "userId": "u9"}
    if type == "track":
        base["event"] = "Bad"
    elif type == "group":
        base["groupId"] = "g9"
    elif type == "alias":
        base["previousId"] = "a9"
    base.update(fields)
    return {k: v for k, v in base.items() if v is not DROP}


def enc(value: Any) -> bytes:
    return orjson.dumps(value)


def raw_call(extra: bytes, type: str = "track", **fields: object) -> bytes:
    """``call(...)`` as JSON with ``extra`` (raw JSON members) appended, for values that
    JSON libraries refuse to write (NaN, lone surrogates, huge integers...)."""
    return enc(call(type, **fields))[:-1] + b"," + extra + b"}"


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"n": value}
    return value


def stored(c: Container) -> list[Row[Any]]:
    with c.db.read() as conn:
        return list(conn.execute(select(events).order_by(events.c.seq)))


def stored_ids(c: Container) -> list[str]:
    return [r.message_id for r in stored(c)]


def only_row(c: Container) -> Row[Any]:
    rows = stored(c)
    assert len(rows) == 1, rows
    return rows[0]


def assert_error(r: Any, status: int, code: str) -> dict[str, Any]:
    """The response is ``status`` with the JSON error shape and ``code``; returns ``error``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["success"] is False
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"].strip()
    return error


def batch(*calls: bytes, top: bytes = b"") -> bytes:
    """A batch body from raw call fragments; ``top`` adds raw top-level members."""
    head = b"{" + (top + b"," if top else b"") + b'"batch":['
    return head + b",".join(calls) + b"]}"


GOOD_A = {"type": "identify", "messageId": "good-a", "userId": "u1", "traits": {"plan": "pro"}}
GOOD_B = {"type": "track", "messageId": "good-b", "userId": "u1", "event": "Signed Up"}
GOOD_TRACK = {"userId": "u1", "event": "Signed Up", "messageId": "m1"}


@pytest.fixture
def ws(container: Container) -> TestWorkspace:
    return make_workspace(container)


# ------------------------------------------------------------- whole request refused


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _padded_track(size: int) -> bytes:
    """A valid single track call (``GOOD_TRACK``) whose body is exactly ``size`` bytes."""
    head = b'{"userId":"u1","event":"Signed Up","messageId":"m1","properties":{"p":"'
    tail = b'"}}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def _padded_batch(size: int) -> bytes:
    """A valid batch of calls of about 25 KB each, exactly ``size`` bytes long."""
    calls = [enc({**GOOD_B, "messageId": f"p{i}", "properties": {"p": "a" * 25 * KB}}) for i in range(19)]
    body = batch(*calls, top=b'"pad":""')
    missing = size - len(body)
    assert missing >= 0
    return body.replace(b'"pad":""', b'"pad":"' + b" " * missing + b'"', 1)


@cache
def _bomb(size: int) -> bytes:
    """gzip of a JSON call ``size`` bytes long (mostly one repeated letter)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [z.compress(b'{"userId":"u1","event":"E","properties":{"p":"')]
    chunk = b"a" * (1024 * KB)
    for _ in range(size // len(chunk)):
        out.append(z.compress(chunk))
    out.append(z.compress(b'"}}'))
    out.append(z.flush())
    return b"".join(out)


def _deep_body(levels: int, *, in_batch: bool) -> bytes:
    deep = b"[" * levels + b"]" * levels
    if in_batch:
        return batch(enc(GOOD_B), enc(GOOD_A)[:-1] + b',"properties":{"p":' + deep + b"}}")
    return b'{"userId":"u1","event":"E","properties":{"p":' + deep + b"}}"


TRACK = "/v1/track"
BATCH = "/v1/batch"
GZIP = [(b"content-encoding", b"gzip")]

#: (path, body, extra headers, status, code)
BODY_CASES = [
    pytest.param(TRACK, b"", [], 400, "invalid_json", id="empty-single"),
    pytest.param(BATCH, b"", [], 400, "invalid_json", id="empty-batch"),
    pytest.param(TRACK, b" \r\n\t ", [], 400, "invalid_json", id="whitespace-only"),
    pytest.param(TRACK, b'{"userId":"u1","event":', [], 400, "invalid_json", id="truncated"),
    pytest.param(TRACK, b'{"userId":"u1","event":"E",}', [], 400, "invalid_json", id="trailing-comma"),
    pytest.param(TRACK, b"{'userId':'u1','event':'E'}", [], 400, "invalid_json", id="single-quotes"),
    pytest.param(TRACK, b'{"userId":"u1","event":"E"} x', [], 400, "invalid_json", id="trailing-garbage"),
    pytest.param(TRACK, b'{"userId":"u1","event":"E"}{}', [], 400, "invalid_json", id="two-documents"),
    pytest.param(TRACK, b'/*c*/{"userId":"u1","event":"E"}', [], 400, "invalid_json", id="comment"),
    pytest.param(TRACK, b'{userId:"u1",event:"E"}', [], 400, "invalid_json", id="unquoted-keys"),
    pytest.param(
        TRACK, b'{"userId":"u\n1","event":"E"}', [], 400, "invalid_json", id="raw-newline-in-string"
    ),
    pytest.param(TRACK, b'{"userId":"u1","event":"\\x41"}', [], 400, "invalid_json", id="bad-escape"),
    pytest.param(TRACK, b'{"userId":"\xff\xfe","event":"E"}', [], 400, "invalid_json", id="invalid-utf8"),
    pytest.param(TRACK, b'{"userId":"caf\xe9","event":"E"}', [], 400, "invalid_json", id="latin1-bytes"),
    pytest.param(
        TRACK, b'{"userId":"\xed\xa0\x80","event":"E"}', [], 400, "invalid_json", id="utf8-encoded-surrogate"
    ),
    pytest.param(TRACK, b'{"userId":"\xc0\xaf","event":"E"}', [], 400, "invalid_json", id="overlong-utf8"),
    pytest.param(TRACK, b"\x00", [], 400, "invalid_json", id="nul-byte-body"),
    pytest.param(TRACK, b"[]", [], 400, "invalid_type", id="single-array"),
    pytest.param(TRACK, b"1", [], 400, "invalid_type", id="single-number"),
    pytest.param(TRACK, b'"x"', [], 400, "invalid_type", id="single-string"),
    pytest.param(TRACK, b"null", [], 400, "invalid_type", id="single-null"),
    pytest.param(TRACK, b"true", [], 400, "invalid_type", id="single-bool"),
    pytest.param(BATCH, b"[]", [], 400, "invalid_type", id="batch-body-array"),
    pytest.param(BATCH, b"[" + enc(GOOD_A) + b"]", [], 400, "invalid_type", id="batch-body-bare-array"),
    pytest.param(BATCH, b"1", [], 400, "invalid_type", id="batch-body-number"),
    pytest.param(BATCH, b'"x"', [], 400, "invalid_type", id="batch-body-string"),
    pytest.param(BATCH, b"null", [], 400, "invalid_type", id="batch-body-null"),
    pytest.param(BATCH, b"{}", [], 400, "missing_field", id="batch-missing"),
    pytest.param(BATCH, b'{"batch":null}', [], 400, "missing_field", id="batch-null"),
    pytest.param(BATCH, b'{"batch":{}}', [], 400, "missing_field", id="batch-object"),
    pytest.param(BATCH, b'{"batch":"x"}', [], 400, "missing_field", id="batch-string"),
    pytest.param(BATCH, b'{"batch":5}', [], 400, "missing_field", id="batch-number"),
    pytest.param(BATCH, b'{"Batch":[]}', [], 400, "missing_field", id="batch-wrong-case"),
    pytest.param(
        BATCH, batch(enc(GOOD_A), top=b'"sentAt":"soon"'), [], 400, "invalid_timestamp", id="batch-sentAt-bad"
    ),
    pytest.param(
        BATCH, batch(enc(GOOD_A), top=b'"sentAt":12'), [], 400, "invalid_timestamp", id="batch-sentAt-number"
    ),
    pytest.param(BATCH, batch(*[b"{}"] * 2501), [], 413, "too_many_events", id="batch-2501-events"),
    pytest.param(
        TRACK, _deep_body(5000, in_batch=False), [], 400, "nesting_too_deep", id="nesting-5000-single"
    ),
    pytest.param(
        BATCH, _deep_body(5000, in_batch=True), [], 400, "nesting_too_deep", id="nesting-5000-batch"
    ),
    pytest.param(TRACK, _padded_track(32 * KB + 1), [], 413, "payload_too_large", id="single-over-32KB"),
    pytest.param(BATCH, b" " * (500 * KB + 1), [], 413, "payload_too_large", id="batch-over-500KB"),
    pytest.param(
        TRACK, enc(GOOD_TRACK), [(b"content-encoding", b"br")], 415, "unsupported_encoding", id="brotli"
    ),
    pytest.param(
        TRACK,
        enc(GOOD_TRACK),
        [(b"content-encoding", b"gzip, br")],
        415,
        "unsupported_encoding",
        id="two-codings",
    ),
    pytest.param(TRACK, enc(GOOD_TRACK), GZIP, 400, "invalid_encoding", id="gzip-header-plain-body"),
    pytest.param(TRACK, _gzip(enc(GOOD_TRACK))[:-6], GZIP, 400, "invalid_encoding", id="gzip-truncated"),
    pytest.param(TRACK, b"", GZIP, 400, "invalid_encoding", id="gzip-empty"),
    pytest.param(
        TRACK, _gzip(enc(GOOD_TRACK)) + b"trailing", GZIP, 400, "invalid_encoding", id="gzip-trailing-garbage"
    ),
    pytest.param(
        TRACK,
        zlib.compress(enc(GOOD_TRACK)) + b"x",
        [(b"content-encoding", b"deflate")],
        400,
        "invalid_encoding",
        id="deflate-trailing-bytes",
    ),
    pytest.param(
        TRACK,
        _gzip(_padded_track(20 * KB)) * 2,
        GZIP,
        413,
        "payload_too_large",
        id="gzip-members-inflate-over",
    ),
    pytest.param(TRACK, _gzip(b'{"userId":'), GZIP, 400, "invalid_json", id="gzip-of-invalid-json"),
    pytest.param(TRACK, _gzip(b""), GZIP, 400, "invalid_json", id="gzip-of-nothing"),
    pytest.param(
        TRACK, _gzip(_padded_track(32 * KB + 1)), GZIP, 413, "payload_too_large", id="gzip-inflates-over"
    ),
    pytest.param(TRACK, _bomb(20 * 1024 * KB), GZIP, 413, "payload_too_large", id="gzip-bomb-single"),
    pytest.param(BATCH, _bomb(100 * 1024 * KB), GZIP, 413, "payload_too_large", id="gzip-bomb-batch"),
]


@pytest.mark.parametrize(("path", "body", "extra", "status", "code"), BODY_CASES)
def test_request_refused(
    client: TestClient,
    container: Container,
    ws: TestWorkspace,
    path: str,
    body: bytes,
    extra: Headers,
    status: int,
    code: str,
) -> None:
    r = post(client, path, body, json_headers(ws) + extra)
    assert_error(r, status, code)
    assert stored(container) == []


def test_gzip_bomb_does_not_inflate_in_memory(client: TestClient, ws: TestWorkspace) -> None:
    """A 100 MB gzip bomb is refused after inflating at most the 500 KB limit."""
    body = _bomb(100 * 1024 * KB)
    assert len(body) < 500 * KB
    tracemalloc.start()
    try:
        r = post(client, BATCH, body, json_headers(ws) + GZIP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_error(r, 413, "payload_too_large")
    assert peak < 16 * 1024 * KB, peak


def test_chunked_body_over_limit(client: TestClient, container: Container, ws: TestWorkspace) -> None:
    """Without a Content-Length the limit is enforced while reading the stream."""

    def chunks() -> Iterator[bytes]:
        yield b'{"userId":"u1","event":"E","properties":{"p":"'
        for _ in range(40):
            yield b"a" * KB
        yield b'"}}'

    r = client.post(TRACK, content=chunks(), headers=json_headers(ws))
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "payload_too_large")
    assert stored(container) == []


# ------------------------------------------------------------------ one call refused


@dataclass(frozen=True)
class Bad:
    body: bytes
    code: str
    #: The messageId the rejection echoes (``None`` when it is not a usable string).
    echo: str | None = "bad"
    #: Path of the single endpoint; ``None`` when the case only exists inside a batch.
    single: str | None = "/v1/track"


def bad(value: dict[str, Any], code: str, **kw: Any) -> Bad:
    path = f"/v1/{value.get('type', 'track')}"
    return Bad(enc(value), code, **{"single": path, **kw})


def raw_bad(extra: bytes, code: str, type: str = "track", echo: str | None = "bad", **fields: object) -> Bad:
    return Bad(raw_call(extra, type, **fields), code, echo=echo, single=f"/v1/{type}")


LONG = "x" * 256
BAD_CALLS = [
    # identities
    pytest.param(bad(call(userId=DROP), "missing_identity"), id="no-identity"),
    pytest.param(bad(call(userId=None), "missing_identity"), id="userId-null"),
    pytest.param(bad(call(userId="", anonymousId=""), "missing_identity"), id="ids-empty"),
    pytest.param(bad(call(userId="   ", anonymousId="\t"), "missing_identity"), id="ids-blank"),
    pytest.param(bad(call(userId={"id": 1}), "invalid_type"), id="userId-object"),
    pytest.param(bad(call(userId=["u1"]), "invalid_type"), id="userId-array"),
    pytest.param(bad(call(userId=True), "invalid_type"), id="userId-true"),
    pytest.param(bad(call(userId=DROP, anonymousId=False), "invalid_type"), id="anonymousId-false"),
    pytest.param(bad(call(anonymousId={"a": 1}), "invalid_type"), id="anonymousId-object"),
    pytest.param(bad(call(userId=LONG), "invalid_value"), id="userId-256-chars"),
    pytest.param(bad(call(userId=DROP, anonymousId=LONG), "invalid_value"), id="anonymousId-256-chars"),
    pytest.param(bad(call(userId=1e300), "invalid_value"), id="userId-float-301-digits"),
    pytest.param(
        raw_bad(b'"userId":123456789012345678901234567890', "number_out_of_range", userId=DROP),
        id="userId-huge-int",
    ),
    pytest.param(raw_bad(b'"userId":"\\u0000"', "invalid_string", userId=DROP), id="userId-nul"),
    pytest.param(raw_bad(b'"anonymousId":"\\ud800"', "invalid_string"), id="anonymousId-lone-surrogate"),
    # alias / group / track / page
    pytest.param(bad(call("alias", previousId=DROP), "missing_identity"), id="alias-no-previousId"),
    pytest.param(bad(call("alias", previousId=""), "missing_identity"), id="alias-empty-previousId"),
    pytest.param(bad(call("alias", userId=DROP, anonymousId="a1"), "missing_identity"), id="alias-no-userId"),
    pytest.param(bad(call("alias", previousId={"id": "a"}), "invalid_type"), id="alias-previousId-object"),
    pytest.param(bad(call("alias", previousId=LONG), "invalid_value"), id="alias-previousId-256-chars"),
    pytest.param(bad(call("group", groupId=DROP), "missing_field"), id="group-no-groupId"),
    pytest.param(bad(call("group", groupId=""), "missing_field"), id="group-empty-groupId"),
    pytest.param(bad(call("group", groupId={"g": 1}), "invalid_type"), id="group-groupId-object"),
    pytest.param(bad(call("group", groupId=True), "invalid_type"), id="group-groupId-bool"),
    pytest.param(bad(call("group", groupId=LONG), "invalid_value"), id="group-groupId-256-chars"),
    pytest.param(bad(call(event=DROP), "missing_field"), id="track-no-event"),
    pytest.param(bad(call(event=""), "missing_field"), id="track-empty-event"),
    pytest.param(bad(call(event=None), "missing_field"), id="track-null-event"),
    pytest.param(bad(call(event=5), "invalid_type"), id="track-event-number"),
    pytest.param(bad(call(event={"name": "E"}), "invalid_type"), id="track-event-object"),
    pytest.param(bad(call(event=LONG), "invalid_value"), id="track-event-256-chars"),
    pytest.param(raw_bad(b'"event":"E\\u0000"', "invalid_string", event=DROP), id="track-event-nul"),
    pytest.param(bad(call("page", name=5), "invalid_type"), id="page-name-number"),
    pytest.param(bad(call("screen", name=LONG), "invalid_value"), id="screen-name-256-chars"),
    # messageId
    pytest.param(bad(call(messageId=5), "invalid_type", echo=None), id="messageId-number"),
    pytest.param(bad(call(messageId=""), "invalid_type", echo=""), id="messageId-empty"),
    pytest.param(bad(call(messageId="  "), "invalid_type", echo="  "), id="messageId-blank"),
    pytest.param(bad(call(messageId={"id": "m"}), "invalid_type", echo=None), id="messageId-object"),
    pytest.param(bad(call(messageId=LONG), "invalid_value", echo=LONG), id="messageId-256-chars"),
    pytest.param(
        raw_bad(b'"messageId":"m\\ud800"', "invalid_string", echo=None, messageId=DROP),
        id="messageId-lone-surrogate",
    ),
    # object fields
    pytest.param(bad(call(properties=[1, 2]), "invalid_type"), id="properties-array"),
    pytest.param(bad(call(properties="{}"), "invalid_type"), id="properties-string"),
    pytest.param(bad(call(properties=0), "invalid_type"), id="properties-zero"),
    pytest.param(bad(call("identify", traits=5), "invalid_type"), id="traits-number"),
    pytest.param(bad(call("identify", traits=["a"]), "invalid_type"), id="traits-array"),
    pytest.param(bad(call(context="web"), "invalid_type"), id="context-string"),
    pytest.param(bad(call(integrations=[]), "invalid_type"), id="integrations-array"),
    pytest.param(bad(call(context={"timezone": 5}), "invalid_type"), id="context-timezone-number"),
    # numbers
    pytest.param(
        raw_bad(b'"properties":{"n":123456789012345678901234567890}', "number_out_of_range"),
        id="int-30-digits",
    ),
    pytest.param(
        raw_bad(b'"properties":{"n":-9223372036854775809}', "number_out_of_range"), id="int-below-int64"
    ),
    pytest.param(
        raw_bad(b'"properties":{"n":9223372036854775808}', "number_out_of_range"), id="int-above-int64"
    ),
    pytest.param(
        raw_bad(b'"properties":{"n":18446744073709551615}', "number_out_of_range"), id="int-uint64-max"
    ),
    pytest.param(
        raw_bad(b'"properties":{"n":1' + b"0" * 5000 + b"}", "number_out_of_range"), id="int-5001-digits"
    ),
    pytest.param(
        raw_bad(b'"properties":{"n":[1,2,99999999999999999999]}', "number_out_of_range"), id="int-in-array"
    ),
    pytest.param(raw_bad(b'"properties":{"n":1e400}', "number_out_of_range"), id="float-1e400"),
    pytest.param(raw_bad(b'"properties":{"n":-1e400}', "number_out_of_range"), id="float-minus-1e400"),
    pytest.param(raw_bad(b'"properties":{"n":NaN}', "number_out_of_range"), id="NaN"),
    pytest.param(raw_bad(b'"properties":{"n":Infinity}', "number_out_of_range"), id="Infinity"),
    pytest.param(raw_bad(b'"properties":{"n":-Infinity}', "number_out_of_range"), id="minus-Infinity"),
    pytest.param(raw_bad(b'"custom":NaN', "number_out_of_range"), id="NaN-top-level-field"),
    # strings
    pytest.param(raw_bad(b'"properties":{"s":"\\ud800"}', "invalid_string"), id="lone-high-surrogate"),
    pytest.param(raw_bad(b'"properties":{"s":"a\\udc00b"}', "invalid_string"), id="lone-low-surrogate"),
    pytest.param(
        raw_bad(b'"properties":{"s":"\\ude00\\ud83d"}', "invalid_string"), id="reversed-surrogate-pair"
    ),
    pytest.param(raw_bad(b'"properties":{"\\ud800":1}', "invalid_string"), id="lone-surrogate-in-key"),
    pytest.param(raw_bad(b'"properties":{"s":"a\\u0000b"}', "invalid_string"), id="nul-in-value"),
    pytest.param(raw_bad(b'"properties":{"a\\u0000b":1}', "invalid_string"), id="nul-in-key"),
    pytest.param(raw_bad(b'"properties":{"l":["ok","\\u0000"]}', "invalid_string"), id="nul-in-array"),
    pytest.param(raw_bad(b'"context":{"traits":{"\\u0000":"x"}}', "invalid_string"), id="nul-in-nested-key"),
    pytest.param(raw_bad(b'"\\u0000":1', "invalid_string"), id="nul-in-top-level-key"),
    # nesting
    pytest.param(bad(call(properties=nested(32)), "nesting_too_deep"), id="nesting-33-levels"),
    pytest.param(bad(call(properties=nested(40)), "nesting_too_deep"), id="nesting-40-levels"),
    pytest.param(
        raw_bad(b'"properties":{"p":' + b"[" * 1000 + b"]" * 1000 + b"}", "nesting_too_deep"),
        id="nesting-1000-levels",
    ),
    # timestamps (the clock reads 2026-11-25T12:00:00Z)
    pytest.param(bad(call(timestamp="2026-11-26T12:00:01Z"), "timestamp_out_of_range"), id="ts-24h-plus-1s"),
    pytest.param(bad(call(timestamp="2999-01-01T00:00:00Z"), "timestamp_out_of_range"), id="ts-year-2999"),
    pytest.param(bad(call(timestamp="1999-12-31T23:59:59Z"), "timestamp_out_of_range"), id="ts-1999"),
    pytest.param(bad(call(timestamp="1970-01-01T00:00:00Z"), "timestamp_out_of_range"), id="ts-epoch"),
    pytest.param(
        bad(call(timestamp="2000-01-01T00:30:00+01:00"), "timestamp_out_of_range"), id="ts-1999-by-offset"
    ),
    pytest.param(
        bad(call(timestamp="0001-01-01T00:00:00+01:00"), "timestamp_out_of_range"), id="ts-before-year-1"
    ),
    pytest.param(
        bad(call(timestamp="9999-12-31T23:59:59-01:00"), "timestamp_out_of_range"), id="ts-after-9999"
    ),
    pytest.param(
        bad(call(timestamp="2026-11-27T00:00:00Z", sentAt="2026-11-25T10:00:00Z"), "timestamp_out_of_range"),
        id="ts-skew-corrected-future",
    ),
    pytest.param(
        bad(call(timestamp="1990-01-01T00:00:00Z", sentAt=NOW_ISO), "timestamp_out_of_range"),
        id="ts-skew-corrected-1990",
    ),
    pytest.param(
        bad(call(timestamp="0001-01-01T00:00:00Z", sentAt="9999-12-31T23:59:59Z"), "timestamp_out_of_range"),
        id="ts-skew-overflow-past",
    ),
    pytest.param(
        bad(call(timestamp="9999-12-31T23:59:59Z", sentAt="2000-01-01T00:00:00Z"), "timestamp_out_of_range"),
        id="ts-skew-overflow-future",
    ),
    pytest.param(bad(call(timestamp="yesterday"), "invalid_timestamp"), id="ts-words"),
    pytest.param(bad(call(timestamp=""), "invalid_timestamp"), id="ts-empty"),
    pytest.param(bad(call(timestamp="1764072000"), "invalid_timestamp"), id="ts-epoch-seconds-string"),
    pytest.param(bad(call(timestamp="17640720"), "timestamp_out_of_range"), id="ts-compact-date-1764"),
    pytest.param(bad(call(timestamp=1764072000), "invalid_timestamp"), id="ts-epoch-number"),
    pytest.param(bad(call(timestamp={"t": 1}), "invalid_timestamp"), id="ts-object"),
    pytest.param(bad(call(timestamp="2026-02-30T00:00:00Z"), "invalid_timestamp"), id="ts-feb-30"),
    pytest.param(bad(call(timestamp="2026-11-25T25:00:00Z"), "invalid_timestamp"), id="ts-hour-25"),
    pytest.param(bad(call(timestamp="2026-11-25T12:00:00+25:00"), "invalid_timestamp"), id="ts-offset-25h"),
    pytest.param(
        bad(call(timestamp="2026-11-25T12:00:00" + "0" * 60 + "Z"), "invalid_timestamp"), id="ts-too-long"
    ),
    pytest.param(bad(call(sentAt="later"), "invalid_timestamp"), id="sentAt-words"),
    pytest.param(bad(call(sentAt=True), "invalid_timestamp"), id="sentAt-bool"),
    # only inside a batch: the type, and entries that are not objects
    pytest.param(bad(call(type="explode"), "invalid_value", single=None), id="batch-unknown-type"),
    pytest.param(bad(call(type=""), "invalid_value", single=None), id="batch-empty-type"),
    pytest.param(bad(call(type=DROP), "missing_field", single=None), id="batch-no-type"),
    pytest.param(bad(call(type=3), "missing_field", single=None), id="batch-type-number"),
    pytest.param(Bad(b"5", "invalid_type", echo=None, single=None), id="batch-entry-number"),
    pytest.param(Bad(b'"x"', "invalid_type", echo=None, single=None), id="batch-entry-string"),
    pytest.param(Bad(b"null", "invalid_type", echo=None, single=None), id="batch-entry-null"),
    pytest.param(Bad(b"true", "invalid_type", echo=None, single=None), id="batch-entry-bool"),
    pytest.param(Bad(b"[]", "invalid_type", echo=None, single=None), id="batch-entry-array"),
    pytest.param(
        Bad(b"[" + enc(GOOD_B) + b"]", "invalid_type", echo=None, single=None), id="batch-entry-wrapped"
    ),
    pytest.param(
        bad(call(properties={"p": "a" * 33 * KB}), "event_too_large", single=None), id="batch-entry-over-32KB"
    ),
]


def assert_rejection(rejection: dict[str, Any], index: int, case: Bad) -> None:
    assert set(rejection) == {"index", "code", "message", "messageId"}
    assert rejection["index"] == index
    assert rejection["code"] == case.code
    assert isinstance(rejection["message"], str)
    assert rejection["message"].strip()
    assert rejection["messageId"] == case.echo


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_call(client: TestClient, container: Container, ws: TestWorkspace, case: Bad) -> None:
    """Alone, the call is refused and nothing is stored; in a batch, only it is rejected."""
    if case.single is not None:
        r = post(client, case.single, case.body, json_headers(ws))
        assert_error(r, 400, case.code)
        assert stored(container) == []

    r = post(client, BATCH, batch(case.body), json_headers(ws))
    error = assert_error(r, 400, "invalid_batch")
    assert len(error["rejected"]) == 1
    assert_rejection(error["rejected"][0], 0, case)
    assert stored(container) == []

    r = post(client, BATCH, batch(enc(GOOD_A), case.body, enc(GOOD_B)), json_headers(ws))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert body["accepted"] == 2
    assert body["duplicates"] == 0
    [rejection] = body["rejected"]
    assert_rejection(rejection, 1, case)
    rows = stored(container)
    assert [r.message_id for r in rows] == ["good-a", "good-b"]
    assert rows[0].payload["traits"] == {"plan": "pro"}
    assert rows[1].event == "Signed Up"
    assert {r.user_id for r in rows} == {"u1"}


def test_good_calls_of_a_mixed_batch_reach_the_profile(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    bad_calls = [
        raw_call(b'"properties":{"n":NaN}', messageId="x1"),
        raw_call(b'"properties":{"s":"\\ud800"}', messageId="x2"),
        enc(call(event=DROP, messageId="x3")),
        b"null",
    ]
    r = post(client, BATCH, batch(enc(GOOD_A), *bad_calls, enc(GOOD_B)), json_headers(ws))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2
    assert [(x["index"], x["code"], x["messageId"]) for x in body["rejected"]] == [
        (1, "number_out_of_range", "x1"),
        (2, "invalid_string", "x2"),
        (3, "missing_field", "x3"),
        (4, "invalid_type", None),
    ]
    container.worker.drain()
    profile = client.get("/api/v1/profiles/lookup", params={"user_id": "u1"}, headers=ws.admin_headers)
    assert profile.status_code == 200, profile.text
    assert profile.json()["traits"] == {"plan": "pro"}
    assert profile.json()["event_count"] == 2
    listed = client.get(f"/api/v1/profiles/{profile.json()['id']}/events", headers=ws.admin_headers)
    assert [e["message_id"] for e in listed.json()["data"]] == ["good-a", "good-b"]
    missing = client.get("/api/v1/profiles/lookup", params={"user_id": "u9"}, headers=ws.admin_headers)
    assert_error(missing, 404, "not_found")
    assert {r.state for r in stored(container)} == {1}


# ------------------------------------------------------------- odd but accepted calls


@dataclass(frozen=True)
class Accepted:
    body: bytes
    #: Expected values of columns of the stored row (``user_id``, ``event``...).
    columns: dict[str, Any]
    #: Expected values in the stored payload.
    payload: dict[str, Any]
    path: str = TRACK


def accepted(extra: bytes, columns: dict[str, Any], payload: dict[str, Any], **kw: Any) -> Accepted:
    base = b'{"userId":"u1","event":"E","messageId":"m1",'
    return Accepted(base + extra + b"}", columns, payload, **kw)


def accepted_json(
    value: dict[str, Any], columns: dict[str, Any], payload: dict[str, Any], **kw: Any
) -> Accepted:
    return Accepted(enc({"messageId": "m1", "event": "E", **value}), columns, payload, **kw)


ACCEPTED_CALLS = [
    pytest.param(accepted_json({"userId": 42}, {"user_id": "42"}, {"userId": "42"}), id="userId-int"),
    pytest.param(accepted_json({"userId": 0}, {"user_id": "0"}, {"userId": "0"}), id="userId-zero"),
    pytest.param(accepted_json({"userId": -5}, {"user_id": "-5"}, {"userId": "-5"}), id="userId-negative"),
    pytest.param(
        accepted_json({"userId": 42.0}, {"user_id": "42"}, {"userId": "42"}), id="userId-integral-float"
    ),
    pytest.param(accepted_json({"userId": 1.5}, {"user_id": "1.5"}, {"userId": "1.5"}), id="userId-float"),
    pytest.param(
        Accepted(
            b'{"userId":9223372036854775807,"event":"E","messageId":"m1"}',
            {"user_id": "9223372036854775807"},
            {},
        ),
        id="userId-int64-max",
    ),
    pytest.param(
        accepted_json({"anonymousId": 7}, {"anonymous_id": "7", "user_id": None}, {"anonymousId": "7"}),
        id="anonymousId-int",
    ),
    pytest.param(
        accepted_json({"userId": "  u1  "}, {"user_id": "u1"}, {"userId": "u1"}), id="userId-trimmed"
    ),
    pytest.param(
        accepted_json({"userId": "", "anonymousId": "a1"}, {"user_id": None, "anonymous_id": "a1"}, {}),
        id="userId-empty-with-anonymousId",
    ),
    pytest.param(accepted_json({"userId": "u" * 255}, {"user_id": "u" * 255}, {}), id="userId-255-chars"),
    pytest.param(
        accepted_json({"userId": "u1", "event": "e" * 255}, {"event": "e" * 255}, {}), id="event-255-chars"
    ),
    pytest.param(
        accepted_json({"userId": "u1", "messageId": " m2 "}, {"message_id": "m2"}, {"messageId": "m2"}),
        id="messageId-trimmed",
    ),
    pytest.param(
        accepted_json(
            {"userId": "u1", "foo": {"bar": [1, 2]}, "x-custom": "y", "version": 2, "receivedAtClient": None},
            {},
            {"foo": {"bar": [1, 2]}, "x-custom": "y", "version": 2, "receivedAtClient": None},
        ),
        id="unknown-fields-kept",
    ),
    pytest.param(
        accepted_json({"userId": "u1", "writeKey": "ignored"}, {}, {}),
        id="writeKey-in-body-not-stored",
    ),
    pytest.param(
        accepted_json({"userId": "u1", "type": "page"}, {"type": "track"}, {"type": "track"}),
        id="type-in-body-ignored-by-endpoint",
    ),
    pytest.param(
        accepted(
            b'"properties":{"max":9223372036854775807,"min":-9223372036854775808}',
            {},
            {"properties": {"max": 2**63 - 1, "min": -(2**63)}},
        ),
        id="int64-extremes",
    ),
    pytest.param(accepted(b'"properties":{"f":1e19}', {}, {"properties": {"f": 1e19}}), id="float-1e19"),
    pytest.param(
        accepted(
            b'"properties":{"f":1.5e300,"g":-2.5e-300}', {}, {"properties": {"f": 1.5e300, "g": -2.5e-300}}
        ),
        id="float-extremes",
    ),
    pytest.param(accepted(b'"properties":{"f":1E2}', {}, {"properties": {"f": 100.0}}), id="float-exponent"),
    pytest.param(
        accepted(b'"properties":' + enc(nested(31)), {}, {"properties": nested(31)}), id="nesting-32-levels"
    ),
    pytest.param(
        accepted(b'"properties":{"e":"\\ud83d\\ude00"}', {}, {"properties": {"e": "\U0001f600"}}),
        id="surrogate-pair",
    ),
    pytest.param(
        accepted(b'"properties":{"c":"\\u0001\\u001f\\u2028"}', {}, {"properties": {"c": "\x01\x1f\u2028"}}),
        id="control-chars",
    ),
    pytest.param(
        accepted(b'"properties":{"s":"\\\\u0000"}', {}, {"properties": {"s": "\\u0000"}}),
        id="escaped-backslash-u0000",
    ),
    pytest.param(
        accepted(
            '"properties":{"ключ":"値","emoji 😀":1}'.encode(),
            {},
            {"properties": {"ключ": "値", "emoji 😀": 1}},
        ),
        id="unicode-keys",
    ),
    pytest.param(accepted(b'"properties":null', {}, {"properties": None}), id="properties-null"),
    pytest.param(accepted(b'"properties":{}', {}, {"properties": {}}), id="properties-empty"),
    pytest.param(
        accepted(
            b'"context":{"timezone":"Europe/Paris","ip":"1.2.3.4"}',
            {},
            {"context": {"timezone": "Europe/Paris", "ip": "1.2.3.4"}},
        ),
        id="context-timezone",
    ),
    pytest.param(
        Accepted(b'\xef\xbb\xbf{"userId":"u1","event":"E","messageId":"m1"}', {"user_id": "u1"}, {}),
        id="utf8-bom",
    ),
    pytest.param(
        Accepted(b'  \n{"userId":"u1","event":"E","messageId":"m1"}\n  ', {"user_id": "u1"}, {}),
        id="surrounding-whitespace",
    ),
    pytest.param(
        Accepted(b'{"userId":"u1","userId":"u2","event":"E","messageId":"m1"}', {"user_id": "u2"}, {}),
        id="duplicate-key-last-wins",
    ),
    pytest.param(
        Accepted(
            b'{"userId":"u1","previousId":"a1","messageId":"m1"}',
            {"type": "alias"},
            {"previousId": "a1"},
            path="/v1/alias",
        ),
        id="alias-ok",
    ),
    pytest.param(
        Accepted(
            b'{"anonymousId":"a1","groupId":7,"messageId":"m1"}',
            {"type": "group"},
            {"groupId": "7"},
            path="/v1/g",
        ),
        id="group-numeric-groupId",
    ),
    pytest.param(
        Accepted(b'{"userId":"u1","groupId":" g1 ","messageId":"m1"}', {}, {"groupId": "g1"}, path="/v1/g"),
        id="group-groupId-trimmed",
    ),
    pytest.param(
        Accepted(
            b'{"userId":"u1","previousId":42.0,"messageId":"m1"}', {}, {"previousId": "42"}, path="/v1/a"
        ),
        id="alias-numeric-previousId",
    ),
    pytest.param(
        Accepted(
            b'{"userId":"u1","previousId":"  a1 ","messageId":"m1"}', {}, {"previousId": "a1"}, path="/v1/a"
        ),
        id="alias-previousId-trimmed",
    ),
    pytest.param(
        Accepted(b'{"userId":"u1","messageId":"m1"}', {"type": "page", "event": None}, {}, path="/v1/p"),
        id="page-without-name",
    ),
]


@pytest.mark.parametrize("case", ACCEPTED_CALLS)
def test_odd_call_is_accepted_and_stored(
    client: TestClient, container: Container, ws: TestWorkspace, case: Accepted
) -> None:
    r = post(client, case.path, case.body, json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}
    row = only_row(container)
    assert row.workspace_id == ws.id
    for column, value in case.columns.items():
        assert getattr(row, column) == value, column
    for field, value in case.payload.items():
        assert row.payload[field] == value, field
    assert "writeKey" not in row.payload
    assert row.payload["receivedAt"] == NOW_ISO
    container.worker.drain()
    assert only_row(container).state == 1  # processed by the pipeline, not parked


def test_normalised_ids_reach_the_profile(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    """A numeric previousId or groupId is stored as the string the profile is keyed by."""
    calls = [
        {"type": "track", "anonymousId": 42, "event": "Viewed", "messageId": "m0"},
        {"type": "alias", "userId": " u1 ", "previousId": 42.0, "messageId": "m1"},
        {"type": "group", "userId": "u1", "groupId": 7.0, "messageId": "m2"},
    ]
    r = post(client, BATCH, enc({"batch": calls}), json_headers(ws))
    assert r.json()["accepted"] == 3
    container.worker.drain()
    by_anonymous = client.get(
        "/api/v1/profiles/lookup", params={"anonymous_id": "42"}, headers=ws.admin_headers
    )
    assert by_anonymous.status_code == 200, by_anonymous.text
    profile = by_anonymous.json()
    assert profile["user_ids"] == ["u1"]
    assert profile["anonymous_ids"] == ["42"]
    assert profile["event_count"] == 3
    assert [g["group_id"] for g in profile["groups"]] == ["7"]


def test_batch_type_is_case_insensitive(client: TestClient, container: Container, ws: TestWorkspace) -> None:
    r = post(client, "/v1/b", batch(enc({**GOOD_B, "type": "TRACK"})), json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "accepted": 1, "duplicates": 0, "rejected": []}
    assert only_row(container).type == "track"


def test_empty_batch_is_accepted(client: TestClient, container: Container, ws: TestWorkspace) -> None:
    r = post(client, BATCH, b'{"batch":[]}', json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "accepted": 0, "duplicates": 0, "rejected": []}
    assert stored(container) == []


def test_batch_envelope_context_is_merged(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    body = {
        "context": {"library": {"name": "analytics-python"}, "ip": "1.1.1.1"},
        "integrations": {"All": False},
        "unknownTop": 1,
        "batch": [{**GOOD_B, "context": {"ip": "2.2.2.2"}}],
    }
    r = post(client, BATCH, enc(body), json_headers(ws))
    assert r.status_code == 200, r.text
    payload = only_row(container).payload
    assert payload["context"] == {"library": {"name": "analytics-python"}, "ip": "2.2.2.2"}
    assert payload["integrations"] == {"All": False}
    assert "unknownTop" not in payload


# ---------------------------------------------------------------------- timestamps


#: (call fields, batch-level sentAt, expected timestamp, originalTimestamp, sentAt)
TIMESTAMP_CASES = [
    pytest.param({}, None, NOW_ISO, None, None, id="none-means-receivedAt"),
    pytest.param(
        {"timestamp": "2026-11-20T08:30:00Z"},
        None,
        "2026-11-20T08:30:00Z",
        "2026-11-20T08:30:00Z",
        None,
        id="utc",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T13:00:00+02:00"},
        None,
        "2026-11-25T11:00:00Z",
        "2026-11-25T11:00:00Z",
        None,
        id="offset",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T10:00:00"},
        None,
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00Z",
        None,
        id="naive-is-utc",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T10:00:00z"},
        None,
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00Z",
        None,
        id="lowercase-z",
    ),
    pytest.param(
        {"timestamp": " 2026-11-25T10:00:00Z "},
        None,
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00Z",
        None,
        id="padded",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T10:00:00.123Z"},
        None,
        "2026-11-25T10:00:00.123000Z",
        "2026-11-25T10:00:00.123000Z",
        None,
        id="milliseconds",
    ),
    pytest.param(
        {"timestamp": "2026-11-25 10:00:00Z"},
        None,
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00Z",
        None,
        id="space-separator",
    ),
    pytest.param(
        {"timestamp": "20261125T100000Z"},
        None,
        "2026-11-25T10:00:00Z",
        "2026-11-25T10:00:00Z",
        None,
        id="compact-form",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T10:00:00.1234567Z"},
        None,
        "2026-11-25T10:00:00.123456Z",
        "2026-11-25T10:00:00.123456Z",
        None,
        id="7-fraction-digits-truncated",
    ),
    pytest.param(
        {"timestamp": "2026-11-24"},
        None,
        "2026-11-24T00:00:00Z",
        "2026-11-24T00:00:00Z",
        None,
        id="date-only",
    ),
    pytest.param(
        {"timestamp": "2026-11-26T12:00:00Z"},
        None,
        "2026-11-26T12:00:00Z",
        "2026-11-26T12:00:00Z",
        None,
        id="exactly-24h-ahead",
    ),
    pytest.param(
        {"timestamp": "2000-01-01T00:00:00Z"},
        None,
        "2000-01-01T00:00:00Z",
        "2000-01-01T00:00:00Z",
        None,
        id="exactly-year-2000",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T11:00:00Z", "sentAt": "2026-11-25T11:30:00Z"},
        None,
        "2026-11-25T11:30:00Z",
        "2026-11-25T11:00:00Z",
        "2026-11-25T11:30:00Z",
        id="skew-client-behind",
    ),
    pytest.param(
        {"timestamp": "2030-01-01T00:00:00Z", "sentAt": "2030-01-01T00:00:05Z"},
        None,
        "2026-11-25T11:59:55Z",
        "2030-01-01T00:00:00Z",
        "2030-01-01T00:00:05Z",
        id="skew-client-in-2030",
    ),
    pytest.param(
        {"timestamp": "1970-01-01T00:00:00Z", "sentAt": "1970-01-01T00:01:00Z"},
        None,
        "2026-11-25T11:59:00Z",
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:01:00Z",
        id="skew-client-in-1970",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T11:00:00Z"},
        "2026-11-25T11:10:00Z",
        "2026-11-25T11:50:00Z",
        "2026-11-25T11:00:00Z",
        "2026-11-25T11:10:00Z",
        id="skew-batch-sentAt",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T11:00:00Z", "sentAt": "2026-11-25T11:20:00Z"},
        "2026-11-25T11:10:00Z",
        "2026-11-25T11:40:00Z",
        "2026-11-25T11:00:00Z",
        "2026-11-25T11:20:00Z",
        id="call-sentAt-wins",
    ),
    pytest.param(
        {"sentAt": "2026-11-25T11:00:00Z"}, None, NOW_ISO, None, "2026-11-25T11:00:00Z", id="sentAt-only"
    ),
    pytest.param(
        {"timestamp": "2026-11-25T11:00:00Z", "sentAt": None},
        None,
        "2026-11-25T11:00:00Z",
        "2026-11-25T11:00:00Z",
        None,
        id="sentAt-null",
    ),
    pytest.param(
        {"timestamp": "2026-11-25T11:00:00Z", "sentAt": "2026-11-25T10:00:00Z"},
        None,
        "2026-11-25T13:00:00Z",
        "2026-11-25T11:00:00Z",
        "2026-11-25T10:00:00Z",
        id="sentAt-before-timestamp",
    ),
]


@pytest.mark.parametrize(("fields", "batch_sent_at", "timestamp", "original", "sent_at"), TIMESTAMP_CASES)
def test_timestamp_accepted(
    client: TestClient,
    container: Container,
    ws: TestWorkspace,
    fields: dict[str, Any],
    batch_sent_at: str | None,
    timestamp: str,
    original: str | None,
    sent_at: str | None,
) -> None:
    top = enc({"sentAt": batch_sent_at})[1:-1] if batch_sent_at else b""
    r = post(client, BATCH, batch(enc({**GOOD_B, **fields}), top=top), json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1
    row = only_row(container)
    expected = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    assert row.timestamp == expected
    assert row.received_at == NOW
    assert row.payload["timestamp"] == timestamp
    assert row.payload["originalTimestamp"] == original
    assert row.payload["sentAt"] == sent_at
    assert row.payload["receivedAt"] == NOW_ISO


def test_future_limit_follows_the_clock(
    client: TestClient, container: Container, clock: ManualClock, ws: TestWorkspace
) -> None:
    """Refused at 2026-11-25T12:00Z, the same call is accepted once the clock catches up."""
    body = enc({**GOOD_TRACK, "timestamp": "2026-11-27T12:00:00Z"})
    assert_error(post(client, TRACK, body, json_headers(ws)), 400, "timestamp_out_of_range")
    clock.advance(timedelta(days=1))
    r = post(client, TRACK, body, json_headers(ws))
    assert r.status_code == 200, r.text
    assert only_row(container).timestamp == datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------- dedupe


def test_message_id_dedupes_across_requests(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    first = {**GOOD_B, "properties": {"v": 1}}
    second = {**GOOD_B, "properties": {"v": 2}}
    r = post(client, BATCH, batch(enc(first)), json_headers(ws))
    assert r.json() == {"success": True, "accepted": 1, "duplicates": 0, "rejected": []}
    r = post(client, BATCH, batch(enc(second), enc(GOOD_A)), json_headers(ws))
    assert r.json() == {"success": True, "accepted": 1, "duplicates": 1, "rejected": []}
    r = post(client, TRACK, enc(second), json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}
    rows = stored(container)
    assert [x.message_id for x in rows] == ["good-b", "good-a"]
    assert rows[0].payload["properties"] == {"v": 1}  # the first one stored wins


def test_message_id_dedupes_inside_a_batch(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    calls = [
        enc({**GOOD_B, "properties": {"v": 1}}),
        enc({**GOOD_B, "properties": {"v": 2}}),
        enc(GOOD_A),
        enc({**GOOD_A, "messageId": " good-a "}),
    ]
    r = post(client, BATCH, batch(*calls), json_headers(ws))
    assert r.json() == {"success": True, "accepted": 2, "duplicates": 2, "rejected": []}
    rows = stored(container)
    assert [x.message_id for x in rows] == ["good-b", "good-a"]
    assert rows[0].payload["properties"] == {"v": 1}


def test_dedupe_is_per_workspace(client: TestClient, container: Container, ws: TestWorkspace) -> None:
    other = make_workspace(container, "Other")
    for w in (ws, other):
        r = post(client, BATCH, batch(enc(GOOD_B)), json_headers(w))
        assert r.json()["accepted"] == 1
    assert sorted(r.workspace_id for r in stored(container)) == sorted([ws.id, other.id])


def test_rejected_call_does_not_take_its_message_id(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    bad_b = enc({**GOOD_B, "event": None})
    r = post(client, BATCH, batch(enc(GOOD_A), bad_b), json_headers(ws))
    assert r.json()["rejected"][0]["messageId"] == "good-b"
    r = post(client, BATCH, batch(enc(GOOD_B)), json_headers(ws))
    assert r.json() == {"success": True, "accepted": 1, "duplicates": 0, "rejected": []}
    assert stored_ids(container) == ["good-a", "good-b"]


def test_derived_message_id_is_deterministic(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    call_ = {"userId": "u1", "event": "Clicked", "properties": {"b": 1, "a": 2}}
    same_reordered = {"properties": {"a": 2, "b": 1}, "event": "Clicked", "userId": "u1"}
    for body in (call_, same_reordered, {**call_, "sentAt": "2026-11-25T11:59:00Z"}):
        r = post(client, TRACK, enc(body), json_headers(ws))
        assert r.status_code == 200, r.text
    # The same call in a batch (with its type) derives the same id.
    r = post(client, BATCH, batch(enc({**call_, "type": "track"})), json_headers(ws))
    assert r.json() == {"success": True, "accepted": 0, "duplicates": 1, "rejected": []}
    [row] = stored(container)
    assert row.message_id.startswith("wt-")
    assert row.payload["messageId"] == row.message_id
    # Another content, or the same fields as another type of call, is another call.
    r = post(client, TRACK, enc({**call_, "event": "Clicked Twice"}), json_headers(ws))
    assert r.status_code == 200
    r = post(client, "/v1/page", enc(call_), json_headers(ws))
    assert r.status_code == 200
    rows = stored(container)
    assert len({x.message_id for x in rows}) == 3
    assert all(x.message_id.startswith("wt-") for x in rows)


# ------------------------------------------------------------------------ auth (401)


def _key_id(client: TestClient, ws: TestWorkspace, kind: KeyKind) -> str:
    keys = client.get("/api/v1/keys", headers=ws.admin_headers).json()["data"]
    [key] = [k for k in keys if k["kind"] == kind.value]
    assert isinstance(key["id"], str)
    return key["id"]


def _revoke_via_api(client: TestClient, container: Container, ws: TestWorkspace) -> None:
    r = client.delete(f"/api/v1/keys/{_key_id(client, ws, KeyKind.WRITE)}", headers=ws.admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["active"] is False


def _revoke_directly(client: TestClient, container: Container, ws: TestWorkspace) -> None:
    key_id = _key_id(client, ws, KeyKind.WRITE)
    with container.db.write() as conn:
        workspaces.revoke(conn, WorkspaceId(ws.id), key_id, now=container.clock.now())


Setup = Callable[[TestClient, Container, TestWorkspace], None]


def _nothing(client: TestClient, container: Container, ws: TestWorkspace) -> None:
    return None


@dataclass(frozen=True)
class AuthCase:
    #: Builds (Authorization header or None, extra raw members for the body) from the workspace.
    make: Callable[[TestWorkspace], tuple[bytes | None, bytes]]
    setup: Setup = _nothing


def _b64(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


AUTH_FAILURES = [
    pytest.param(AuthCase(lambda w: (None, b"")), id="no-key"),
    pytest.param(AuthCase(lambda w: (basic("wk_nope"), b"")), id="unknown-key"),
    pytest.param(AuthCase(lambda w: (basic(w.write_key + "x"), b"")), id="key-with-extra-char"),
    pytest.param(AuthCase(lambda w: (basic(w.write_key.upper()), b"")), id="key-wrong-case"),
    pytest.param(AuthCase(lambda w: (basic(w.write_key), b""), _revoke_via_api), id="revoked-via-api"),
    pytest.param(AuthCase(lambda w: (basic(w.write_key), b""), _revoke_directly), id="revoked-directly"),
    pytest.param(
        AuthCase(lambda w: (None, enc({"writeKey": w.write_key})[1:-1]), _revoke_directly),
        id="revoked-in-body",
    ),
    pytest.param(AuthCase(lambda w: (basic(w.admin_key), b"")), id="admin-key-as-write-key"),
    pytest.param(AuthCase(lambda w: (None, enc({"writeKey": w.admin_key})[1:-1])), id="admin-key-in-body"),
    pytest.param(AuthCase(lambda w: (b"Bearer " + w.write_key.encode(), b"")), id="bearer-scheme"),
    pytest.param(AuthCase(lambda w: (w.write_key.encode(), b"")), id="no-scheme"),
    pytest.param(AuthCase(lambda w: (b"Basic !!!not-base64", b"")), id="basic-not-base64"),
    pytest.param(
        AuthCase(lambda w: (b"Basic " + base64.b64encode(w.write_key.encode())[:-1], b"")),
        id="basic-bad-padding",
    ),
    pytest.param(AuthCase(lambda w: (b"Basic \xe9\xe9\xe9\xe9", b"")), id="basic-non-ascii"),
    pytest.param(AuthCase(lambda w: (_b64(b"\xff\xfe:"), b"")), id="basic-not-utf8"),
    pytest.param(AuthCase(lambda w: (b"Basic ", b"")), id="basic-empty"),
    pytest.param(AuthCase(lambda w: (_b64(b":" + w.write_key.encode()), b"")), id="basic-key-as-password"),
    pytest.param(AuthCase(lambda w: (_b64(b"\x00:"), b"")), id="basic-nul-user"),
    pytest.param(AuthCase(lambda w: (basic("k" * 5000), b"")), id="basic-huge-key"),
    pytest.param(
        AuthCase(lambda w: (b"Basic !!!", enc({"writeKey": w.write_key})[1:-1])),
        id="malformed-basic-with-body-key",
    ),
    pytest.param(AuthCase(lambda w: (None, b'"writeKey":"wk_nope"')), id="body-unknown-key"),
    pytest.param(AuthCase(lambda w: (None, b'"writeKey":""')), id="body-empty-key"),
    pytest.param(AuthCase(lambda w: (None, b'"writeKey":12345')), id="body-key-number"),
    pytest.param(AuthCase(lambda w: (None, b'"writeKey":{"k":1}')), id="body-key-object"),
    pytest.param(AuthCase(lambda w: (None, b'"writeKey":"\\ud800"')), id="body-key-lone-surrogate"),
    pytest.param(AuthCase(lambda w: (None, b'"writeKey":"wk_\\u0000"')), id="body-key-nul"),
]


@pytest.mark.parametrize("case", AUTH_FAILURES)
def test_unauthorized(client: TestClient, container: Container, ws: TestWorkspace, case: AuthCase) -> None:
    """Refused with 401 on a single call and on a batch; nothing is stored."""
    case.setup(client, container, ws)
    authorization, extra = case.make(ws)
    headers: Headers = [(b"content-type", b"application/json")]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    good = enc(GOOD_B)
    single = good[:-1] + b"," + extra + b"}" if extra else good
    for path, body in ((TRACK, single), (BATCH, batch(good, top=extra))):
        r = post(client, path, body, headers)
        error = assert_error(r, 401, "unauthorized")
        assert "rejected" not in error
        assert r.headers["www-authenticate"]
    assert stored(container) == []


def test_unauthorized_batch_with_key_in_first_call(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    r = post(client, BATCH, batch(enc({**GOOD_B, "writeKey": ws.admin_key})), json_headers(None))
    assert_error(r, 401, "unauthorized")
    assert stored(container) == []


def test_body_errors_come_before_auth(client: TestClient, container: Container) -> None:
    """The write key may be in the body, so an unreadable body is reported as such."""
    r = post(client, TRACK, b"{nope", json_headers(None))
    assert_error(r, 400, "invalid_json")


def test_new_key_works_after_revoking_the_old_one(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    _revoke_via_api(client, container, ws)
    assert_error(post(client, TRACK, enc(GOOD_TRACK), json_headers(ws)), 401, "unauthorized")
    r = client.post("/api/v1/keys", json={"kind": "write"}, headers=ws.admin_headers)
    assert r.status_code == 201, r.text
    headers: Headers = [(b"authorization", basic(r.json()["key"]))]
    assert post(client, TRACK, enc(GOOD_TRACK), headers).status_code == 200
    assert stored_ids(container) == ["m1"]


#: (how the key is given, body and headers) that are accepted
def _ok_basic_with_password(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"authorization", basic(w.write_key, "ignored"))], enc(GOOD_TRACK)


def _ok_basic_lowercase(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"authorization", basic(w.write_key).replace(b"Basic", b"basic"))], enc(GOOD_TRACK)


def _ok_body_key(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"content-type", b"text/plain")], enc({**GOOD_TRACK, "writeKey": w.write_key})


def _ok_basic_wins_over_body(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"authorization", basic(w.write_key))], enc({**GOOD_TRACK, "writeKey": "wk_wrong"})


def _ok_text_plain(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"authorization", basic(w.write_key)), (b"content-type", b"text/plain;charset=UTF-8")], enc(
        GOOD_TRACK
    )


def _ok_form_content_type(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [
        (b"authorization", basic(w.write_key)),
        (b"content-type", b"application/x-www-form-urlencoded"),
    ], enc(GOOD_TRACK)


def _ok_no_content_type(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"authorization", basic(w.write_key))], enc(GOOD_TRACK)


def _ok_gzip_text_plain(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"content-type", b"text/plain"), *GZIP], _gzip(enc({**GOOD_TRACK, "writeKey": w.write_key}))


def _ok_x_gzip_upper(w: TestWorkspace) -> tuple[Headers, bytes]:
    headers: Headers = [(b"authorization", basic(w.write_key)), (b"content-encoding", b" X-GZIP ")]
    return headers, _gzip(enc(GOOD_TRACK))


def _ok_deflate(w: TestWorkspace) -> tuple[Headers, bytes]:
    headers: Headers = [(b"authorization", basic(w.write_key)), (b"content-encoding", b"deflate")]
    return headers, zlib.compress(enc(GOOD_TRACK))


def _ok_gzip_two_members(w: TestWorkspace) -> tuple[Headers, bytes]:
    body = enc(GOOD_TRACK)
    return [(b"authorization", basic(w.write_key)), *GZIP], _gzip(body[:10]) + _gzip(body[10:])


def _ok_identity(w: TestWorkspace) -> tuple[Headers, bytes]:
    return [(b"authorization", basic(w.write_key)), (b"content-encoding", b"identity")], enc(GOOD_TRACK)


def _ok_exact_32kb(w: TestWorkspace) -> tuple[Headers, bytes]:
    body = _padded_track(32 * KB)
    assert len(body) == 32 * KB
    return [(b"authorization", basic(w.write_key))], body


def _ok_gzip_inflating_to_32kb(w: TestWorkspace) -> tuple[Headers, bytes]:
    body = _padded_track(32 * KB)
    return [(b"authorization", basic(w.write_key)), *GZIP], _gzip(body)


ACCEPTED_REQUESTS = [
    pytest.param(_ok_basic_with_password, id="basic-with-password"),
    pytest.param(_ok_basic_lowercase, id="basic-lowercase-scheme"),
    pytest.param(_ok_body_key, id="writeKey-in-body"),
    pytest.param(_ok_basic_wins_over_body, id="basic-wins-over-body-key"),
    pytest.param(_ok_text_plain, id="text-plain"),
    pytest.param(_ok_form_content_type, id="form-content-type"),
    pytest.param(_ok_no_content_type, id="no-content-type"),
    pytest.param(_ok_gzip_text_plain, id="gzip-text-plain-body-key"),
    pytest.param(_ok_x_gzip_upper, id="x-gzip-uppercase"),
    pytest.param(_ok_deflate, id="deflate"),
    pytest.param(_ok_gzip_two_members, id="gzip-two-members"),
    pytest.param(_ok_identity, id="identity"),
    pytest.param(_ok_exact_32kb, id="exactly-32KB"),
    pytest.param(_ok_gzip_inflating_to_32kb, id="gzip-inflating-to-32KB"),
]


@pytest.mark.parametrize("make", ACCEPTED_REQUESTS)
def test_request_accepted(
    client: TestClient,
    container: Container,
    ws: TestWorkspace,
    make: Callable[[TestWorkspace], tuple[Headers, bytes]],
) -> None:
    headers, body = make(ws)
    r = post(client, "/v1/t", body, headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}
    row = only_row(container)
    assert (row.workspace_id, row.message_id, row.user_id, row.event) == (ws.id, "m1", "u1", "Signed Up")
    assert "writeKey" not in row.payload


@pytest.mark.parametrize(
    "top",
    [
        pytest.param(lambda w: enc({"writeKey": w.write_key})[1:-1], id="top-level"),
        pytest.param(lambda w: b"", id="in-first-call"),
    ],
)
def test_batch_write_key_in_body(
    client: TestClient, container: Container, ws: TestWorkspace, top: Callable[[TestWorkspace], bytes]
) -> None:
    first = enc({**GOOD_A, "writeKey": ws.write_key})
    r = post(client, BATCH, batch(first, enc(GOOD_B), top=top(ws)), [(b"content-type", b"text/plain")])
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 2
    assert all("writeKey" not in row.payload for row in stored(container))


# ---------------------------------------------------------------------------- limits


def test_batch_of_exactly_500KB_is_accepted(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    body = _padded_batch(500 * KB)
    assert len(body) == 500 * KB
    r = post(client, BATCH, body, json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 19
    assert len(stored(container)) == 19


def test_batch_of_2500_events_is_accepted(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    calls = [enc({"type": "track", "userId": "u1", "event": "E", "messageId": f"m{i}"}) for i in range(2500)]
    r = post(client, BATCH, batch(*calls), json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "accepted": 2500, "duplicates": 0, "rejected": []}
    assert len(stored(container)) == 2500


def test_call_over_32KB_in_batch_is_rejected_alone(
    client: TestClient, container: Container, ws: TestWorkspace
) -> None:
    big = {**GOOD_B, "messageId": "big", "properties": {"p": "a" * 32 * KB}}
    fits = {**GOOD_A, "properties": {"p": "a" * 31 * KB}}
    r = post(client, BATCH, batch(enc(fits), enc(big)), json_headers(ws))
    assert r.status_code == 200, r.text
    [rejection] = r.json()["rejected"]
    assert (rejection["index"], rejection["code"], rejection["messageId"]) == (1, "event_too_large", "big")
    assert stored_ids(container) == ["good-a"]


# ------------------------------------------------------------------------ rate limit


@pytest.fixture
def limited(db_url: str, clock: ManualClock) -> Iterator[tuple[Container, TestClient]]:
    """An app whose workspaces may send 1 event a second, 3 at once."""
    settings = make_settings(
        db_url, ingest=IngestSettings(rate_limit_events_per_second=1.0, rate_limit_burst=3)
    )
    c = build(settings, clock=clock)
    try:
        with TestClient(create_app(c, run_worker=False)) as tc:
            yield c, tc
    finally:
        c.db.dispose()


def _calls(n: int, prefix: str) -> bytes:
    return batch(*(enc({**GOOD_B, "messageId": f"{prefix}{i}"}) for i in range(n)))


def test_rate_limit_answers_429_with_retry_after(
    limited: tuple[Container, TestClient], clock: ManualClock
) -> None:
    c, client = limited
    ws = make_workspace(c)
    r = post(client, BATCH, _calls(3, "a"), json_headers(ws))
    assert r.json()["accepted"] == 3
    r = post(client, TRACK, enc(GOOD_TRACK), json_headers(ws))
    assert_error(r, 429, "rate_limited")
    assert r.headers["retry-after"] == "1"
    r = post(client, BATCH, _calls(2, "b"), json_headers(ws))
    assert_error(r, 429, "rate_limited")
    assert r.headers["retry-after"] == "2"
    assert stored_ids(c) == ["a0", "a1", "a2"]  # nothing of a refused request is kept

    other = make_workspace(c, "Other")
    assert post(client, TRACK, enc(GOOD_TRACK), json_headers(other)).status_code == 200  # per workspace

    clock.advance(timedelta(seconds=1))
    assert post(client, TRACK, enc(GOOD_TRACK), json_headers(ws)).status_code == 200
    assert sorted(stored_ids(c)) == ["a0", "a1", "a2", "m1", "m1"]


def test_rate_limit_lets_a_batch_larger_than_the_burst_through_once(
    limited: tuple[Container, TestClient], clock: ManualClock
) -> None:
    c, client = limited
    ws = make_workspace(c)
    r = post(client, BATCH, _calls(10, "a"), json_headers(ws))
    assert r.json()["accepted"] == 10
    r = post(client, TRACK, enc(GOOD_TRACK), json_headers(ws))
    assert_error(r, 429, "rate_limited")
    assert r.headers["retry-after"] == "8"  # 10 taken from 3: 7 owed, plus 1 for this call
    clock.advance(timedelta(seconds=8))
    assert post(client, TRACK, enc(GOOD_TRACK), json_headers(ws)).status_code == 200


def test_rate_limit_counts_accepted_calls_only(limited: tuple[Container, TestClient]) -> None:
    c, client = limited
    ws = make_workspace(c)
    calls = [enc(GOOD_B), b"null", b"5", enc(call(event=DROP)), enc(call(userId=DROP))]
    r = post(client, BATCH, batch(*calls), json_headers(ws))
    assert r.json()["accepted"] == 1
    assert len(r.json()["rejected"]) == 4
    r = post(client, BATCH, _calls(2, "b"), json_headers(ws))
    assert r.json()["accepted"] == 2  # 3 - 1 - 2 = 0 left, not refused


def test_invalid_requests_are_refused_before_the_rate_limit(limited: tuple[Container, TestClient]) -> None:
    c, client = limited
    ws = make_workspace(c)
    assert post(client, BATCH, _calls(3, "a"), json_headers(ws)).json()["accepted"] == 3
    assert_error(post(client, TRACK, b"{", json_headers(ws)), 400, "invalid_json")
    assert_error(post(client, TRACK, enc(GOOD_TRACK), json_headers(None)), 401, "unauthorized")
    assert_error(post(client, TRACK, enc(GOOD_TRACK), json_headers(ws)), 429, "rate_limited")


# --------------------------------------------------------------- routing and methods


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        pytest.param("GET", "/v1/track", 405, "method_not_allowed", id="get-track"),
        pytest.param("PUT", "/v1/batch", 405, "method_not_allowed", id="put-batch"),
        pytest.param("DELETE", "/v1/i", 405, "method_not_allowed", id="delete-identify"),
        pytest.param("POST", "/v1/nope", 404, "not_found", id="unknown-call"),
        pytest.param("POST", "/v2/track", 404, "not_found", id="unknown-version"),
    ],
)
def test_routing_errors(
    client: TestClient, ws: TestWorkspace, method: str, path: str, status: int, code: str
) -> None:
    r = client.request(method, path, content=enc(GOOD_TRACK), headers=json_headers(ws))
    assert_error(r, status, code)


@pytest.mark.parametrize(
    ("path", "type_"),
    [
        ("/v1/identify", "identify"),
        ("/v1/i", "identify"),
        ("/v1/track", "track"),
        ("/v1/t", "track"),
        ("/v1/page", "page"),
        ("/v1/p", "page"),
        ("/v1/screen", "screen"),
        ("/v1/s", "screen"),
        ("/v1/group", "group"),
        ("/v1/g", "group"),
        ("/v1/alias", "alias"),
        ("/v1/a", "alias"),
    ],
)
def test_every_single_endpoint_validates_and_stores(
    client: TestClient, container: Container, ws: TestWorkspace, path: str, type_: str
) -> None:
    assert_error(post(client, path, b'{"messageId":"m1"}', json_headers(ws)), 400, "missing_identity")
    body = {"userId": "u1", "previousId": "a1", "groupId": "g1", "event": "E", "messageId": "m1"}
    r = post(client, path, enc(body), json_headers(ws))
    assert r.status_code == 200, r.text
    assert only_row(container).type == type_


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/b", "/v1/import"])
def test_every_batch_endpoint_keeps_good_calls(
    client: TestClient, container: Container, ws: TestWorkspace, path: str
) -> None:
    r = post(client, path, batch(enc(GOOD_A), b"null", enc(GOOD_B)), json_headers(ws))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 2
    assert stored_ids(container) == ["good-a", "good-b"]
