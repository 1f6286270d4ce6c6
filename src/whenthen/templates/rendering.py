"""Liquid rendering for message subjects and bodies, with limits. Pure.

Templates see ``traits`` (the profile's traits), ``event`` (the event that started the
journey: ``event.name``, ``event.properties``), ``journey`` (key, name), ``payload``
(data given when enrolling through the API or a signal) and ``message`` (id). Undefined
variables render as empty strings, as in Shopify's Liquid; loops, output size and
nesting are capped so a template cannot hang a worker or exhaust memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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


#: The longest range a filter may take: ``(1..100000000) | join`` would build a gigabyte
#: string, ``| sort`` a list of a hundred million, before any output limit could see it.
#: Loops over ranges are already capped by ``loop_iteration_limit``.
MAX_RANGE = 10_000


class RangeTooLong(ValueError):
    """A filter was given a range longer than :data:`MAX_RANGE`."""


def _guard(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def guarded(left: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(left, range) and len(left) > MAX_RANGE:
            raise RangeTooLong(
                f"filter {name!r} was given a range of {len(left)} items (at most {MAX_RANGE})"
            )
        return f(left, *args, **kwargs)

    return guarded


def _limited(autoescape: bool) -> LimitedEnvironment:
    env = LimitedEnvironment(autoescape=autoescape)
    env.filters = {name: _guard(name, f) for name, f in env.filters.items()}
    return env


_ENV = _limited(False)
_HTML_ENV = _limited(True)


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
    """Render; with ``html`` output of variables is HTML-escaped. A template without
    ``{`` has no tag or output (and Liquid's text is written as it is, escaped or not):
    it is its own result, as most subjects are (unless it holds a carriage return, which
    Liquid's reading turns into a line feed)."""
    if "{" not in source and "\r" not in source:
        return source
    template = _compile(source, html)
    try:
        return template.render(**context)
    except (LiquidError, RangeTooLong) as exc:
        raise TemplateError(str(exc).splitlines()[0]) from None
