"""Access-log lines from gunicorn-style format strings (pure).

`compile_format(fmt)` reads a format such as gunicorn's default
`%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"` once and returns a
closure turning an `AccessRecord` into one line. Promises:

* All parsing happens at compile time; a request costs one pass over its headers
  (only when the format names a header) and one `%` formatting — no regex.
* An unknown atom or a malformed `%` is an `AccessFormatError` naming it, so a bad
  `[master] access_log_format` is a config error, never a failure per request.
* A text line is one line: quotes, backslashes and control characters that came from
  the peer or the app are escaped (`\\"`, `\\\\`, `\\xHH`), so nobody forges lines.
* In JSON mode the same atoms become the keys of one object (`ATOMS` gives the long
  names); literal text in the format is ignored, and a missing value is `null`.

The returned function carries `needs_environ` and `needs_response_headers`, so the
server captures those only when the format asks for them.
"""
from __future__ import annotations

import base64
import binascii
import json as jsonlib
import os
import re
import time
from collections.abc import Callable
from typing import NamedTuple

DEFAULT_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
# What a JSON access line holds when `access_log_format` is not set.
DEFAULT_JSON_FORMAT = "%(t)s %(h)s %(u)s %(m)s %(U)s %(q)s %(H)s %(s)s %(B)s %(f)s %(a)s %(M)s %(p)s"

# Atom -> (long name, used as the JSON key; what it is, for the docs and errors).
ATOMS = {
    "h": ("remote_addr", "remote address"),
    "l": ("ident", "'-'"),
    "u": ("user", "user name from Basic auth"),
    "t": ("time", "date and time of the response"),
    "r": ("request", "request line"),
    "m": ("method", "request method"),
    "U": ("path", "URL path, without the query"),
    "q": ("query", "query string"),
    "H": ("protocol", "protocol"),
    "s": ("status", "status code"),
    "B": ("bytes", "response body length"),
    "b": ("bytes", "response body length, or '-' for 0"),
    "f": ("referer", "Referer header"),
    "a": ("user_agent", "User-Agent header"),
    "T": ("duration_s", "request time in whole seconds"),
    "M": ("duration_ms", "request time in milliseconds"),
    "D": ("duration_us", "request time in microseconds"),
    "L": ("duration", "request time in decimal seconds"),
    "p": ("pid", "process id"),
}
# {name}i, {name}o, {name}e -> the JSON object they go in.
_BRACED = {"i": "request_headers", "o": "response_headers", "e": "environ"}

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_PERCENT = re.compile(r"%(?:\((?P<atom>[^()]*)\)(?P<conversion>[a-z]?)|(?P<percent>%)|)")
_JSON = jsonlib.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class AccessFormatError(ValueError):
    """A format string that cannot be compiled; the message names the bad part."""


class AccessRecord:
    """What the server knows about one finished request (or a refused one).

    Request fields are the parser's bytes (`http11.Request`), None when the request
    was never parsed (a 400 answered to garbage). `peer` is the address as accepted: an
    (ip, port) tuple, a unix socket path, or None. `started` and `finished` are
    `time.monotonic()` readings. Response headers are the app's `(str, str)` pairs;
    `environ` is the WSGI environ — either may be left out unless the format needs it.
    """

    __slots__ = ("peer", "method", "target", "path", "query", "version", "status", "length",
                 "request_headers", "response_headers", "started", "finished", "environ")

    def __init__(self, peer, method: bytes | None, target: bytes | None, path: bytes | None,
                 query: bytes | None, version: str | None, status: str, length: int,
                 request_headers=(), response_headers=(), started: float = 0.0,
                 finished: float = 0.0, environ: dict | None = None) -> None:
        self.peer = peer
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.version = version
        self.status = status
        self.length = length
        self.request_headers = request_headers
        self.response_headers = response_headers
        self.started = started
        self.finished = finished
        self.environ = environ

    @classmethod
    def for_request(cls, peer, request, status: str, length: int, started: float = 0.0,
                    finished: float = 0.0, response_headers=(), environ: dict | None = None) -> AccessRecord:
        """A record from an `http11.Request`, or from None (the request was refused)."""
        if request is None:
            return cls(peer, None, None, None, None, None, status, length, (), response_headers,
                       started, finished, environ)
        return cls(peer, request.method, request.target, request.path, request.query, request.version,
                   status, length, request.headers, response_headers, started, finished, environ)

    def __repr__(self) -> str:
        return f"<AccessRecord {self.method!r} {self.target!r} {self.status}>"


