"""The events the bench sends: Segment ``track`` calls shaped like analytics-python's.

Every call has a unique ``messageId`` (``<run>-<n>``), so nothing is dropped as a
duplicate, and about 500 bytes of JSON: a few properties and a typical context.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

EVENT_NAMES = ("Product Viewed", "Product Added", "Checkout Started", "Order Completed", "Signed In")
USERS = 5000
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
)


def iso_now() -> str:
    """The current UTC time in the ISO 8601 form Segment libraries send."""
    now = time.time()
    millis = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"


class Workload:
    """Makes calls with unique message ids; ``run`` keeps ids apart between runs."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.counter = 0
        self.timestamp = iso_now()

    def call(self) -> dict[str, Any]:
        n = self.counter
        self.counter += 1
        product = n % 997
        call: dict[str, Any] = {
            "type": "track",
            "event": EVENT_NAMES[n % len(EVENT_NAMES)],
            "messageId": f"{self.run}-{n}",
            "timestamp": self.timestamp,
            "properties": {
                "product_id": f"sku-{product}",
                "name": f"Product {product}",
                "price": 9.99 + n % 50,
                "currency": "EUR",
                "quantity": 1 + n % 3,
                "category": "shoes",
            },
            "context": {
                "library": {"name": "analytics-python", "version": "2.3.3"},
                "ip": "203.0.113.7",
                "userAgent": USER_AGENT,
                "page": {"path": f"/products/{product}", "referrer": "https://example.com/"},
            },
        }
        if n % 4 == 0:
            call["anonymousId"] = f"anon-{n % (USERS * 4)}"
        else:
            call["userId"] = f"user-{n % USERS}"
        return call

    def batch_body(self, size: int) -> bytes:
        """A ``/v1/batch`` body of ``size`` calls."""
        return orjson.dumps({"batch": [self.call() for _ in range(size)], "sentAt": self.timestamp})

    def track_body(self) -> bytes:
        """A ``/v1/track`` body: one call, its type given by the path."""
        call = self.call()
        del call["type"]
        call["sentAt"] = self.timestamp
        return orjson.dumps(call)
