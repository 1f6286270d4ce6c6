"""Values built from JSON documents, kept by the document: for definitions the pipeline
reads on every batch (segments, scoring models), whose parsing or validation costs more
than reading them. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import orjson

T = TypeVar("T")


class ByDocument(Generic[T]):
    """``build(document)`` for a function of the document alone, kept by the document's
    canonical JSON (keys sorted; writing it out is a fraction of parsing it). Emptied when
    it holds more than ``bound`` documents and meets a new one. The values are shared:
    they must be immutable."""

    def __init__(self, build: Callable[[Any], T], *, bound: int = 10_000) -> None:
        self._build = build
        self._bound = bound
        self._kept: dict[bytes, T] = {}

    def __call__(self, document: Any) -> T:
        key = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        found = self._kept.get(key)
        if found is None:
            if len(self._kept) > self._bound:
                self._kept.clear()
            found = self._kept[key] = self._build(document)
        return found
