"""Typed reading of TOML tables, collecting every problem instead of stopping at one.

The generic half of config.py: `Table` answers "the integer at this key, or the
default" and records, for anything else, a problem naming the file, the dotted key,
what was expected and what was found. It knows nothing of Baton's sections.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from typing import Any, Mapping

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
MISSING = object()


class Problems:
    """The problem lines found so far in one config source."""

    def __init__(self, source: str):
        self.source = source
        self.lines: list[str] = []

    def add(self, key: tuple, message: str) -> None:
        where = f"{dotted_key(key)}: " if key else ""
        self.lines.append(f"{self.source}: {where}{message}")

    def expected(self, key: tuple, what: str, found: Any, hint: str = "") -> None:
        self.add(key, f"expected {what}, found {describe(found)}{hint}")


class Table:
    """One TOML table being read.

    Each getter checks one key: on a wrong value it records a problem and returns the
    default, so reading goes on and every problem is found in one pass. Keys asked for
    are remembered; `finish()` reports every other key as unknown.
    """

    def __init__(self, problems: Problems, key: tuple, data: dict):
        self.problems = problems
        self.key = key
        self.data = data
        self.known: list[str] = []

    def raw(self, name: str, *, required: str | None = None) -> Any:
        """The value of `name` or MISSING; `required` describes it if it must be present."""
        self.known.append(name)
        value = self.data.get(name, MISSING)
        if value is MISSING and required:
            self.problems.add(self.key + (name,), f"expected {required}, found nothing (the key is required)")
        return value

    def table(self, name: str) -> dict:
        value = self.raw(name)
        if value is MISSING:
            return {}
        if not isinstance(value, dict):
            self.problems.expected(self.key + (name,), "a table", value)
            return {}
        return value

    def section(self, name: str) -> Table:
        return Table(self.problems, self.key + (name,), self.table(name))

    def integer(self, name: str, default: int | None, *, low: int, high: int | None = None) -> int | None:
        value = self.raw(name)
        if value is MISSING:
            return default
        if is_int(value) and low <= value and (high is None or value <= high):
            return value
        what = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        self.problems.expected(self.key + (name,), what, value)
        return default

    def seconds(self, name: str, default: float | None, *, high: float, positive: bool = False) -> float | None:
        """A duration from 0 (or above 0 if `positive`) to `high` seconds. Every duration
        has a bound: past ~24.8 days it no longer fits epoll's int of milliseconds."""
        value = self.raw(name)
        if value is MISSING:
            return default
        if is_number(value) and math.isfinite(value) and (value > 0 if positive else value >= 0) and value <= high:
            return float(value)
        what = (f"a number of seconds > 0 and at most {high:g}" if positive
                else f"a number of seconds from 0 to {high:g}")
        self.problems.expected(self.key + (name,), what, value)
        return default

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is MISSING:
            return default
        if isinstance(value, bool):
            return value
        self.problems.expected(self.key + (name,), "true or false", value)
        return default

    def string(self, name: str, *, required: str | None = None, what: str = "a non-empty string") -> str | None:
        value = self.raw(name, required=required)
        if value is MISSING:
            return None
        if is_text(value):
            return value
        self.problems.expected(self.key + (name,), required or what, value)
        return None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is MISSING:
            return default
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        self.problems.expected(self.key + (name,), f"one of {or_list(choices)}", value)
        return default

    def strings(self, name: str, *, required: str | None = None, nonempty: bool = False,
                item=None) -> tuple | None:
        """An array of non-empty strings, each passed through `item(text)` if given;
        `item` raises ValueError(what_was_expected[, hint]) to refuse one element."""
        value = self.raw(name, required=required)
        if value is MISSING:
            return None
        what = required or "an array of strings"
        if not isinstance(value, (list, tuple)):
            self.problems.expected(self.key + (name,), what, value)
            return None
        if nonempty and not value:
            self.problems.expected(self.key + (name,), what, value)
            return None
        result = []
        for index, element in enumerate(value):
            key = self.key + (name, index)
            if not is_text(element):
                self.problems.expected(key, "a non-empty string", element)
                continue
            try:
                result.append(item(element) if item else element)
            except ValueError as exc:
                what_expected, *hint = exc.args
                self.problems.expected(key, what_expected, element, *hint)
        return tuple(result)

    def path(self, name: str, base_dir: str, *, dash: bool = False) -> str | None:
        """A file path, absolute once read; "-" (standard output or error) if `dash`."""
        value = self.string(name, what='a file path or "-"' if dash else "a file path")
        if value is None or (dash and value == "-"):
            return value
        if value == "-":
            self.problems.expected(self.key + (name,), "a file path", value)
            return None
        return absolute_path(base_dir, value)

    def finish(self, elsewhere: Mapping[str, str] | None = None) -> None:
        """Report every key no getter asked for, with a suggestion when one is close."""
        for name in self.data:
            if name in self.known:
                continue
            hint = did_you_mean(name, self.known)
            if not hint and elsewhere and name in elsewhere:
                hint = f"; it belongs in {elsewhere[name]}"
            self.problems.add(self.key + (name,), f"unknown key{hint}")


def absolute_path(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, path))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_text(value: Any) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def or_list(choices: tuple[str, ...]) -> str:
    quoted = [repr(choice) for choice in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def dotted_key(key: tuple) -> str:
    """A key path as TOML would write it: apps.blog.listeners[0], apps."my app"."""
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            part = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{part}" if text else part
    return text


def describe(value: Any) -> str:
    """A found value as TOML would call it: integer 0, boolean true, string 'x'."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_clip(repr(value))}" if value else "an empty string"
    if isinstance(value, (list, tuple)):
        return f"array {_clip(repr(list(value)))}" if value else "an empty array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {_clip(str(value))}"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


