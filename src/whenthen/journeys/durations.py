"""Durations live in the kernel (segments, scoring and journeys all read them)."""

from whenthen.kernel.durations import MAX, parse_duration

__all__ = ["MAX", "parse_duration"]
