"""kernel.memo.ByDocument: one build per document, whatever the order of its keys."""

from __future__ import annotations

from typing import Any

from whenthen.kernel.memo import ByDocument


def test_a_document_is_built_once_whatever_its_key_order_and_the_bound_empties_it() -> None:
    built: list[Any] = []

    def build(doc: Any) -> tuple[str, ...]:
        built.append(doc)
        return tuple(sorted(doc))

    memo = ByDocument(build, bound=2)
    first = memo({"a": 1, "b": {"c": 2, "d": 3}})
    assert memo({"b": {"d": 3, "c": 2}, "a": 1}) is first
    assert len(built) == 1
    assert memo({"a": 2}) == ("a",)
    assert memo({"a": 3}) == ("a",)
    assert len(built) == 3
    memo({"a": 4})  # past the bound: emptied, then kept anew
    assert memo({"a": 1, "b": {"c": 2, "d": 3}}) is not first
    assert len(built) == 5
