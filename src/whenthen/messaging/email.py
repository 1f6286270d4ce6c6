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

The message is written as bytes directly (``BuiltEmail.outgoing``: envelope and data, what
the SMTP server is given), not through ``email.message.EmailMessage``, which parses every
header it is set and cost ~2.4 ms an email (1.7 ms for the journeys bench's short email,
against ~0.06 ms now: ``python -m bench.email_build``). The format is fixed: the headers
above, then one text part or ``multipart/alternative`` (text, then HTML), UTF-8, CRLF.

* Headers: ASCII values as they are; a non-ASCII subject as RFC 2047 encoded words (base64
  of UTF-8, at most 75 characters each, folded); a line break in the subject becomes a
  space (no header injection). Addresses other than a plain ``local@domain``, message ids
  of another shape and values already holding ``=?`` are written by the ``email``
  package's header classes exactly as before (cached: a journey's From is the same for
  every message). Lines are at most 998 characters (``List-Unsubscribe`` is never folded:
  see adapters/smtp.py).
* Parts: 7bit when ASCII in lines of up to 78 characters, else quoted-printable, or base64
  when shorter; never 8bit, so servers without 8BITMIME take them. (The ``email`` package
  chose 8bit for non-ASCII text in short lines.)
* A non-ASCII address (SMTPUTF8) makes the headers UTF-8 as they are (RFC 6532), written
  by the ``email`` package's SMTPUTF8 policy as before.
* tests/unit/test_email_wire.py checks, on generated inputs, that a reader gets the same
  headers, parts and envelope as from the old builder (tests/support/email_reference.py).
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, formatdate
from functools import cached_property, lru_cache
from html import escape, unescape
from typing import Any, NamedTuple
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


class Outgoing(NamedTuple):
    """What the SMTP server is given: the envelope, the bytes (CRLF line ends, lines of at
    most 998 characters, 7-bit unless ``smtputf8``) and whether SMTPUTF8 is needed (an
    address that is not ASCII: then headers are UTF-8, as RFC 6532 allows)."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool


@dataclass(frozen=True)
class BuiltEmail:
    outgoing: Outgoing
    #: The parts as a reader decodes them (``"\n"`` line ends); ``None`` when absent.
    text: str | None
    html: str | None
    links: tuple[str, ...]

    @cached_property
    def message(self) -> EmailMessage:
        """The message parsed back with the ``email`` package (for tests and senders that
        take an ``EmailMessage``; the dispatcher hands ``outgoing`` to the SMTP sender)."""
        parsed = email.message_from_bytes(self.outgoing.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@lru_cache(maxsize=8)
def _date(now: datetime) -> str:
    """The Date header's value: a dispatcher batch builds all its messages at one ``now``."""
    return format_datetime(now)


@lru_cache(maxsize=256)
def unsubscribe_url(a: Addressing) -> str:
    """The message's one-click unsubscribe link (kept for the few calls that follow: the
    template's ``unsubscribe_url``, the footer and ``List-Unsubscribe`` each ask)."""
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

    out = _sub_hrefs(repl, html)
    if footer and unescape(unsubscribe) not in unescape(out):
        out = _append_html(
            out, f'<p style="font-size:12px;color:#888"><a href="{escape(unsubscribe)}">Unsubscribe</a></p>'
        )
    pixel = f'<img src="{escape(a.link("open"))}" width="1" height="1" alt="" style="display:none">'
    return _append_html(out, pixel)


