"""Building one email: the ``email`` package's builder (before) against the bytes written
directly (after), per email, in this process.

    python -m bench.email_build                 # ~10 s
    python -m bench.email_build --rounds 9 --n 1000

*Before* is ``tests/support/email_reference.py``: the old ``build_email`` (an
``EmailMessage`` filled header by header, ``set_content``/``add_alternative``) plus the
old ``adapters.smtp.serialise`` (envelope from the headers, ``as_bytes`` with the SMTP
policy): what the dispatcher did per email until then. *After* is
``whenthen.messaging.email.build_email``, whose result holds the envelope and the bytes
handed to the SMTP server. Both include the same link rewriting and token signing (shown
alone as ``rewrite only``). Three messages: the journeys bench's (``Ping`` subject, short
text), a marketing email (HTML of ~4 KB with 12 links, text part, accents), and one with
a non-ASCII subject and display name in CJK (base64 parts).

The two run interleaved, ``--rounds`` times ``--n`` emails each; the median round is
printed (the machine is shared: read the ratio).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tests.support.email_reference import reference_build, reference_serialise

from whenthen.messaging.email import Addressing, build_email, rewrite_html, rewrite_text

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)

_LINKS = "".join(
    f'<tr><td><a href="https://shop.example.com/p/{i}?utm_source=mail&amp;utm_campaign=autumn">'
    f"Produit n°{i}: une très belle théière</a> à 2{i},90 €</td></tr>\n"
    for i in range(12)
)
MARKETING_HTML = (
    "<!doctype html><html><head><meta charset='utf-8'><style>td{font-family:sans-serif}</style></head>"
    "<body><table width='600'>\n<tr><td><h1>Bonjour Zoë,</h1><p>Votre panier vous attend. "
    + "Nous avons sélectionné pour vous quelques idées de cadeaux. " * 8
    + "</p></td></tr>\n"
    + _LINKS
    + "<tr><td><a href='{{ unsubscribe_url }}'>Se désabonner</a></td></tr></table></body></html>"
)
MARKETING_TEXT = "Bonjour Zoë,\n\nVotre panier vous attend: https://shop.example.com/cart?id=c-1\n" + "".join(
    f"- Produit {i}: https://shop.example.com/p/{i}\n" for i in range(12)
)

CASES: dict[str, dict[str, Any]] = {
    "journeys bench (Ping)": {
        "sender": "whenthen <noreply@localhost>",
        "recipient": "user1234@example.com",
        "subject": "Ping e-000123",
        "html": None,
        "text": "Hello user1234@example.com, this is ping e-000123.",
        "reply_to": None,
        "marketing": True,
    },
    "marketing, 4 KB HTML + text": {
        "sender": "La Boutique <news@shop.example.com>",
        "recipient": "zoe.martin@example.com",
        "subject": "Zoë, votre panier vous attend — -10 % ce week-end",
        "html": MARKETING_HTML,
        "text": MARKETING_TEXT,
        "reply_to": "service@shop.example.com",
        "marketing": True,
    },
    "CJK subject and name": {
        "sender": "商店 <shop@example.com>",
        "recipient": "wang@example.com",
        "subject": "您好, 您的购物车还在等您 ☕",
        "html": "<p>" + "您好, 欢迎回来。" * 40 + "<a href='https://shop.example.com/c'>购物车</a></p>",
        "text": "您好, 欢迎回来。" * 40 + "\nhttps://shop.example.com/c",
        "reply_to": None,
        "marketing": True,
    },
}


def _addressing(i: int) -> Addressing:
    return Addressing(
        public_url="http://127.0.0.1:8000",
        secret=b"bench-secret-key-bench-secret-key",
        workspace_id="ws_bench",
        profile_id=f"prf_{i:06d}",
        message_id=f"msg_{i:024x}",
    )


def before(a: Addressing, case: dict[str, Any]) -> bytes:
    message, _ = reference_build(a=a, now=NOW, **case)
    return reference_serialise(message)[2]


def after(a: Addressing, case: dict[str, Any]) -> bytes:
    return build_email(a=a, now=NOW, **case).outgoing.data


def rewrite_only(a: Addressing, case: dict[str, Any]) -> bytes:
    links: list[str] = []
    text = rewrite_text(case["text"], a, links) if case["text"] else ""
    html = rewrite_html(case["html"], a, links) if case["html"] else ""
    return (text + html).encode()


def _round(fn: Callable[[Addressing, dict[str, Any]], bytes], case: dict[str, Any], n: int) -> float:
    people = [_addressing(i) for i in range(n)]
    gc.collect()
    start = time.perf_counter()
    for a in people:
        fn(a, case)
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median printed)")
    p.add_argument("--n", type=int, default=300, help="emails per round and variant")
    args = p.parse_args(argv)
    print(
        f"{'message':<30} {'before µs':>10} {'after µs':>9} {'ratio':>6} {'rewrite only µs':>16} {'bytes':>6}"
    )
    for name, case in CASES.items():
        for fn in (before, after, rewrite_only):  # warm caches and imports
            fn(_addressing(0), case)
        times: dict[str, list[float]] = {"before": [], "after": [], "rewrite": []}
        for _ in range(args.rounds):
            times["before"].append(_round(before, case, args.n))
            times["after"].append(_round(after, case, args.n))
            times["rewrite"].append(_round(rewrite_only, case, args.n))
        b, a, r = (statistics.median(times[k]) * 1e6 for k in ("before", "after", "rewrite"))
        size = len(after(_addressing(0), case))
        print(f"{name:<30} {b:>10.0f} {a:>9.0f} {b / a:>5.1f}x {r:>16.0f} {size:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
