"""Liquid rendering for message subjects and bodies, with limits. Pure.

Templates see ``traits`` (the profile's traits), ``event`` (the event that started the
journey: ``event.name``, ``event.properties``), ``journey`` (key, name), ``payload``
(data given when enrolling through the API or a signal) and ``message`` (id). Undefined
variables render as empty strings, as in Shopify's Liquid; loops, output size and
nesting are capped so a template cannot hang a worker or exhaust memory.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

from liquid import Environment
from liquid.exceptions import LiquidError
from liquid.template import BoundTemplate


class LimitedEnvironment(Environment):
    loop_iteration_limit: ClassVar[int | None] = 10_000
    output_stream_limit: ClassVar[int | None] = 1_000_000
    local_namespace_limit: ClassVar[int | None] = 100_000
    context_depth_limit: ClassVar[int] = 20


_ENV = LimitedEnvironment(autoescape=False)
_HTML_ENV = LimitedEnvironment(autoescape=True)


class TemplateError(ValueError):
    """A template that does not parse or fails to render; the message says where."""


@lru_cache(maxsize=1024)
def _compile(source: str, html: bool) -> BoundTemplate:
    env = _HTML_ENV if html else _ENV
    try:
        return env.from_string(source)
    except LiquidError as exc:
        raise TemplateError(str(exc).splitlines()[0]) from None


def check(source: str, *, html: bool = False) -> str | None:
    """The first syntax error of a template, or an unknown filter (which would only fail
    when rendered), or ``None``."""
    try:
        template = _compile(source, html)
    except TemplateError as exc:
        return str(exc)
    env = _HTML_ENV if html else _ENV
    unknown = sorted(name for name in template.filter_names() if name not in env.filters)
    if unknown:
        return f"unknown filter {unknown[0]!r}"
    return None


def render(source: str, context: dict[str, Any], *, html: bool = False) -> str:
    """Render; with ``html`` output of variables is HTML-escaped."""
    template = _compile(source, html)
    try:
        return template.render(**context)
    except LiquidError as exc:
        raise TemplateError(str(exc).splitlines()[0]) from None
