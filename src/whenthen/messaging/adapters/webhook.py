"""Webhook calls over httpx, with a guard against private and loopback addresses."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import orjson

from whenthen.messaging.ports import WebhookResult

#: The most of an answer that is read (and kept in the message log); the rest is dropped.
MAX_RESPONSE_BYTES = 1024 * 1024


def _is_internal(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (
        not addr.is_global  # private, shared (100.64/10, carrier NAT), documentation, ...
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_reserved
        or addr.is_multicast
        or addr.is_unspecified
    )


Resolve = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (the system resolver), in its order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))


def is_private_host(host: str, resolver: Resolve = resolve) -> bool:
    """Whether ``host`` is (or resolves to) an address that is not public: private,
    loopback, link-local, shared (carrier-grade NAT), reserved, multicast or unspecified."""
    return any(_is_internal(ipaddress.ip_address(a)) for a in _addresses(host, 0, resolver))


def _addresses(host: str, port: int, resolver: Resolve) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]  # a literal address
    except ValueError:
        return resolver(host, port)


class PrivateAddress(Exception):
    """The webhook's host is, or resolves to, an address that is not public."""


class GuardedBackend(httpcore.SyncBackend):
    """Opens connections to public addresses only, deciding on the address it connects
    to: the host is resolved here, every address is checked, and the socket is opened to
    a checked address. A name that resolves to a public address when the call is checked
    and to a private one when it connects (DNS rebinding) cannot reach inside. TLS still
    names and verifies the host, not the address (httpcore passes the host for SNI)."""

    def __init__(self, resolver: Resolve = resolve) -> None:
        self.resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = _addresses(host, port, self.resolver)
        if not addresses:
            raise httpcore.ConnectError(f"{host} does not resolve")
        if any(_is_internal(ipaddress.ip_address(a)) for a in addresses):
            raise PrivateAddress(f"refused: {host} is a private address")
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:  # the next address, as create_connection does
                error = exc
        assert error is not None
        raise error


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's transport over a connection pool whose sockets ``GuardedBackend`` opens."""

    def __init__(self, backend: GuardedBackend) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


class HttpxWebhookCaller:
    """POSTs webhooks. Unless ``allow_private``, a host that is or resolves to an address
    that is not public is refused: before the call, for a clear permanent error, and
    again where the socket is opened (``GuardedBackend``), which is what holds. Proxies
    from the environment are not used (``trust_env=False``): the guard must see the
    address the call goes to."""

    def __init__(self, *, timeout: float, allow_private: bool, resolver: Resolve = resolve) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        transport = None if allow_private else _GuardedTransport(GuardedBackend(resolver))
        self.client = httpx.Client(
            timeout=timeout, follow_redirects=False, trust_env=False, transport=transport
        )

    def call(self, url: str, body: bytes, headers: dict[str, str]) -> WebhookResult:
        host = urlsplit(url).hostname or ""
        if not self.allow_private and is_private_host(host, self.resolver):
            return _refused(host)
        try:
            with self.client.stream("POST", url, content=body, headers=headers) as response:
                content = _read_capped(response)
        except PrivateAddress:
            return _refused(host)
        except httpx.HTTPError as exc:
            return WebhookResult(status=None, body=None, error=f"{type(exc).__name__}: {exc}")
        parsed: Any
        try:
            parsed = orjson.loads(content) if content else None
        except orjson.JSONDecodeError:
            parsed = content[:2000].decode("utf-8", "replace")
        return WebhookResult(status=response.status_code, body=parsed, error=None)

    def close(self) -> None:
        self.client.close()


def _refused(host: str) -> WebhookResult:
    return WebhookResult(
        status=None, body=None, error=f"refused: {host} is a private address", permanent=True
    )


def _read_capped(response: httpx.Response) -> bytes:
    """The answer's body, at most MAX_RESPONSE_BYTES of it (a huge answer is cut, not held)."""
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            return bytes(data[:MAX_RESPONSE_BYTES])
    return bytes(data)
