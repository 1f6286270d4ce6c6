"""Building a marketing email: tracked links, open pixel, unsubscribe link and headers. Pure.

* Every ``http(s)`` link in the HTML ``href`` attributes and in the text part is rewritten
  to ``{public_url}/t/c/{token}``; the token carries the original URL, signed (for HTML,
  the URL the browser would follow: character references such as ``&amp;`` decoded).
  Other links (``mailto:``, ``#anchors``, relative) are left as they are.
* An open pixel ``{public_url}/t/o/{token}`` is added to the HTML.
* Marketing mail carries ``List-Unsubscribe`` (an HTTPS URL) and
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058), and a visible
  unsubscribe link: ``{{ unsubscribe_url }}`` in the template, or a footer added when the
  template does not use it. Transactional mail (``marketing=False``) gets neither: an
  unsubscribe does not stop it, so offering one would mislead.
* ``Message-ID`` is derived from the message id, so a retry (or the rare duplicate after a
  crash) carries the same id and mail clients can fold the copies together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, formatdate
from html import escape, unescape
from urllib.parse import urlsplit

from whenthen.messaging.links import sign

_HREF = re.compile(r"""(href\s*=\s*)(["'])(https?://[^"'\s>]+)\2""", re.IGNORECASE)
_TEXT_URL = re.compile(r"""https?://[^\s<>"']+""")
#: Punctuation that ends a sentence rather than a URL ("see https://x.com/a.").
_TRAILING = ".,;:!?"


@dataclass(frozen=True, slots=True)
class Addressing:
    public_url: str
    secret: bytes
    workspace_id: str
    profile_id: str
    message_id: str

    def token(self, kind: str, url: str | None = None) -> str:
        payload = {"k": kind, "w": self.workspace_id, "p": self.profile_id, "m": self.message_id}
        if url is not None:
            payload["u"] = url
        return sign(self.secret, payload)

    def link(self, kind: str, url: str | None = None) -> str:
        letter = {"click": "c", "open": "o", "unsubscribe": "u"}[kind]
        return f"{self.public_url.rstrip('/')}/t/{letter}/{self.token(kind, url)}"


@dataclass(frozen=True, slots=True)
class BuiltEmail:
    message: EmailMessage
    links: tuple[str, ...]


def unsubscribe_url(a: Addressing) -> str:
    return a.link("unsubscribe")


def rewrite_html(html: str, a: Addressing, links: list[str], *, footer: bool = True) -> str:
    unsubscribe = unsubscribe_url(a)
    prefix = a.public_url.rstrip("/") + "/t/"

    def repl(m: re.Match[str]) -> str:
        url = unescape(m.group(3))  # the URL a browser follows: "&amp;" is "&"
        if url.startswith(prefix) or not _has_host(url):
            return m.group(0)
        links.append(url)
        return f"{m.group(1)}{m.group(2)}{escape(a.link('click', url))}{m.group(2)}"

    out = _HREF.sub(repl, html)
    if footer and unescape(unsubscribe) not in unescape(out):
        out = _append_html(
            out, f'<p style="font-size:12px;color:#888"><a href="{escape(unsubscribe)}">Unsubscribe</a></p>'
        )
    pixel = f'<img src="{escape(a.link("open"))}" width="1" height="1" alt="" style="display:none">'
    return _append_html(out, pixel)


def _append_html(html: str, snippet: str) -> str:
    idx = html.lower().rfind("</body>")
    if idx == -1:
        return html + snippet
    return html[:idx] + snippet + html[idx:]


def _has_host(url: str) -> bool:
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket: not a link we can redirect to
        return False


def _split_url(candidate: str) -> tuple[str, str]:
    """The URL at the start of ``candidate`` and the text after it: sentence punctuation
    and unbalanced closing brackets at the end are not part of the URL."""
    url = candidate
    while url:
        last = url[-1]
        if (
            last in _TRAILING
            or (last == ")" and url.count("(") < url.count(")"))
            or (last == "]" and url.count("[") < url.count("]"))
        ):
            url = url[:-1]
        else:
            break
    return url, candidate[len(url) :]


def rewrite_text(text: str, a: Addressing, links: list[str], *, footer: bool = True) -> str:
    unsubscribe = unsubscribe_url(a)
    prefix = a.public_url.rstrip("/") + "/t/"

    def repl(m: re.Match[str]) -> str:
        url, rest = _split_url(m.group(0))
        if url.startswith(prefix) or not _has_host(url):
            return m.group(0)
        links.append(url)
        return a.link("click", url) + rest

    out = _TEXT_URL.sub(repl, text)
    if footer and unsubscribe not in out:
        out = out.rstrip("\n") + f"\n\n--\nUnsubscribe: {unsubscribe}\n"
    return out


def build_email(
    *,
    a: Addressing,
    sender: str,
    recipient: str,
    subject: str,
    html: str | None,
    text: str | None,
    reply_to: str | None,
    marketing: bool,
    now: datetime | None = None,
) -> BuiltEmail:
    links: list[str] = []
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject.replace("\r", " ").replace("\n", " ")
    msg["Date"] = format_datetime(now) if now is not None else formatdate(localtime=False)
    msg["Message-ID"] = f"<{a.message_id}@{_domain(sender)}>"
    msg["X-Whenthen-Message-Id"] = a.message_id
    if reply_to:
        msg["Reply-To"] = reply_to
    if marketing:
        msg["List-Unsubscribe"] = f"<{unsubscribe_url(a)}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    text_body = rewrite_text(text, a, links, footer=marketing) if text else None
    html_body = rewrite_html(html, a, links, footer=marketing) if html else None
    if text_body is not None:
        msg.set_content(text_body)
        if html_body is not None:
            msg.add_alternative(html_body, subtype="html")
    else:
        assert html_body is not None
        msg.set_content(html_body, subtype="html")
    return BuiltEmail(message=msg, links=tuple(dict.fromkeys(links)))


def _domain(sender: str) -> str:
    """The domain of the From address (for Message-ID), or a local placeholder."""
    address = sender.rsplit("<", 1)[-1].strip(" >")
    domain = address.rsplit("@", 1)[-1] if "@" in address else ""
    return domain if re.fullmatch(r"[A-Za-z0-9.-]+", domain) else "whenthen.local"
