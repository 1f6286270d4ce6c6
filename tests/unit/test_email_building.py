"""The pure parts of email: signed link tokens, link rewriting, the MIME message, and
Liquid rendering with its limits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whenthen.messaging.email import (
    _HREF,
    Addressing,
    _sub_hrefs,
    build_email,
    rewrite_html,
    rewrite_text,
    unsubscribe_url,
)
from whenthen.messaging.links import BadToken, sign, verify
from whenthen.templates import TemplateError, check, render
from whenthen.templates.rendering import _compile

SECRET = b"unit-secret"
A = Addressing(
    public_url="https://mail.example.com/",
    secret=SECRET,
    workspace_id="ws_1",
    profile_id="prf_1",
    message_id="msg_1",
)
TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$")


def token_of(url: str, kind: str) -> dict[str, object]:
    prefix = f"https://mail.example.com/t/{kind}/"
    assert url.startswith(prefix), url
    return verify(SECRET, url.removeprefix(prefix))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def mac(body: str, secret: bytes = SECRET) -> str:
    """The documented format: base64url(hmac-sha256(secret, "whenthen-link\\x1f" + body)[:16])."""
    return b64(hmac.new(secret, b"whenthen-link\x1f" + body.encode(), hashlib.sha256).digest()[:16])


# ---- tokens ---------------------------------------------------------------------------


def test_a_token_round_trips_and_is_url_safe() -> None:
    payload = {"k": "click", "w": "ws_1", "p": "prf_1", "m": "msg_1", "u": "https://x.com/a?b=1&c=é"}
    token = sign(SECRET, payload)
    assert TOKEN_CHARS.match(token)
    assert verify(SECRET, token) == payload
    # The same payload in another key order signs to the same token.
    assert sign(SECRET, dict(reversed(payload.items()))) == token


@given(st.data())
def test_any_change_to_a_token_is_detected(data: st.DataObject) -> None:
    token = sign(SECRET, {"k": "click", "m": "msg_1", "u": "https://example.com/a"})
    i = data.draw(st.integers(0, len(token) - 1))
    c = data.draw(st.characters(codec="utf-8", exclude_characters=token[i]))
    tampered = token[:i] + c + token[i + 1 :]
    with pytest.raises(BadToken):
        verify(SECRET, tampered)


@given(st.text(max_size=300))
def test_arbitrary_text_is_never_accepted_nor_an_error(text: str) -> None:
    with pytest.raises(BadToken):
        verify(SECRET, text)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "no-dot",
        "a.b.c",
        ".",
        "é.é",  # non-ASCII: refused, not a TypeError from hmac.compare_digest
        "eyJrIjoiY2xpY2sifQ.ÿÿÿÿ",
        "x" * 9000 + ".y",
    ],
)
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(BadToken):
        verify(SECRET, token)


def test_a_token_of_another_secret_is_refused() -> None:
    token = sign(b"another-secret", {"k": "click"})
    with pytest.raises(BadToken, match="bad signature"):
        verify(SECRET, token)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"not json", b"\xff\xfe"])
def test_a_signed_body_that_is_not_an_object_is_refused(body: bytes) -> None:
    encoded = b64(body)
    with pytest.raises(BadToken, match="malformed"):
        verify(SECRET, f"{encoded}.{mac(encoded)}")
    assert verify(SECRET, f"{b64(b'{}')}.{mac(b64(b'{}'))}") == {}


def test_addressing_links_carry_kind_person_and_message() -> None:
    assert token_of(A.link("click", "https://x.com"), "c") == {
        "k": "click",
        "w": "ws_1",
        "p": "prf_1",
        "m": "msg_1",
        "u": "https://x.com",
    }
    assert token_of(A.link("open"), "o")["k"] == "open"
    assert token_of(unsubscribe_url(A), "u") == {"k": "unsubscribe", "w": "ws_1", "p": "prf_1", "m": "msg_1"}


# ---- HTML ---------------------------------------------------------------------------


def test_html_links_are_tracked_others_kept() -> None:
    html = (
        "<html><body>"
        '<a href="https://a.example.com/x?p=1&amp;q=2">A</a>'
        "<a href='http://b.example.com/'>B</a>"
        '<A HREF="HTTPS://C.example.com/Up">C</A>'
        '<a href = "https://a.example.com/x?p=1&amp;q=2">A again</a>'
        '<a href="mailto:help@example.com">mail</a>'
        '<a href="#top">top</a>'
        '<a href="/relative/path">rel</a>'
        '<a href="tel:+331234">tel</a>'
        '<a href="https://mail.example.com/t/u/already">own link</a>'
        "<p>https://not-a-link-in-html.example.com</p>"
        "</body></html>"
    )
    links: list[str] = []
    out = rewrite_html(html, A, links)
    hrefs = re.findall(r"""href\s*=\s*["']([^"']+)["']""", out, re.IGNORECASE)
    tracked = [h for h in hrefs if h.startswith("https://mail.example.com/t/c/")]
    assert [token_of(h.replace("&amp;", "&"), "c")["u"] for h in tracked] == [
        "https://a.example.com/x?p=1&q=2",  # the URL the browser follows
        "http://b.example.com/",
        "HTTPS://C.example.com/Up",
        "https://a.example.com/x?p=1&q=2",
    ]
    assert links == [
        "https://a.example.com/x?p=1&q=2",
        "http://b.example.com/",
        "HTTPS://C.example.com/Up",
        "https://a.example.com/x?p=1&q=2",
    ]
    for kept in ("mailto:help@example.com", "#top", "/relative/path", "tel:+331234"):
        assert kept in hrefs
    assert "https://mail.example.com/t/u/already" in hrefs
    assert "<p>https://not-a-link-in-html.example.com</p>" in out  # only hrefs are links in HTML
    # Quotes of the original attributes are kept.
    assert "<a href='https://mail.example.com/t/c/" in out


def test_html_gets_a_footer_and_a_pixel_inside_the_body() -> None:
    out = rewrite_html("<html><body><p>Hi</p></BODY></html>", A, [])
    unsubscribe = unsubscribe_url(A)
    footer = out.index(f'<a href="{unsubscribe}">Unsubscribe</a>')
    pixel = out.index('<img src="https://mail.example.com/t/o/')
    assert out.index("<p>Hi</p>") < footer < pixel < out.index("</BODY>")
    assert 'width="1" height="1"' in out


def test_html_without_a_body_tag_gets_them_appended() -> None:
    out = rewrite_html("<p>Hi</p>", A, [])
    assert out.startswith("<p>Hi</p><p")
    assert out.endswith('style="display:none">')


def test_the_template_unsubscribe_link_replaces_the_footer() -> None:
    unsubscribe = unsubscribe_url(A)
    html = f'<p><a href="{unsubscribe}">Leave</a></p>'
    links: list[str] = []
    out = rewrite_html(html, A, links)
    assert out.count(unsubscribe) == 1
    assert "Unsubscribe</a>" not in out
    assert links == []


def test_no_footer_when_asked() -> None:
    out = rewrite_html("<p>Receipt</p>", A, [], footer=False)
    assert "/t/u/" not in out
    assert "/t/o/" in out  # opens are still counted


def test_an_href_with_an_unclosed_ipv6_bracket_is_left_alone() -> None:
    links: list[str] = []
    out = rewrite_html('<a href="http://[::1/x">x</a>', A, links)
    assert 'href="http://[::1/x"' in out
    assert links == []


# ---- text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "url", "after"),
    [
        ("Go to https://x.com/start.", "https://x.com/start", "."),
        ("Go to https://x.com/start, then", "https://x.com/start", ", then"),
        ("Really? https://x.com/a?b=1!", "https://x.com/a?b=1", "!"),
        ("(see https://x.com/a)", "https://x.com/a", ")"),
        (
            "https://en.wikipedia.org/wiki/Tea_(drink) is good",
            "https://en.wikipedia.org/wiki/Tea_(drink)",
            " is",
        ),
        ("[https://x.com/a]", "https://x.com/a", "]"),
        ('"https://x.com/q"', "https://x.com/q", '"'),
        ("<https://x.com/angle>", "https://x.com/angle", ">"),
        ("https://x.com/p?a=1&b=2#frag\n", "https://x.com/p?a=1&b=2#frag", "\n"),
    ],
)
def test_text_urls_are_tracked_without_surrounding_punctuation(text: str, url: str, after: str) -> None:
    links: list[str] = []
    out = rewrite_text(text, A, links, footer=False)
    assert links == [url]
    [tracked] = re.findall(r"https://mail\.example\.com/t/c/[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+", out)
    assert token_of(tracked, "c")["u"] == url
    assert out[out.index(tracked) + len(tracked) :].startswith(after)


def test_text_keeps_what_is_not_a_web_link() -> None:
    text = "Write to help@example.com or call tel:+331234. Also https:// alone and ftp://x.com/f."
    links: list[str] = []
    assert rewrite_text(text, A, links, footer=False) == text
    assert links == []


def test_text_footer_unless_the_template_has_the_link() -> None:
    out = rewrite_text("Hello\n\n\n", A, [])
    assert out == f"Hello\n\n--\nUnsubscribe: {unsubscribe_url(A)}\n"
    with_link = f"Hello\nLeave: {unsubscribe_url(A)}\n"
    assert rewrite_text(with_link, A, []) == with_link


# ---- the message --------------------------------------------------------------------


NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_a_marketing_email() -> None:
    built = build_email(
        a=A,
        sender="Shop <shop@example.com>",
        recipient="ann@example.com",
        subject="Hello\r\nBcc: victim@example.com",
        html="<p>Hi <a href='https://x.com/a'>a</a></p>",
        text="Hi https://x.com/b and again https://x.com/a",
        reply_to="help@example.com",
        marketing=True,
        now=NOW,
    )
    m = built.message
    assert m["From"] == "Shop <shop@example.com>"
    assert m["To"] == "ann@example.com"
    assert m["Subject"] == "Hello  Bcc: victim@example.com"  # no header injection
    assert m["Bcc"] is None
    assert m["Reply-To"] == "help@example.com"
    assert parsedate_to_datetime(str(m["Date"])) == NOW
    assert m["Message-ID"] == "<msg_1@example.com>"
    assert m["X-Whenthen-Message-Id"] == "msg_1"
    assert m["List-Unsubscribe"] == f"<{unsubscribe_url(A)}>"
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in m.iter_parts()] == ["text/plain", "text/html"]
    # Links in the order met (text first), each once.
    assert built.links == ("https://x.com/b", "https://x.com/a")


def test_the_message_id_is_stable_for_a_message() -> None:
    first = build_email(
        a=A,
        sender="s@example.com",
        recipient="r@example.com",
        subject="x",
        html=None,
        text="t",
        reply_to=None,
        marketing=True,
        now=NOW,
    )
    second = build_email(
        a=A,
        sender="s@example.com",
        recipient="r@example.com",
        subject="y",
        html=None,
        text="u",
        reply_to=None,
        marketing=True,
        now=NOW,
    )
    assert first.message["Message-ID"] == second.message["Message-ID"] == "<msg_1@example.com>"


@pytest.mark.parametrize(
    ("sender", "domain"),
    [
        ("Shop <shop@example.com>", "example.com"),
        ("shop@mail.example.org", "mail.example.org"),
        ("whenthen <noreply@localhost>", "localhost"),
        ("no address at all", "whenthen.local"),
    ],
)
def test_the_message_id_domain_is_the_senders(sender: str, domain: str) -> None:
    built = build_email(
        a=A,
        sender=sender,
        recipient="r@example.com",
        subject="x",
        html=None,
        text="t",
        reply_to=None,
        marketing=False,
        now=NOW,
    )
    assert built.message["Message-ID"] == f"<msg_1@{domain}>"


def test_a_transactional_email_has_no_unsubscribe() -> None:
    built = build_email(
        a=A,
        sender="s@example.com",
        recipient="r@example.com",
        subject="Receipt",
        html="<p>Order <a href='https://x.com/o/1'>1</a></p>",
        text="Order https://x.com/o/1",
        reply_to=None,
        marketing=False,
        now=NOW,
    )
    m = built.message
    assert m["List-Unsubscribe"] is None
    assert m["List-Unsubscribe-Post"] is None
    for subtype in ("plain", "html"):
        part = m.get_body((subtype,))
        assert part is not None
        body = part.get_content()
        assert "/t/u/" not in body
        assert "/t/c/" in body
    assert built.links == ("https://x.com/o/1",)


def test_single_part_messages() -> None:
    html_only = build_email(
        a=A,
        sender="s@example.com",
        recipient="r@example.com",
        subject="x",
        html="<p>x</p>",
        text=None,
        reply_to=None,
        marketing=True,
        now=NOW,
    )
    assert html_only.message.get_content_type() == "text/html"
    text_only = build_email(
        a=A,
        sender="s@example.com",
        recipient="r@example.com",
        subject="x",
        html=None,
        text="x",
        reply_to=None,
        marketing=True,
        now=NOW,
    )
    assert text_only.message.get_content_type() == "text/plain"
    assert "Unsubscribe:" in text_only.message.get_content()


# ---- Liquid -------------------------------------------------------------------------


def test_undefined_variables_render_empty() -> None:
    assert (
        render("[{{ nothing }}|{{ traits.a.b.c }}|{{ list[3] }}|{{ x | upcase }}]", {"traits": {}}) == "[|||]"
    )
    assert render("{% for x in nothing %}y{% endfor %}{% if nothing %}y{% endif %}", {}) == ""


#: Pieces of HTML around links, in any case, with characters whose lower case is longer
#: (U+0130) or that match ASCII letters case-insensitively elsewhere (U+017F, U+212A).
HTML_PIECES = st.sampled_from(
    ["href", "HREF", "HrEf", "hre", "f", "=", " = ", '"', "'", "http://", "https://", "HTTPS://",
     "a.example/x?y=1&amp;z", "<a ", ">", " ", "\n", "\u0130", "\u017f", "\u212a", "\u00e9", "\u4e2d", "x",
     'href="https://a.example/x"', "HREF = 'http://b.example/y?z=1'", 'hReF="https://c.example"']
)  # fmt: skip


@settings(max_examples=500)
@given(st.lists(HTML_PIECES, max_size=40).map("".join))
def test_hrefs_are_found_where_the_regex_finds_them(html: str) -> None:
    def mark(m: re.Match[str]) -> str:
        return f"[{m.group(1)}|{m.group(2)}|{m.group(3)}]"

    assert _sub_hrefs(mark, html) == _HREF.sub(mark, html)


#: Text without a brace; lone surrogates left out (no JSON document carries one, and
#: Liquid itself fails to write them).
NO_BRACE = st.text(alphabet=st.characters(blacklist_characters="{", blacklist_categories=["Cs"]))


@settings(max_examples=500)
@given(NO_BRACE, st.booleans())
def test_a_template_without_a_brace_renders_as_liquid_renders_it(source: str, html: bool) -> None:
    # render() returns such a template as it is, without Liquid: the same text.
    assert render(source, {"traits": {"a": 1}}, html=html) == _compile(source, html).render(traits={"a": 1})


def test_html_output_is_escaped_text_output_is_not() -> None:
    ctx = {"traits": {"name": '<script>alert("x")</script> & co'}}
    assert render("Hi {{ traits.name }}", ctx) == 'Hi <script>alert("x")</script> & co'
    assert (
        render("Hi {{ traits.name }}", ctx, html=True)
        == "Hi &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co"
    )
    # The template's own markup is trusted; only values are escaped.
    assert render("<b>{{ traits.name | upcase }}</b>", ctx, html=True).startswith("<b>&lt;SCRIPT&gt;")


def test_filters_and_context() -> None:
    ctx = {"traits": {"first_name": "ann"}, "event": {"properties": {"items": [1, 2, 3]}}}
    assert render("{{ traits.first_name | capitalize }}", ctx) == "Ann"
    assert render("{{ traits.last_name | default: 'friend' }}", ctx) == "friend"
    assert render("{% for i in event.properties.items %}{{ i }}{% endfor %}", ctx) == "123"


def test_the_loop_limit() -> None:
    assert len(render("{% for i in (1..10000) %}x{% endfor %}", {})) == 10_000
    with pytest.raises(TemplateError, match="loop iteration limit"):
        render("{% for i in (1..10001) %}x{% endfor %}", {})
    with pytest.raises(TemplateError, match="loop iteration limit"):
        render("{% for i in (1..200) %}{% for j in (1..200) %}x{% endfor %}{% endfor %}", {})


def test_the_output_limit() -> None:
    with pytest.raises(TemplateError, match="output stream limit"):
        render("{% for i in (1..9000) %}{{ s }}{% endfor %}", {"s": "x" * 200})


def test_the_namespace_limit() -> None:
    doubling = "{% assign s = 'xxxxxxxxxx' %}{% for i in (1..25) %}{% assign s = s | append: s %}{% endfor %}"
    with pytest.raises(TemplateError, match="namespace limit"):
        render(doubling, {})


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("{% if x %}", "expected tag endif"),
        ("{{ x | no_such_filter }}", "unknown filter"),
        ("{% no_such_tag %}", "unexpected tag"),
        ("{{ 'unclosed }}", "unclosed|unexpected|expected"),
    ],
)
def test_template_errors(source: str, error: str) -> None:
    with pytest.raises(TemplateError, match=error):
        render(source, {"x": 1})
    message = check(source)
    assert message is not None
    assert "\n" not in message


def test_check_accepts_valid_templates() -> None:
    assert check("Hello {{ traits.first_name | default: 'you' }}") is None
    assert check("{% for i in (1..3) %}{{ i }}{% endfor %}", html=True) is None


def test_a_token_body_is_sorted_json() -> None:
    token = sign(SECRET, {"b": 1, "a": 2})
    body = token.split(".")[0]
    assert base64.urlsafe_b64decode(body + "==") == orjson.dumps({"a": 2, "b": 1})


@pytest.mark.parametrize(
    "source",
    [
        '{{ (1..100000000) | join: "," | size }}',
        "{{ (1..50000000) | sort | first }}",
        "{{ (1..9999999) | reverse | first }}",
        "{% assign r = (1..100000000) %}{{ r | last }}",
        "{% for i in (1..100000000) %}{{ i }}{% endfor %}",
    ],
)
def test_templates_cannot_build_huge_ranges(source: str) -> None:
    """A template cannot hang the worker: filters refuse ranges over 10,000 items and
    loops stop at the iteration limit; the error names the cause."""
    with pytest.raises(TemplateError) as info:
        render(source, {})
    assert "range" in str(info.value) or "limit" in str(info.value)


def test_small_ranges_still_work() -> None:
    assert render('{{ (1..5) | join: "," }}', {}) == "1,2,3,4,5"
    assert render("{{ (1..10000) | size }}", {}) == "10000"
