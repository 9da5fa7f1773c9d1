"""Who the client is, and which scheme it used, behind proxies we trust (pure).

A proxy appends the address it received a request from to ``X-Forwarded-For`` (nginx's
``$proxy_add_x_forwarded_for``) or adds an element to ``Forwarded`` (RFC 7239); what
is left of its own entry is whatever the client wrote. So the client is found by
walking from the right: the direct peer must be a trusted proxy (``forwarded_allow_ips``,
addresses, CIDR networks or "*"; a UNIX socket's peer is trusted, as its file
permissions choose who connects, gunicorn's rule too); each entry it vouches for is
taken, and the walk goes on only while that entry is itself a trusted proxy. An entry
that is not an IP address (garbage, ``unknown``, an RFC 7239 obfuscated ``_name``)
stops the walk at the last trusted hop: the client's address is never text a client
chose unchecked.

Only one header is read for the address, the one the proxy writes (``forwarded_header``):
nginx passes a client's ``Forwarded`` through untouched, so believing it beside
``X-Forwarded-For`` would let any client spoof its address.

The scheme comes from ``secure_scheme_headers`` (gunicorn's map: header -> the value
meaning https) and, with ``forwarded_header = "forwarded"``, the ``proto=`` of the
element the walk ended on. Headers that disagree leave the connection's own scheme:
a request whose proxies contradict each other is never taken for https.
"""
from __future__ import annotations

import ipaddress
import re
import socket  # address formatting only: no I/O here
from typing import Mapping

from supervisor.config import hostnames
from supervisor.http.proxyproto import AllowList

__all__ = ["ForwardedTrust", "DEFAULT_SECURE_SCHEME_HEADERS", "FORWARDED_HEADERS", "environ_key",
           "parse_node", "parse_forwarded"]

# gunicorn's default secure_scheme_headers; names compare case-insensitively.
DEFAULT_SECURE_SCHEME_HEADERS = {"X-Forwarded-Protocol": "ssl", "X-Forwarded-Proto": "https",
                                 "X-Forwarded-Ssl": "on"}
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")

_TCHAR = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
# One forwarded-pair: token "=" (token | quoted-string). Unquoted values are read a
# little wider than a token (a ":" or "[" some proxies leave unquoted), never past a
# separator or a quote.
_PAIR = re.compile(rf'[ \t]*({_TCHAR}+)=(?:"((?:[^"\\]|\\.)*)"|([^;," \t]*))[ \t]*')
_ESCAPE = re.compile(r"\\(.)")
_PORT = re.compile(r"[0-9]{1,5}")


def environ_key(header: str) -> str:
    """The CGI environ key of a header name."""
    return "HTTP_" + header.upper().replace("-", "_")


def parse_node(text: str, *, obfuscated_port: bool = False) -> tuple[str, int | None] | None:
    """An address as a proxy writes it: "1.2.3.4", "1.2.3.4:80", "2001:db8::1",
    "[2001:db8::1]:80" -> (canonical address, port or None); None for anything else.
    ``obfuscated_port`` lets an RFC 7239 "_name" stand for the port (it reads as None)."""
    text = text.strip()
    port_text = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or ":" not in host:
            return None
        if rest:
            if rest[0] != ":":
                return None
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    port = None
    if port_text is not None:
        if _PORT.fullmatch(port_text) and int(port_text) <= 65535:
            port = int(port_text)
        elif not (obfuscated_port and port_text.startswith("_") and len(port_text) > 1):
            return None
    if "%" in host or not host.isascii():   # a zone means nothing beyond one host
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 4:
        return str(address), port
    # The C library's form, as accept() reports peers (see proxyproto._ipv6_text).
    return socket.inet_ntop(socket.AF_INET6, address.packed), port


def parse_forwarded(value: str) -> list[dict[str, str]] | None:
    """A Forwarded field value -> its elements, left to right, each {lowercased
    parameter: value unquoted}; None when it does not parse (then none of it counts)."""
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    pos, end = 0, len(value)
    while True:
        match = _PAIR.match(value, pos)
        if match is None:
            return None
        name = match[1].lower()
        if name in current:    # RFC 7239 §4: a parameter at most once per element
            return None
        current[name] = _ESCAPE.sub(r"\1", match[2]) if match[2] is not None else match[3]
        pos = match.end()
        if pos == end:
            elements.append(current)
            return elements
        separator = value[pos]
        pos += 1
        if separator == ",":
            elements.append(current)
            current = {}
        elif separator != ";":
            return None