def compile_format(fmt: str, *, json: bool = False,
                   wall_clock: Callable[[], float] = time.time) -> Callable[[AccessRecord], str]:
    """Compile `fmt` into `format(record) -> str` (a text line, or one JSON object).

    Raises AccessFormatError naming the first bad atom. `wall_clock` gives the time
    the `t` atom shows (read when a line is formatted).
    """
    parts = _parse(fmt)
    atoms = [part for part in parts if not isinstance(part, str)]
    wanted_in = frozenset(name.encode("latin-1") for kind, name in atoms if kind == "i")
    wanted_in |= frozenset(_HEADER_ATOMS[kind] for kind, _ in atoms if kind in _HEADER_ATOMS)
    wanted_out = frozenset(name for kind, name in atoms if kind == "o")
    formatter = (_json_formatter if json else _text_formatter)(parts, wanted_in, wanted_out, wall_clock)
    formatter.needs_environ = any(kind == "e" for kind, _ in atoms)
    formatter.needs_response_headers = bool(wanted_out)
    return formatter


# -- compiling ----------------------------------------------------------------


def _parse(fmt: str) -> list:
    """Literal strings and (kind, name) atoms: ("s", "") for %(s)s, ("i", "x-id") for
    %({X-Id}i)s, ("e", "REMOTE_USER") for %({REMOTE_USER}e)s."""
    if not isinstance(fmt, str):
        raise AccessFormatError(f"expected a format string, found {type(fmt).__name__}")
    parts: list = []
    literal = []
    position = 0
    for match in _PERCENT.finditer(fmt):
        literal.append(fmt[position:match.start()])
        position = match.end()
        if match["percent"]:
            literal.append("%")
            continue
        if match["atom"] is None:
            raise AccessFormatError(f"a '%' at offset {match.start()} starts no atom: write %(name)s, or %% for '%'")
        atom = match["atom"]
        if match["conversion"] != "s":
            raise AccessFormatError(f"atom %({atom}){match['conversion']} must end with 's', as in %({atom})s")
        parts.append("".join(literal))
        literal = []
        parts.append(_atom(atom))
    literal.append(fmt[position:])
    parts.append("".join(literal))
    return [part for part in parts if part != ""]


def _atom(atom: str) -> tuple[str, str]:
    if atom in ATOMS:
        return atom, ""
    if atom.startswith("{") and len(atom) > 3 and atom[-2] == "}" and atom[-1] in _BRACED:
        name = atom[1:-2]
        if name.isascii() and name.isprintable() and "}" not in name and "{" not in name:
            kind = atom[-1]
            return kind, name if kind == "e" else name.lower()
    known = " ".join(ATOMS) + " {header}i {header}o {variable}e"
    raise AccessFormatError(f"unknown atom %({atom})s; known atoms: {known}")


# Atoms read from request headers.
_HEADER_ATOMS = {"u": b"authorization", "f": b"referer", "a": b"user-agent"}


