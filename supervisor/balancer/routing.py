"""Which app is a new connection for? Decided from its first bytes (pure).

The balancer peeks (MSG_PEEK, consuming nothing) at an accepted connection and hands the
bytes seen so far to `peek_host` (plain HTTP/1.x) or `peek_sni` (TLS), then maps the
answer to an app with `HostTable.match`. Nothing here touches a socket; every function
is a pure function of the bytes it is given, so the caller simply peeks again with a
longer buffer while the answer is "need_more".

Each peek answers a `Peek` whose status is one of:

- ``need_more``: the bytes are a valid, incomplete prefix; peek again when more arrive.
- ``host``: decided; `Peek.host` is the normalised host (see below).
- ``no_host``: a well-formed request or ClientHello that names no host (HTTP/1.0
  without Host, an empty Host, a ClientHello without SNI): route to the default app.
- ``invalid``: hostile or broken input we will not route; close the connection (an HTTP
  peer deserves a 400). `Peek.reason` says why, for the log.

Promises:

1. Prefix-monotone. For any input, the answers for its growing prefixes are ``need_more``
   zero or more times, then one final answer that no further bytes can change. In
   particular every proper prefix of a valid head or ClientHello is ``need_more``.
2. Decided only on a complete head / ClientHello. A Host line is not trusted until the
   blank line that ends the head has arrived, so a second Host further down cannot be
   smuggled past us; likewise SNI is read only from the whole ClientHello. Bytes after
   the head (a body, a pipelined request) are never looked at.
3. Bounded. An HTTP head must end within `max_head` bytes and a ClientHello body within
   `max_hello` bytes, else ``invalid``; work per call is linear in those bounds.
4. Normalised hosts: ASCII lowercase, port removed, one trailing dot removed, IPv6
   literals without brackets in `ipaddress`'s compressed form ("[0:0::1]:80" -> "::1").
   `HostTable` patterns go through the same normalisation, so what a peek returns can
   be matched directly.

What a host name is (the grammar and the normalisation) is `config.hostnames`, which
the config reader also uses for `[apps.X] hosts` entries and bind host names.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable, Literal

from supervisor.config.hostnames import host_pattern, normalise_ipv6, normalise_name

Status = Literal["need_more", "host", "no_host", "invalid"]

DEFAULT_MAX_HEAD = 8192
DEFAULT_MAX_HELLO = 16384


@dataclass(frozen=True, slots=True)
class Peek:
    """The verdict on the bytes seen so far. `host` is set only when status is "host"."""
    status: Status
    host: str | None = None
    reason: str = field(default="", compare=False)   # why "invalid"; for logs only


NEED_MORE = Peek("need_more")
NO_HOST = Peek("no_host")


def _invalid(reason: str) -> Peek:
    return Peek("invalid", None, reason)


# ---------------------------------------------------------------------------------------
# Authority: "host[:port]" from a Host field or an absolute-form target


def _parse_authority(text: str) -> str | None:
    """`uri-host [":" port]` -> normalised host, or None if invalid.

    The port may be empty (RFC 3986 `port = *DIGIT`), else at most 65535.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            return None
        host = normalise_ipv6(text[1:close])
        rest = text[close + 1:]
    else:
        name, _, port = text.partition(":")
        host = normalise_name(name)
        rest = text[len(name):]
    if host is None:
        return None
    if rest:
        port = rest[1:]
        if rest[0] != ":" or len(port) > 5 or (port and not (port.isdigit() and port.isascii())):
            return None
        if port and int(port) > 65535:
            return None
    return host


# ---------------------------------------------------------------------------------------
# HTTP/1.x

# Bytes allowed anywhere in a request head apart from CRLF: HTAB, SP, VCHAR and obs-text.
# Everything else (NUL, other controls, DEL, bare CR or LF) makes the head invalid.
_HEAD_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_HEAD_BYTES_CRLF = _HEAD_BYTES + b"\r\n"
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VERSION = re.compile(rb"HTTP/1\.([0-9])")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


def _is_token(data: bytes) -> bool:
    return bool(data) and not data.translate(None, _TCHAR)


def _bad_bytes(text: bytes) -> str | None:
    """Why `text` (a head, or the start of one) holds a forbidden byte; None if it does not."""
    if text.translate(None, _HEAD_BYTES_CRLF):
        return "control character in request head"
    crlf = text.count(b"\r\n")
    if text.count(b"\r") != crlf or text.count(b"\n") != crlf:
        return "bare CR or LF in request head"
    return None