def _sub_hrefs(repl: Callable[[re.Match[str]], str], html: str) -> str:
    """``_HREF.sub(repl, html)``, the regex tried only where ``href`` starts (in any case).
    Scanning a whole body in the regex's case-insensitive mode cost ~8 us a kilobyte
    (180 us for a 22 KB marketing email); the lower-cased text's ``find`` and a ``match``
    per occurrence cost a tenth of that. Every match of ``_HREF`` starts with ``href`` in
    some case, and no other character matches those letters case-insensitively, so the
    matches are the same. When lower-casing changes the text's length (``İ`` becomes two
    characters) positions would drift: then the regex scans as before."""
    lower = html.lower()
    if len(lower) != len(html):
        return _HREF.sub(repl, html)
    pos = lower.find("href")
    if pos == -1:
        return html
    out: list[str] = []
    last = 0
    while pos != -1:
        m = _HREF.match(html, pos)
        if m is None:
            pos = lower.find("href", pos + 1)
            continue
        out.append(html[last:pos])
        out.append(repl(m))
        last = m.end()
        pos = lower.find("href", last)
    out.append(html[last:])
    return "".join(out)


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
    """The message as it goes to the SMTP server (see the module's docstring)."""
    links: list[str] = []
    text_body = rewrite_text(text, a, links, footer=marketing) if text else None
    html_body = rewrite_html(html, a, links, footer=marketing) if html else None
    if text_body is None and html_body is None:
        # Both templates rendered empty: still a message, with its unsubscribe footer.
        text_body = rewrite_text("", a, links, footer=marketing)
    from_addresses = _addresses("From", sender)
    to_addresses = _addresses("To", recipient)
    envelope_from = from_addresses[0] if from_addresses else ""
    utf8 = not (envelope_from + "".join(to_addresses)).isascii()

    head = [
        _address_header("From", sender, utf8),
        _address_header("To", recipient, utf8),
        _unstructured("Subject", _LINE_BREAKS.sub(" ", subject), utf8),
        b"Date: %s\r\n" % (_date(now) if now is not None else formatdate(localtime=False)).encode(),
        _message_id(f"<{a.message_id}@{_domain(sender)}>", utf8),
        _unstructured("X-Whenthen-Message-Id", a.message_id, utf8),
    ]
    if reply_to:
        head.append(_address_header("Reply-To", reply_to, utf8))
    if marketing:
        head.append(_unstructured("List-Unsubscribe", f"<{unsubscribe_url(a)}>", utf8))
        head.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    head.append(b"MIME-Version: 1.0\r\n")

    parts = [_Part.of("plain", text_body), _Part.of("html", html_body)]
    present = [p for p in parts if p is not None]
    if len(present) == 1:
        [part] = present
        data = b"".join(head) + part.headers + b"\r\n" + part.data
    else:
        boundary = _boundary(a.message_id, present)
        delimiter = b"--" + boundary
        body = [b"".join(head), b'Content-Type: multipart/alternative; boundary="%s"\r\n\r\n' % boundary]
        for part in present:
            body += [delimiter, b"\r\n", part.headers, b"\r\n", part.data, b"\r\n"]
        body += [delimiter, b"--\r\n"]
        data = b"".join(body)
    return BuiltEmail(
        outgoing=Outgoing(envelope_from, to_addresses, data, utf8),
        text=parts[0].content if parts[0] is not None else None,
        html=parts[1].content if parts[1] is not None else None,
        links=tuple(dict.fromkeys(links)),
    )


# ---- writing the message -------------------------------------------------------------

#: What a reader takes for the end of a header line (``str.splitlines``): never sent
#: inside a header value.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
#: A plain address (dot-atom local part and domain), written and used as it is.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)
_PLAIN_MESSAGE_ID = re.compile(r"<[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>")
#: Headers the fast paths do not cover are written as ``email.policy`` writes them (the
#: SMTP policy, lines up to 998 characters: see adapters/smtp.py on List-Unsubscribe).
_POLICIES = {
    False: email.policy.SMTP.clone(max_line_length=998),
    True: email.policy.SMTPUTF8.clone(max_line_length=998),
}
#: Encoded words (RFC 2047) of at most 39 bytes of UTF-8: 64 characters, so that even
#: ``Subject: `` and the first word fit in 78.
_WORD_BYTES = 39
_ASCII = bytes(range(128))
_LONG_LINE = re.compile(rb"[^\n]{79}")


@lru_cache(maxsize=4096)
def _parsed(name: str, value: str) -> Any:
    """The ``email`` package's header object (parsing it is most of its cost: cached, as
    the From and Reply-To of a journey are the same for every message)."""
    if _LINE_BREAKS.search(value):
        raise ValueError("Header values may not contain linefeed or carriage return characters")
    return email.policy.default.header_factory(name, value)


@lru_cache(maxsize=4096)
def _folded(name: str, value: str, utf8: bool) -> bytes:
    policy = _POLICIES[utf8]
    return policy.fold_binary(name, _parsed(name, value))


