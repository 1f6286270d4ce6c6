"""Building a marketing email: tracked links, open pixel, unsubscribe link and headers. Pure.

* Every ``http(s)`` link in the HTML ``href`` attributes and in the text part is rewritten
  to ``{public_url}/t/c/{token}``; the token carries the original URL, signed.
* An open pixel ``{public_url}/t/o/{token}`` is added to the HTML.
* Marketing mail carries ``List-Unsubscribe`` (an HTTPS URL) and
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058), and a visible
  unsubscribe link: ``{{ unsubscribe_url }}`` in the template, or a footer added when the
  template does not use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from html import escape

from whenthen.messaging.links import sign

_HREF = re.compile(r"""(href\s*=\s*)(["'])(https?://[^"'\s>]+)\2""", re.IGNORECASE)
_TEXT_URL = re.compile(r"""https?://[^\s<>"')\]]+""")


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


def rewrite_html(html: str, a: Addressing, links: list[str]) -> str:
    unsubscribe = unsubscribe_url(a)

    def repl(m: re.Match[str]) -> str:
        url = m.group(3)
        if url.startswith(a.public_url.rstrip("/") + "/t/"):
            return m.group(0)
        links.append(url)
        return f"{m.group(1)}{m.group(2)}{escape(a.link('click', url.replace('&amp;', '&')))}{m.group(2)}"

    out = _HREF.sub(repl, html)
    if unsubscribe not in out:
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


def rewrite_text(text: str, a: Addressing, links: list[str]) -> str:
    unsubscribe = unsubscribe_url(a)
    prefix = a.public_url.rstrip("/") + "/t/"

    def repl(m: re.Match[str]) -> str:
        url = m.group(0)
        if url.startswith(prefix):
            return url
        links.append(url)
        return a.link("click", url)

    out = _TEXT_URL.sub(repl, text)
    if unsubscribe not in out:
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
) -> BuiltEmail:
    links: list[str] = []
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject.replace("\r", " ").replace("\n", " ")
    msg["Date"] = formatdate(localtime=False)
    domain = sender.rsplit("@", 1)[-1].strip("> ") or "whenthen.local"
    msg["Message-ID"] = make_msgid(idstring=a.message_id, domain=domain)
    msg["X-Whenthen-Message-Id"] = a.message_id
    if reply_to:
        msg["Reply-To"] = reply_to
    if marketing:
        msg["List-Unsubscribe"] = f"<{unsubscribe_url(a)}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    text_body = rewrite_text(text, a, links) if text else None
    html_body = rewrite_html(html, a, links) if html else None
    if text_body is not None:
        msg.set_content(text_body)
        if html_body is not None:
            msg.add_alternative(html_body, subtype="html")
    else:
        assert html_body is not None
        msg.set_content(html_body, subtype="html")
    return BuiltEmail(message=msg, links=tuple(dict.fromkeys(links)))