def _check_request_line_start(line: bytes) -> str | None:
    """Why an incomplete request line can never become valid; None if it still can."""
    parts = line.split(b" ")
    if len(parts) > 3:
        return "malformed request line"
    if any(not part for part in parts[:-1]):
        return "malformed request line"
    if parts[0] and parts[0].translate(None, _TCHAR):
        return "bad method"
    if len(parts) == 3:
        version = parts[2]
        if version[:7] != b"HTTP/1."[:len(version)] or len(version) > 8:
            return "bad HTTP version"
        if len(version) == 8 and not version[7:].isdigit():
            return "bad HTTP version"
    return None


def _check_field_line_start(line: bytes) -> str | None:
    """Why an incomplete field line can never become valid; None if it still can."""
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding"
    name, colon, _ = line.partition(b":")
    if (colon and not name) or name.translate(None, _TCHAR):
        return "bad field name"
    return None


def peek_host(data: bytes, max_head: int = DEFAULT_MAX_HEAD) -> Peek:
    """Find the host an HTTP/1.x request is for, from the start of the connection's bytes.

    `data` is everything received so far (it may hold more than the head); the head,
    including its final blank line, must fit in `max_head` bytes. Line ends must be CRLF:
    RFC 9112 §2.2 lets a recipient accept a bare LF, we do not, since the worker's parser
    and the balancer must agree on where the head ends. Empty lines before the request
    line are skipped (RFC 9112 §2.2 asks servers to ignore at least one).

    The host comes from the Host field, except that an absolute-form target
    ("GET http://example.com/ HTTP/1.1") supplies it instead (RFC 9112 §3.2.2); the Host
    field must still be present in HTTP/1.1 and valid if present (§3.2 demands a 400
    otherwise). An empty Host value, or a missing Host in HTTP/1.0, gives "no_host".
    """
    window = data[:max_head]
    start = 0
    while window.startswith(b"\r\n", start):
        start += 2
    end = window.find(b"\r\n\r\n", start)
    if end < 0:
        reason = _check_partial_head(window[start:])
        if reason is None and len(data) >= max_head:
            reason = f"request head longer than {max_head} bytes"
        return NEED_MORE if reason is None else _invalid(reason)

    head = window[start:end]
    reason = _bad_bytes(head)
    if reason is not None:
        return _invalid(reason)
    request_line, *field_lines = head.split(b"\r\n")
    reason, target, minor = _check_request_line(request_line)
    host_value: bytes | None = None
    if reason is None:
        reason, host_value = _scan_fields(field_lines)
    if reason is not None:
        return _invalid(reason)
    return request_host(host_value, target, minor)


def request_host(host_value: bytes | None, target: bytes, minor: int = 1) -> Peek:
    """The host of a request whose head is read: from its Host field's value (None:
    no Host field; surrounding whitespace stripped), unless its target is in absolute
    form ("http://example.com/"), which supplies the host instead (RFC 9112 §3.2.2).
    `minor` is the HTTP/1.x minor version. What `peek_host` decides once the head is
    whole, for a caller that parsed the head itself (the worker, which checks every
    request of a connection against the listener's routing, not just the first)."""
    if host_value is None:
        if minor != 0:
            return _invalid("HTTP/1.1 request without Host")
        host = None
    elif not host_value:
        host = None
    else:
        host = _parse_authority(host_value.decode("latin-1"))
        if host is None:
            return _invalid("bad Host value")

    absolute = _ABSOLUTE_FORM.match(target)
    if absolute is not None:
        authority = absolute.group(1).decode("latin-1")
        if "@" in authority:   # userinfo: RFC 9110 §4.2.4 says treat as an error
            return _invalid("userinfo in request target")
        host = _parse_authority(authority)
        if host is None:
            return _invalid("bad authority in request target")

    return NO_HOST if host is None else Peek("host", host)


def _check_partial_head(text: bytes) -> str | None:
    """Why an incomplete head (no blank line yet) can never become valid; None if it can."""
    if text.endswith(b"\r"):
        text = text[:-1]   # the CR of a CRLF still on its way
    reason = _bad_bytes(text)
    if reason is not None:
        return reason
    *complete, last = text.split(b"\r\n")
    if not complete:
        return _check_request_line_start(last)
    reason = _check_request_line(complete[0])[0] or _scan_fields(complete[1:])[0]
    if reason is None and last:
        reason = _check_field_line_start(last)
    return reason