def _text_formatter(parts, wanted_in, wanted_out, wall_clock):
    template = "".join(part.replace("%", "%%") if isinstance(part, str) else "%s" for part in parts)
    getters = tuple(_text_getter(part, wall_clock) for part in parts if not isinstance(part, str))
    pick = _pick

    if wanted_in or wanted_out:
        def format_line(record: AccessRecord) -> str:
            inh = pick(record.request_headers, wanted_in) if wanted_in else None
            outh = pick(record.response_headers, wanted_out) if wanted_out else None
            return template % tuple([get(record, inh, outh) for get in getters])
    else:
        def format_line(record: AccessRecord) -> str:
            return template % tuple([get(record, None, None) for get in getters])
    return format_line


def _json_formatter(parts, wanted_in, wanted_out, wall_clock):
    flat = []     # (key, getter)
    nested = []   # (object key, name, getter)
    for kind, name in (part for part in parts if not isinstance(part, str)):
        if kind in _BRACED:
            nested.append((_BRACED[kind], name, _json_getter((kind, name), wall_clock)))
        else:
            flat.append((ATOMS[kind][0], _json_getter((kind, name), wall_clock)))
    flat = tuple(flat)
    nested = tuple(nested)
    pick = _pick
    encode = _JSON

    def format_json(record: AccessRecord) -> str:
        inh = pick(record.request_headers, wanted_in) if wanted_in else None
        outh = pick(record.response_headers, wanted_out) if wanted_out else None
        obj = {key: get(record, inh, outh) for key, get in flat}
        for outer, name, get in nested:
            inner = obj.get(outer)
            if inner is None:
                inner = obj[outer] = {}
            inner[name] = get(record, inh, outh)
        return encode(obj)
    return format_json


def _pick(headers, wanted: frozenset) -> dict:
    """The first value of each wanted header (names compared lower-cased)."""
    found = {}
    for name, value in headers or ():
        lname = name.lower()
        if lname in wanted and lname not in found:
            found[lname] = value
    return found


# -- getters: (record, request headers, response headers) -> value ------------


class _Style(NamedTuple):
    """How one output form (text or JSON) renders an atom's value."""
    clock: Callable            # the `t` atom, given the wall clock
    header_bytes: Callable     # a request header's bytes (or None)
    text: Callable             # a response header's or the environ's value (or None)
    value: Callable | None     # any other atom's JSON value; None: as it is
    special: dict              # atoms rendered their own way in this form


def _getter(atom: tuple[str, str], wall_clock, style: _Style):
    kind, name = atom
    if kind == "t":
        return style.clock(wall_clock)
    if kind == "i":
        key, render = name.encode("latin-1"), style.header_bytes
        return lambda r, inh, outh: render(inh.get(key))
    if kind == "o":
        render = style.text
        return lambda r, inh, outh: render(outh.get(name))
    if kind == "e":
        render = style.text
        return lambda r, inh, outh: render(_environ(r, name))
    special = style.special.get(kind)
    if special is not None:
        return special
    get, render = _JSON_GETTERS[kind], style.value
    return get if render is None else (lambda r, inh, outh: render(get(r, inh, outh)))


def _text_getter(atom: tuple[str, str], wall_clock):
    return _getter(atom, wall_clock, _TEXT)


def _json_getter(atom: tuple[str, str], wall_clock):
    return _getter(atom, wall_clock, _JSON_STYLE)


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _remote_addr(r, inh, outh):
    peer = r.peer
    if peer.__class__ is tuple:
        return peer[0]
    return str(peer) if peer else None


def _user(r, inh, outh):
    auth = inh.get(b"authorization")
    if not auth or auth[:6].lower() != b"basic ":
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, _ = decoded.partition(b":")
    return user.decode("latin-1") if colon and user else None


def _request_line(r, inh, outh):
    if r.method is None:
        return None
    return f"{r.method.decode('latin-1')} {r.target.decode('latin-1')} HTTP/{r.version}"


def _protocol(r, inh, outh):
    return None if r.version is None else f"HTTP/{r.version}"


def _status(r, inh, outh):
    status = r.status
    return int(status) if status.isdigit() else status


def _seconds(r) -> float:
    return max(0.0, r.finished - r.started)


