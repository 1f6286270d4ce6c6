"""Tiny shared vocabulary: clock, ids, errors, keyed hashing."""
