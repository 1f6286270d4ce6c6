"""Webhook calls over httpx, with a guard against private and loopback addresses."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

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


def is_private_host(host: str) -> bool:
    """Whether ``host`` is (or resolves to) an address that is not public: private,
    loopback, link-local, shared (carrier-grade NAT), reserved, multicast or unspecified."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return any(_is_internal(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])) for info in infos)


class HttpxWebhookCaller:
    def __init__(self, *, timeout: float, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.client = httpx.Client(timeout=timeout, follow_redirects=False)

    def call(self, url: str, body: bytes, headers: dict[str, str]) -> WebhookResult:
        host = urlsplit(url).hostname or ""
        if not self.allow_private and is_private_host(host):
            return WebhookResult(
                status=None, body=None, error=f"refused: {host} is a private address", permanent=True
            )
        try:
            with self.client.stream("POST", url, content=body, headers=headers) as response:
                content = _read_capped(response)
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


def _read_capped(response: httpx.Response) -> bytes:
    """The answer's body, at most MAX_RESPONSE_BYTES of it (a huge answer is cut, not held)."""
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            return bytes(data[:MAX_RESPONSE_BYTES])
    return bytes(data)