class ForwardedTrust:
    """What a listener's app believes of proxy headers; `apply` rewrites an environ.

    ``allow_ips``: as `proxyproto.allow_entry` accepts. ``header``: one of
    FORWARDED_HEADERS. ``secure_scheme_headers``: header name -> the value (compared
    case-insensitively) that means https; any other value means http."""

    __slots__ = ("_allow", "header", "_scheme_keys", "keys", "_peers")

    def __init__(self, allow_ips=("127.0.0.1", "::1"), header: str = "x-forwarded-for",
                 secure_scheme_headers: Mapping[str, str] = DEFAULT_SECURE_SCHEME_HEADERS) -> None:
        if header not in FORWARDED_HEADERS:
            raise ValueError(f"forwarded header must be one of {FORWARDED_HEADERS}, not {header!r}")
        self._allow = AllowList(allow_ips)
        self.header = header
        self._scheme_keys = tuple((environ_key(name), secure.lower())
                                  for name, secure in secure_scheme_headers.items())
        # Every environ key whose presence means there is something to apply.
        self.keys = frozenset([environ_key(header), *(key for key, _ in self._scheme_keys)])
        self._peers: dict[str, bool] = {}   # memo of trusts_peer: a worker sees few proxies

    def trusts_peer(self, remote_addr: str) -> bool:
        """Whether the direct peer (REMOTE_ADDR) may speak for the client: an allowed
        address, or a peer with no IP address at all (a UNIX socket's)."""
        verdict = self._peers.get(remote_addr)
        if verdict is None:
            verdict = self._judge_peer(remote_addr)
            if len(self._peers) < 256:
                self._peers[remote_addr] = verdict
        return verdict

    def _judge_peer(self, remote_addr: str) -> bool:
        try:
            ipaddress.ip_address(remote_addr)   # a TCP peer's (a link-local one keeps its %zone)
        except ValueError:
            return True   # only a UNIX socket's peer has none: TCP and PROXY peers always do
        return self._allow.allows((remote_addr, 0))

    def apply(self, environ: dict) -> None:
        """Rewrite REMOTE_ADDR (and REMOTE_PORT), wsgi.url_scheme and, from a Forwarded
        ``host=``, HTTP_HOST, as the headers of a trusted peer say. A peer that is not
        trusted changes nothing."""
        peer = environ.get("REMOTE_ADDR", "")
        if not self.trusts_peer(peer):
            return
        scheme = None
        if self.header == "forwarded":
            value = environ.get("HTTP_FORWARDED")
            elements = parse_forwarded(value) if value is not None else None
            if elements:
                hops = [_forwarded_hop(element.get("for")) for element in elements]
                address, port, chosen = self._walk(peer, hops)
                _set_address(environ, address, port, moved=chosen is not None and address != peer)
                if chosen is not None:
                    element = elements[chosen]
                    proto = element.get("proto", "").lower()
                    if proto in ("http", "https"):
                        scheme = proto
                    host = _host(element.get("host"))
                    if host is not None:
                        environ["HTTP_HOST"] = host
        else:
            value = environ.get("HTTP_X_FORWARDED_FOR")
            if value is not None:
                hops = [parse_node(entry) for entry in value.split(",")]
                address, port, chosen = self._walk(peer, hops)
                _set_address(environ, address, port, moved=chosen is not None and address != peer)
        for key, secure in self._scheme_keys:
            value = environ.get(key)
            if value is None:
                continue
            for item in value.split(","):   # the same header twice arrives joined by ", "
                said = "https" if item.strip().lower() == secure else "http"
                if scheme is not None and said != scheme:
                    return   # contradictory: keep the connection's own scheme
                scheme = said
        if scheme is not None:
            environ["wsgi.url_scheme"] = scheme

    def _walk(self, peer: str, hops: list) -> tuple[str, int | None, int | None]:
        """From the right: (address, port, index of the last element read). Each
        element read was written by a trusted hop; the walk stops after an untrusted
        address (the client) or at an element that is no address (keeping the last
        trusted hop's). index None: not one element was read."""
        address, port, chosen = peer, None, None
        for index in range(len(hops) - 1, -1, -1):
            chosen = index
            hop = hops[index]
            if hop is None:
                break
            address, port = hop
            if not self._allow.allows((address, 0)):
                break
        return address, port, chosen


def _forwarded_hop(node: str | None) -> tuple[str, int | None] | None:
    """A ``for=`` value: an address, or None ("unknown", "_hidden", absent, garbage)."""
    if node is None:
        return None
    return parse_node(node, obfuscated_port=True)


def _host(value: str | None) -> str | None:
    """A ``host=`` value that the Host field's rule accepts, as written; else None."""
    if not value:
        return None
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        ok = bool(bracket) and hostnames.normalise_ipv6(literal) is not None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
        ok = hostnames.normalise_name(name) is not None
    if rest:   # ":PORT", nothing else
        port = rest[1:]
        ok = ok and rest[0] == ":" and _PORT.fullmatch(port) is not None and int(port) <= 65535
    return value if ok else None


def _set_address(environ: dict, address: str, port: int | None, *, moved: bool) -> None:
    if not moved:
        return
    environ["REMOTE_ADDR"] = address
    if port is None:
        environ.pop("REMOTE_PORT", None)
    else:
        environ["REMOTE_PORT"] = str(port)
