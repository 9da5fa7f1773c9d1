"""What a message field may hold: the checks `messages` decodes every field with (pure).

A check takes a value as JSON gave it and returns the field's value, or raises
`FieldError` saying what was expected; `messages` adds the kind and the field's name.
Every check is strict and bounded, because the sender may be a worker running hostile
app code and the receiver may be the master:

* JSON types are not coerced: a bool is not an int (Python says it is), an int is not
  a str; a duration may be written as an int or a float, never as a bool.
* Integers are in range: counts and ids are >= 0 and fit the binary width they travel
  in; a pid is > 0 and fits a pid_t; an fd number fits an int.
* Durations and figures are finite and >= 0 (NaN and the infinities are refused).
* Strings and lists are bounded, so one message cannot make a receiver hold or log
  more than it can afford; names are also bounded well below the message size.

A check also accepts the value as the sender holds it before encoding (a tuple where
JSON has a list), so `messages.encode` runs the same checks on what it sends.
"""
from __future__ import annotations

import binascii
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], Any]

# A name: a listener, app, metric or balancing policy; a host or host pattern; a watch
# topic ("app:NAME"); a peer's host. Real ones are far shorter (a DNS name is at most
# 253 characters, a UNIX socket path 108 bytes), so the bound costs nothing and keeps
# every name printable in a log line.
NAME_MAX = 1024
LIST_MAX = 4096    # entries in a list or a table of names
FDS_MAX = 255      # fds in one message: the wire form counts them in one byte
_INF = float("inf")


class FieldError(ValueError):
    """A field's value is not what its kind carries; the text says what was expected."""


def show(value: Any) -> str:
    """A value for an error message, cut short: a peer may have sent megabytes."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(what: str, value: Any) -> FieldError:
    return FieldError(f"expected {what}, found {show(value)}")


def integer(low: int, high: int) -> Check:
    """An int in low..high (both included); never a bool."""
    def check(value):
        if type(value) is not int or not low <= value <= high:
            raise _expected(f"an integer {low}..{high}", value)
        return value
    return check


def unsigned(bits: int) -> Check:
    """A count or an id that travels (or could travel) as an unsigned `bits`-bit integer."""
    return integer(0, (1 << bits) - 1)


PID = integer(1, 2**31 - 1)          # pid_t is a signed 32-bit int; 0 and negatives are not processes
FD_NUMBER = integer(0, 2**31 - 1)
PORT = unsigned(16)


def boolean(value):
    if type(value) is not bool:
        raise _expected("true or false", value)
    return value


def text(max_chars: int) -> Check:
    """A str of at most `max_chars` characters."""
    def check(value):
        if type(value) is not str:
            raise _expected("a string", value)
        if len(value) > max_chars:
            raise FieldError(f"expected at most {max_chars} characters, found {len(value)}")
        return value
    return check


NAME = text(NAME_MAX)


def duration_or_none(value):
    """Seconds (finite, >= 0; an int is fine) as a float, or None."""
    if value is None:
        return None
    if (type(value) is not float and type(value) is not int) or not 0 <= value < _INF:  # NaN fails too
        raise _expected("a finite number of seconds >= 0, or null", value)
    return float(value)


def figure(value):
    """A metric's value: a finite number >= 0 (counts and gauges, never a bool)."""
    if (type(value) is not float and type(value) is not int) or not 0 <= value < _INF:  # NaN fails too
        raise _expected("a finite number >= 0", value)
    return value


def base64_bytes(value):
    """Bytes, as base64 text (standard alphabet, padded; nothing else in it)."""
    if type(value) is not str:
        raise _expected("base64 text", value)
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except ValueError:  # binascii.Error, or a str that is not ASCII
        raise _expected("base64 text", value) from None


def _items(value) -> list | tuple:
    if type(value) is not list and type(value) is not tuple:
        raise _expected("an array", value)
    return value


def array(item: Check, max_items: int = LIST_MAX, *, unique: bool = False) -> Check:
    """A list of at most `max_items` values, each passing `item`; as a tuple."""
    def check(value):
        items = _items(value)
        if len(items) > max_items:
            raise FieldError(f"expected at most {max_items} entries, found {len(items)}")
        checked = []
        for index, entry in enumerate(items):
            try:
                checked.append(item(entry))
            except FieldError as exc:
                raise FieldError(f"[{index}]: {exc}") from None
        if unique and len(set(checked)) != len(checked):
            raise FieldError(f"names an entry twice: {show(checked)}")
        return tuple(checked)
    return check


def peer(value):
    """A peer's address: [host, port], host a str (empty for a UNIX peer); as a tuple."""
    items = _items(value)
    if len(items) != 2:
        raise _expected("[host, port]", value)
    host, port = items
    try:
        return NAME(host), PORT(port)
    except FieldError as exc:
        raise FieldError(f"peer {show(value)}: {exc}") from None


def table(key: Check, entry: Check, max_items: int = LIST_MAX) -> Check:
    """A JSON object of at most `max_items` entries, keys passing `key` and values
    `entry`; as a new dict of what the checks return."""
    def check(value):
        if type(value) is not dict:
            raise _expected("an object", value)
        if len(value) > max_items:
            raise FieldError(f"expected at most {max_items} entries, found {len(value)}")
        checked = {}
        for name, item in value.items():
            try:
                checked[key(name)] = entry(item)
            except FieldError as exc:
                raise FieldError(f"[{show(name)}]: {exc}") from None
        return checked
    return check


def record(**members: Check) -> Check:
    """A JSON object with exactly these keys, each passing its check; as a new dict."""
    def check(value):
        if type(value) is not dict:
            raise _expected("an object", value)
        if value.keys() != members.keys():
            problems = []
            if members.keys() - value.keys():
                problems.append("missing " + ", ".join(sorted(members.keys() - value.keys())))
            if value.keys() - members.keys():
                problems.append("unknown " + ", ".join(sorted(map(show, value.keys() - members.keys()))))
            raise FieldError("; ".join(problems))
        checked = {}
        for name, member in members.items():
            try:
                checked[name] = member(value[name])
            except FieldError as exc:
                raise FieldError(f"{name}: {exc}") from None
        return checked
    return check
