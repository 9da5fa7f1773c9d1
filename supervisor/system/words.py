"""Counted nouns for log lines and messages: "1 worker", "2 workers" (pure)."""
from __future__ import annotations

__all__ = ["count"]


def count(number: int, noun: str, plural: str | None = None) -> str:
    """`number` and `noun`, plural unless number is 1 (`plural` for irregular ones)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