def _check_request_line(line: bytes) -> tuple[str | None, bytes, int]:
    """(why the complete request line is invalid or None, its target, HTTP minor version)."""
    parts = line.split(b" ")
    if len(parts) != 3 or not _is_token(parts[0]) or not parts[1]:
        return "malformed request line", b"", 0
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        return "bad HTTP version", b"", 0
    return None, parts[1], int(version.group(1))


def _scan_fields(lines: list[bytes]) -> tuple[str | None, bytes | None]:
    """(why the complete field lines are invalid or None, the Host value or None if absent)."""
    host_value: bytes | None = None
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding", None
        name, colon, value = line.partition(b":")
        if not colon or not _is_token(name):
            return "bad field line", None
        if len(name) == 4 and name.lower() == b"host":
            if host_value is not None:
                return "more than one Host", None
            host_value = value.strip(b" \t")
    return None, host_value


# ---------------------------------------------------------------------------------------
# TLS

_HANDSHAKE_RECORD = 0x16
_CLIENT_HELLO = 1
_MAX_RECORD_FRAGMENT = 1 << 14            # RFC 8446 §5.1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST = 0


def looks_like_tls(data: bytes) -> bool:
    """True if `data` is non-empty and its first (up to) three bytes fit a TLS handshake
    record header: 0x16, then version 0x03 0x00-0x04.

    Decidable from the first byte: 0x16 can never start an HTTP request (methods are
    tokens), so a caller may dispatch on a one-byte peek and let `peek_sni` judge the rest.
    """
    if not data or data[0] != _HANDSHAKE_RECORD:
        return False
    if len(data) >= 2 and data[1] != 3:
        return False
    return len(data) < 3 or data[2] <= 4


class _Malformed(Exception):
    pass


