"""Hypothesis strategies shared by the segment tests: definition trees over given leaves."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def trees(leaves: st.SearchStrategy[dict[str, Any]], max_leaves: int) -> st.SearchStrategy[dict[str, Any]]:
    """Conditions nesting ``leaves`` under ``and`` / ``or`` (1-3 children) and ``not``."""
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(lambda cs: {"kind": "and", "conditions": cs}, st.lists(inner, min_size=1, max_size=3)),
            st.builds(lambda cs: {"kind": "or", "conditions": cs}, st.lists(inner, min_size=1, max_size=3)),
            st.builds(lambda c: {"kind": "not", "condition": c}, inner),
        ),
        max_leaves=max_leaves,
    )
