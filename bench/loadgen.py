"""Load generation against 127.0.0.1: a minimal HTTP/1.1 keep-alive client and two drivers.

The client is a few lines over asyncio streams (uvloop when installed) rather than httpx:
on a 2-core machine the load generator shares the CPU with the server, and an HTTP
library that costs several times more per request would cap what we can measure (see
docs/benchmarks.md). It speaks just enough HTTP/1.1 for the server under test: requests
with a body, responses with a ``Content-Length``.

Drivers:

* :func:`closed_loop` keeps ``concurrency`` requests in flight, each connection sending
  its next request when the previous answer arrived, until the deadline.
* :func:`open_loop` sends on a fixed schedule (``rate`` per second) whatever the server
  does, and measures each latency from the *scheduled* send time, so a stall counts for
  every request it delays (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import orjson

T = TypeVar("T")

#: Makes the body of the next request.
BodyFactory = Callable[[], bytes]


class ProtocolError(Exception):
    pass


class Client:
    """Where to send requests and with which write key."""

    def __init__(self, host: str, port: int, write_key: str) -> None:
        self.host = host
        self.port = port
        auth = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
        self._head = (
            f"Host: {host}:{port}\r\nAuthorization: Basic {auth}\r\n"
            "Content-Type: application/json\r\nUser-Agent: whenthen-bench\r\n"
        ).encode("ascii")

    def request_bytes(self, path: str, body: bytes) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\n".encode("ascii")
            + self._head
            + f"Content-Length: {len(body)}\r\n\r\n".encode("ascii")
            + body
        )

    async def connect(self) -> Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return Connection(reader, writer)

    async def connections(self, count: int) -> list[Connection]:
        return list(await asyncio.gather(*(self.connect() for _ in range(count))))


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one request; return the status and body of its response."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 "):
            raise ProtocolError(f"unexpected response: {head[:80]!r}")
        status = int(head[9:12])
        length: int | None = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
                break
        if length is None:
            raise ProtocolError("response without Content-Length")
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@dataclass
class Outcome:
    """What one load phase did."""

    name: str
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "429", "500", "timeout", ...
    events: int = 0  # events the server reported as stored
    scheduled: int = 0  # open loop: requests on the schedule

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def requests_per_second(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100); NaN when there is no value."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _stored(status: int, body: bytes, single: bool) -> int:
    """Events a 200 response says were stored (batch: ``accepted``; single: 1)."""
    if single:
        return 1
    parsed = orjson.loads(body)
    if parsed.get("rejected"):
        raise ProtocolError(f"the server rejected calls: {parsed['rejected'][:1]}")
    return int(parsed["accepted"])


async def closed_loop(
    client: Client, path: str, make_body: BodyFactory, *, concurrency: int, seconds: float, name: str
) -> Outcome:
    """``concurrency`` connections each sending back to back until ``seconds`` have passed."""
    out = Outcome(name)
    single = path != "/v1/batch"
    conns = await client.connections(concurrency)
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            request = client.request_bytes(path, make_body())
            sent = time.perf_counter()
            status, body = await conn.send(request)
            out.requests += 1
            if status == 200:
                out.ok += 1
                out.events += _stored(status, body, single)
                out.latencies.append(time.perf_counter() - sent)
            else:
                out.error(str(status))

    try:
        await _bounded(asyncio.gather(*(worker(c) for c in conns)), seconds + 30)
        out.elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return out


async def open_loop(
    client: Client,
    path: str,
    make_body: BodyFactory,
    *,
    rate: float,
    seconds: float,
    connections: int,
    name: str,
    drain_seconds: float = 10.0,
) -> Outcome:
    """Send ``rate`` requests per second for ``seconds``; latency from the scheduled time.

    Requests wait for a free connection of the pool when all are busy; that wait is part
    of their latency. Requests still unanswered ``drain_seconds`` after the schedule
    ended count as errors ("timeout").
    """
    out = Outcome(name)
    single = path != "/v1/batch"
    total = int(rate * seconds)
    out.scheduled = total
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    conns = await client.connections(connections)
    for c in conns:
        pool.put_nowait(c)
    requests = [client.request_bytes(path, make_body()) for _ in range(total)]
    tasks: list[asyncio.Task[None]] = []

    async def one(request: bytes, due: float) -> None:
        conn = await pool.get()
        try:
            status, body = await conn.send(request)
        except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
            out.error(type(exc).__name__)
            await conn.close()
            fresh = await client.connect()
            conns.append(fresh)
            pool.put_nowait(fresh)
            return
        pool.put_nowait(conn)
        out.requests += 1
        if status == 200:
            out.ok += 1
            out.events += _stored(status, body, single)
            out.latencies.append(time.perf_counter() - due)
        else:
            out.error(str(status))

    start = time.perf_counter() + 0.05
    try:
        for i, request in enumerate(requests):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request, due)))
        unfinished = [t for t in tasks if not t.done()]
        if unfinished:
            await asyncio.wait(unfinished, timeout=drain_seconds)
        out.elapsed = time.perf_counter() - start
        for task in tasks:
            if not task.done():
                task.cancel()
                out.error("timeout")
            elif task.exception() is not None:
                out.error(type(task.exception()).__name__)
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return out


async def _bounded(awaitable: Awaitable[T], limit: float) -> T:
    return await asyncio.wait_for(awaitable, timeout=limit)
