"""Webhook calls over httpx, with a guard against private and loopback addresses."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from whenthen.messaging.ports import WebhookResult


def is_private_host(host: str) -> bool:
    """Whether ``host`` is (or resolves to) a private, loopback, link-local or reserved address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast:
            return True
        if addr.is_unspecified:
            return True
    return False


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
            response = self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return WebhookResult(status=None, body=None, error=f"{type(exc).__name__}: {exc}")
        parsed: Any
        try:
            parsed = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            parsed = response.text[:2000]
        return WebhookResult(status=response.status_code, body=parsed, error=None)

    def close(self) -> None:
        self.client.close()