_JSON_GETTERS = {
    "h": _remote_addr,
    "l": lambda r, inh, outh: None,
    "u": _user,
    "r": _request_line,
    "m": lambda r, inh, outh: _latin1(r.method),
    "U": lambda r, inh, outh: _latin1(r.path),
    "q": lambda r, inh, outh: _latin1(r.query),
    "H": _protocol,
    "s": _status,
    "B": lambda r, inh, outh: r.length,
    "b": lambda r, inh, outh: r.length,
    "f": lambda r, inh, outh: _latin1(inh.get(b"referer")),
    "a": lambda r, inh, outh: _latin1(inh.get(b"user-agent")),
    "T": lambda r, inh, outh: int(_seconds(r)),
    "M": lambda r, inh, outh: round(_seconds(r) * 1000, 3),
    "D": lambda r, inh, outh: int(_seconds(r) * 1_000_000),
    "L": lambda r, inh, outh: round(_seconds(r), 6),
    "p": lambda r, inh, outh: os.getpid(),
}

# Text forms that differ from str(JSON value), as gunicorn writes them.
_TEXT_GETTERS = {
    "l": lambda r, inh, outh: "-",
    "s": lambda r, inh, outh: _text_str(r.status),
    "B": lambda r, inh, outh: str(r.length),
    "b": lambda r, inh, outh: str(r.length) if r.length else "-",
    "f": lambda r, inh, outh: _text_bytes(inh.get(b"referer")),
    "a": lambda r, inh, outh: _text_bytes(inh.get(b"user-agent")),
    "m": lambda r, inh, outh: _text_bytes(r.method),
    "U": lambda r, inh, outh: _text_bytes(r.path),
    "q": lambda r, inh, outh: _text_bytes(r.query),
    "M": lambda r, inh, outh: str(int(_seconds(r) * 1000)),
    "L": lambda r, inh, outh: "%.6f" % _seconds(r),
    "p": lambda r, inh, outh: f"<{os.getpid()}>",
}


def _environ(r, name: str):
    environ = r.environ
    return None if environ is None else environ.get(name)


def _clf_clock(wall_clock):
    """The `t` atom, [10/Oct/2000:13:55:36 +0000], rendered once per second."""
    cache = [(None, "")]

    def t(r, inh, outh) -> str:
        second = int(wall_clock())
        cached = cache[0]
        if cached[0] == second:
            return cached[1]
        tm = time.gmtime(second)
        text = (f"[{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year:04d}:"
                f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} +0000]")
        cache[0] = (second, text)
        return text
    return t


def _iso_clock(wall_clock):
    """The `t` atom in JSON: 2000-10-10T13:55:36.123Z (UTC, milliseconds)."""
    cache = [(None, "")]

    def t(r, inh, outh) -> str:
        now = wall_clock()
        second = int(now)
        cached = cache[0]
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            cache[0] = cached
        return f"{cached[1]}.{int((now - second) * 1000):03d}Z"
    return t


def iso_time(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds, for JSON lines."""
    whole = int(seconds)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{int((seconds - whole) * 1000):03d}Z"


# -- text escaping -------------------------------------------------------------


_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES[ord('"')] = '\\"'
_ESCAPES[ord("\\")] = "\\\\"


def _text_str(value) -> str:
    if value is None:
        return "-"
    if value.__class__ is not str:
        value = str(value)
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return value.translate(_ESCAPES)


def _text_bytes(value: bytes | None) -> str:
    return "-" if value is None else _text_str(value.decode("latin-1"))


def _text_value(value) -> str:
    return "-" if value is None else _text_str(value)


def _json_value(value):
    """An environ or response-header value as JSON holds it (anything else as text)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


_TEXT = _Style(_clf_clock, _text_bytes, _text_str, _text_value, _TEXT_GETTERS)
_JSON_STYLE = _Style(_iso_clock, _latin1, _json_value, None, {})
