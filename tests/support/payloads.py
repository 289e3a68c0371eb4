"""Payload shapes the protocol and intake tests send: deep nesting, which the protocol bounds."""

from __future__ import annotations


def nested(levels: int) -> dict:
    """Return ``{"a": {"a": ...}}`` with ``levels`` dicts in all (the innermost empty)."""
    top: dict = {}
    cur = top
    for _ in range(levels - 1):
        cur["a"] = {}
        cur = cur["a"]
    return top