def _plain(address: str) -> bool:
    # "=?" excepted: the email package decodes encoded words even there.
    return _PLAIN_ADDRESS.fullmatch(address) is not None and "=?" not in address


def _addresses(name: str, value: str) -> tuple[str, ...]:
    """The addresses an SMTP envelope uses for this header (as aiosmtplib extracts them)."""
    if _plain(value):
        return (value,)
    return tuple(address.addr_spec for address in _parsed(name, value).addresses)


def _address_header(name: str, value: str, utf8: bool) -> bytes:
    if _plain(value):
        return f"{name}: {value}\r\n".encode()
    return _folded(name, value, utf8)


def _message_id(value: str, utf8: bool) -> bytes:
    if _PLAIN_MESSAGE_ID.fullmatch(value):
        return f"Message-ID: {value}\r\n".encode()
    return _folded("Message-ID", value, utf8)


def _unstructured(name: str, value: str, utf8: bool) -> bytes:
    """An unstructured header: ASCII as it is, otherwise RFC 2047 encoded words (base64
    of UTF-8, split on character boundaries), folded. A value that already holds
    ``=?`` is left to the ``email`` package, which decodes encoded words it is given."""
    if "=?" in value or (utf8 and not value.isascii()):
        return _folded(name, value, utf8)
    if value.isascii():
        if len(name) + len(value) > 990:  # folded at spaces, as before
            return _folded(name, value, utf8)
        return f"{name}: {value}\r\n".encode() if value else f"{name}:\r\n".encode()
    # A reader drops the blanks after the colon: so does this (as the old builder did).
    raw = value.lstrip(" \t").encode()
    words: list[bytes] = []
    start = 0
    while start < len(raw):
        end = min(start + _WORD_BYTES, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # not inside a character
            end -= 1
        words.append(b"=?utf-8?b?" + binascii.b2a_base64(raw[start:end], newline=False) + b"?=")
        start = end
    return name.encode() + b": " + b"\r\n ".join(words) + b"\r\n"


@dataclass(frozen=True, slots=True)
class _Part:
    headers: bytes
    data: bytes  # encoded, CRLF line ends, ending with CRLF
    content: str  # what a reader decodes (``"\n"`` line ends, as the old builder stored)

    @staticmethod
    def of(subtype: str, body: str | None) -> _Part | None:
        """A text part: 7bit when ASCII in lines of up to 78, else quoted-printable, or
        base64 when that is shorter; never 8bit (servers without 8BITMIME)."""
        if body is None:
            return None
        content = body.replace("\r\n", "\n").replace("\r", "\n")
        if not content.endswith("\n"):
            content += "\n"
        raw = content.encode()
        if raw.isascii() and not _LONG_LINE.search(raw):
            cte, data = b"7bit", raw.replace(b"\n", b"\r\n")
        elif 2 * len(raw.translate(None, _ASCII)) > len(raw) // 3:
            # Each non-ASCII byte takes 3 characters in quoted-printable, 4/3 in base64.
            cte, data = b"base64", base64.encodebytes(raw.replace(b"\n", b"\r\n")).replace(b"\n", b"\r\n")
        else:
            cte, data = b"quoted-printable", binascii.b2a_qp(raw, istext=True).replace(b"\n", b"\r\n")
        headers = b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: %s\r\n' % (
            subtype.encode(),
            cte,
        )
        return _Part(headers=headers, data=data, content=content)


def _boundary(message_id: str, parts: list[_Part]) -> bytes:
    """A boundary no part holds: ``=_`` cannot appear in quoted-printable or base64 data;
    7bit parts are checked."""
    seed = hashlib.blake2b(message_id.encode(), digest_size=12).hexdigest()
    n = 0
    while True:
        boundary = f"=_wt{seed}{n or ''}".encode()
        if not any(boundary in p.data for p in parts):
            return boundary
        n += 1


def _domain(sender: str) -> str:
    """The domain of the From address (for Message-ID), or a local placeholder."""
    address = sender.rsplit("<", 1)[-1].strip(" >")
    domain = address.rsplit("@", 1)[-1] if "@" in address else ""
    return domain if re.fullmatch(r"[A-Za-z0-9.-]+", domain) else "whenthen.local"