class _Reader:
    """Cursor over TLS wire data; running past the end means the data is malformed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed("truncated field")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.uint(length_bytes))

    def done(self) -> bool:
        return self.pos == len(self.data)


def peek_sni(data: bytes, max_hello: int = DEFAULT_MAX_HELLO) -> Peek:
    """Find the SNI host name in a TLS ClientHello at the start of the connection's bytes.

    The ClientHello may span several handshake records (RFC 8446 §5.1 allows it); it is
    read only once whole. Its body must fit in `max_hello` bytes. Bytes after it are
    ignored. "invalid" covers non-TLS input, a first handshake message that is not a
    ClientHello, any malformed length or vector, duplicate extensions, more than one
    host_name, and a host_name that is not a DNS-style name (RFC 6066 §3 forbids IP
    literals there). One trailing dot is removed, as for Host.
    """
    if not data:
        return NEED_MORE
    if not looks_like_tls(data[:3]):
        return _invalid("not a TLS handshake record")
    handshake = bytearray()
    want: int | None = None      # total handshake message size once its header is in
    pos = 0
    while True:
        header = data[pos:pos + 5]
        if len(header) < 5:
            if header and not looks_like_tls(header):
                return _invalid("non-handshake record inside ClientHello")
            return NEED_MORE
        if not looks_like_tls(header):
            return _invalid("non-handshake record inside ClientHello")
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > _MAX_RECORD_FRAGMENT:
            return _invalid("bad TLS record length")
        fragment = data[pos + 5:pos + 5 + length]
        handshake += fragment
        if handshake and handshake[0] != _CLIENT_HELLO:
            return _invalid("first handshake message is not a ClientHello")
        if want is None and len(handshake) >= 4:
            body_length = int.from_bytes(handshake[1:4], "big")
            if body_length > max_hello:
                return _invalid(f"ClientHello longer than {max_hello} bytes")
            want = 4 + body_length
        if want is not None and len(handshake) >= want:
            try:
                return _parse_client_hello(bytes(handshake[4:want]))
            except _Malformed as exc:
                return _invalid(f"malformed ClientHello: {exc}")
        if len(fragment) < length:
            return NEED_MORE
        pos += 5 + length


def _parse_client_hello(body: bytes) -> Peek:
    """RFC 8446 §4.1.2 (and its TLS 1.0-1.2 ancestors): find server_name/host_name."""
    reader = _Reader(body)
    if reader.take(2)[0] != 3:
        raise _Malformed("legacy_version")
    reader.take(32)                                      # random
    if len(reader.vector(1)) > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = reader.vector(2)
    if not suites or len(suites) % 2:
        raise _Malformed("cipher suites")
    if not reader.vector(1):
        raise _Malformed("no compression methods")
    if reader.done():
        return NO_HOST                                   # pre-extension ClientHello
    extensions = _Reader(reader.vector(2))
    if not reader.done():
        raise _Malformed("bytes after extensions")
    seen: set[int] = set()
    host: str | None = None
    while not extensions.done():
        kind = extensions.uint(2)
        payload = extensions.vector(2)
        if kind in seen:
            raise _Malformed(f"duplicate extension {kind}")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            host = _parse_server_name(payload)
    return NO_HOST if host is None else Peek("host", host)


def _parse_server_name(payload: bytes) -> str | None:
    """RFC 6066 §3 ServerNameList -> the normalised host_name, or None if it has none."""
    outer = _Reader(payload)
    names = _Reader(outer.vector(2))
    if not outer.done() or names.done():
        raise _Malformed("server_name list")
    host: str | None = None
    while not names.done():
        name_type = names.uint(1)
        # Every name type defined so far is an opaque<1..2^16-1>; unknown types are
        # skipped on that assumption, as OpenSSL and Go do.
        name = names.vector(2)
        if not name:
            raise _Malformed("empty server name")
        if name_type != _NAME_TYPE_HOST:
            continue
        if host is not None:
            raise _Malformed("more than one host_name")
        host = normalise_name(name.decode("latin-1"), allow_ipv4=False)
        if host is None:
            raise _Malformed("host_name is not a DNS name")
    return host


# ---------------------------------------------------------------------------------------
# Host -> app


class HostTable:
    """Maps a peeked host to an app name.

    Built from entries ``(app_name, hosts, default)``. A host pattern is either an exact
    name ("example.org", "127.0.0.1", "::1" or "[::1]"; case-insensitive, trailing dot
    ignored, no port) or a wildcard "*.example.org", which matches names with one or more
    labels before ".example.org" ("a.example.org", "a.b.example.org") but never the bare
    "example.org" (list that separately if wanted). Wildcards never match IP addresses.

    `match` prefers an exact name, then the longest matching wildcard; with no match it
    returns the app marked default, or None if there is none. Lookups cost O(labels of
    the host), whatever the number of apps.

    The constructor raises ValueError on an invalid pattern, a name or wildcard claimed
    by two apps, two default apps, or an app listed twice. The table is immutable.
    """

    __slots__ = ("_exact", "_wildcard", "default")

    def __init__(self, entries: Iterable[tuple[str, Iterable[str], bool]]) -> None:
        exact: dict[str, str] = {}
        wildcard: dict[str, str] = {}    # "example.org" -> app, for "*.example.org"
        default: str | None = None
        apps: set[str] = set()
        for app, hosts, is_default in entries:
            if app in apps:
                raise ValueError(f"app {app!r} listed twice")
            apps.add(app)
            if is_default:
                if default is not None:
                    raise ValueError(f"two default apps: {default!r} and {app!r}")
                default = app
            if isinstance(hosts, str):
                raise ValueError(f"app {app!r}: hosts must be a sequence of names, not a string")
            for pattern in hosts:
                table, key = host_pattern(pattern)
                owner = (wildcard if table == "wildcard" else exact).setdefault(key, app)
                if owner != app:
                    raise ValueError(f"host {pattern!r} claimed by both {owner!r} and {app!r}")
        self._exact = exact
        self._wildcard = wildcard
        self.default = default

    def match(self, host: str | None) -> str | None:
        """The app for `host` (as a peek returns it; re-normalised case and trailing dot)."""
        if host is None:
            return self.default
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        app = self._exact.get(host)
        if app is not None:
            return app
        if self._wildcard and ":" not in host:
            # Longest suffix first, so "*.a.example.org" beats "*.example.org"; the host
            # itself is not a candidate, which keeps "*.example.org" off "example.org".
            dot = host.find(".")
            while dot >= 0:
                app = self._wildcard.get(host[dot + 1:])
                if app is not None:
                    return app
                dot = host.find(".", dot + 1)
        return self.default


@dataclass(frozen=True)
class ListenerRoute:
    """How one balance listener picks an app: one app outright, or by Host/SNI."""
    only_app: str | None
    hosts: HostTable | None


def build_routes(payload: Mapping) -> dict[str, ListenerRoute]:
    """Each listener's route from a routing table (see `balancer.process.routing_payload`).
    ValueError on a host pattern `HostTable` refuses."""
    routes = {}
    apps = payload["apps"]
    for name, app_names in payload["listeners"].items():
        if len(app_names) == 1:
            routes[name] = ListenerRoute(app_names[0], None)
        else:
            routes[name] = ListenerRoute(None, HostTable(
                [(app, tuple(apps[app]["hosts"]), apps[app]["default"]) for app in app_names]))
    return routes
