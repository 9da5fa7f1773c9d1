"""The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 text and v2 binary), parsed.

A listener with ``proxy_protocol = true`` sits behind a trusted L4 balancer that opens
every connection with one PROXY header saying who the real client is. `parse` decides,
from the bytes received so far, whether they start with such a header. It never touches
a socket: the server buffers what it reads and asks again while the answer is
"need_more", then hands ``data[consumed:]`` to the HTTP parser.

Promises:

1. Prefix-monotone. Growing prefixes of any input answer ``need_more`` zero or more
   times, then one final answer that more bytes cannot change. Every proper prefix of a
   valid header is ``need_more``; a prefix that no valid header starts with is
   ``invalid`` at once (for v1 byte by byte, down to a half-written address or port; for
   v2 as soon as the fixed 16 bytes or a TLV's own header say so).
2. Strict. There is no "maybe it is plain HTTP" fallback: on a PROXY listener a
   connection that does not open with a valid header is not from our balancer, and
   trusting its bytes would let anyone choose their REMOTE_ADDR.
3. Bounded. A v1 header ends within 107 bytes (the spec's limit); a v2 header declares at
   most `V2_MAX_LENGTH` bytes after its fixed part. Work per call is linear in that.

What a valid header means for the client address (`Result.use_peer`, `Result.source`):

- v1 ``TCP4``/``TCP6`` and v2 ``PROXY`` over ``AF_INET``/``AF_INET6``: the client is
  ``source``, as ``(host, port)`` with the host written as ``accept()`` would report
  it (IPv6 compressed, lowercase).
- v1 ``UNKNOWN``, v2 ``LOCAL`` (the balancer's own health check) and v2 ``PROXY`` with
  ``AF_UNSPEC``: the spec says to use the real connection's endpoints, so ``use_peer``.
- v2 ``PROXY`` over ``AF_UNIX``: the client has no IP address: ``source`` is None and
  ``use_peer`` is False (REMOTE_ADDR becomes empty rather than the balancer's address).

Choices where the spec leaves room, all on the strict side:

- v1: exactly one space between fields; addresses must be of the declared family (IPv4
  as four decimal octets without leading zeros; IPv6 without a zone id); ports are
  decimal 0-65535 without leading zeros (senders print them with ``%u``); only
  printable ASCII before the CRLF (after ``UNKNOWN`` too, whose remaining fields are
  ignored); a lone CR or LF is invalid.
- v2: datagram transports are refused (this is a stream server), as is any
  family/transport byte the spec does not list. With ``LOCAL`` the family byte and the
  whole address block are ignored, as the spec says. Otherwise the declared length must
  hold the family's address block, and the bytes after it must be whole TLVs (their
  contents are skipped: we use none of them).

Who may send a header at all is a listener's ``proxy_allow_ips`` (`AllowList`), checked
against the connection's direct peer before any of its bytes count; `RefusalLog` says
when a refused peer is worth a log line.
"""

from __future__ import annotations

import ipaddress
import socket  # address formatting only: no I/O here
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Result", "parse", "AllowList", "RefusalLog", "allow_entry", "DEFAULT_ALLOW_IPS",
           "V1_MAX_LENGTH", "V2_MAX_LENGTH", "V2_SIGNATURE"]

Status = Literal["need_more", "ok", "invalid"]

V1_MAX_LENGTH = 107                      # "PROXY UNKNOWN" + two IPv6 + two ports + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16                            # signature, version/command, family, length
# The spec sizes headers to fit a 536-byte TCP segment; real senders add a few TLVs
# (AWS's VPC endpoint id, Azure's link id, HAProxy's SSL facts). 4 KiB leaves room.
V2_MAX_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class Result:
    """The verdict on the bytes seen so far.

    ``consumed`` (the header's length), ``source``, ``dest`` and ``use_peer`` mean
    something only when status is "ok"; ``reason`` says why "invalid" (or, for "ok",
    which kind of header it was), for logs only."""
    status: Status
    consumed: int = 0
    source: tuple[str, int] | None = None
    dest: tuple[str, int] | None = None
    use_peer: bool = False               # use the real connection's addresses
    reason: str = field(default="", compare=False)


NEED_MORE = Result("need_more")


# ---------------------------------------------------------------- who may send one

DEFAULT_ALLOW_IPS = ("127.0.0.1", "::1")   # a balancer on the same host


def allow_entry(text: str) -> str:
    """One ``proxy_allow_ips`` entry, normalised: an IP address, a network in CIDR form
    (no host bits set: "10.0.0.1/8" is refused rather than guessed at) or "*". Raises
    ValueError(what was expected) for anything else."""
    if text == "*":
        return text
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValueError("an IP address, a network in CIDR form (such as '10.0.0.0/8', "
                         "with no host bits set) or '*'") from None
    return str(network) if "/" in text else str(network.network_address)


class AllowList:
    """The direct peers whose PROXY headers are believed (a listener's ``proxy_allow_ips``).

    ``entries``: what `allow_entry` accepts; raises ValueError for anything else. "*"
    allows every peer. A peer that is not an (address, port) tuple is a UNIX socket's:
    allowed, since only local processes reach one and its file permissions choose
    which. An IPv4-mapped IPv6 peer ("::ffff:10.0.0.1", on a dual-stack listener) is
    judged as the IPv4 address it carries."""

    __slots__ = ("_networks", "_any", "_verdicts")

    def __init__(self, entries=DEFAULT_ALLOW_IPS) -> None:
        entries = [allow_entry(entry) for entry in entries]
        self._any = "*" in entries
        self._networks = tuple(ipaddress.ip_network(e) for e in entries if e != "*")
        self._verdicts: dict[str, bool] = {}   # memo by peer host: balancers are few

    def allows(self, peer) -> bool:
        if self._any or type(peer) is not tuple:
            return True
        host = peer[0]
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._judge(host)
            if len(self._verdicts) < 256:
                self._verdicts[host] = verdict
        return verdict

    def _judge(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class RefusalLog:
    """When a refused peer is worth a log line: the first refusal of every
    ``interval_s`` (on the caller's clock), with the count of those left unsaid."""

    __slots__ = ("interval_s", "_logged_at", "_unsaid")

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._logged_at: float | None = None
        self._unsaid = 0

    def note(self, now: float) -> int | None:
        """One more refusal, at ``now``. Returns None to stay quiet, or (log it) how many
        refusals since the last line went unsaid."""
        if self._logged_at is not None and now - self._logged_at < self.interval_s:
            self._unsaid += 1
            return None
        unsaid, self._unsaid = self._unsaid, 0
        self._logged_at = now
        return unsaid


def _invalid(reason: str) -> Result:
    return Result("invalid", reason=reason)


def parse(data: bytes) -> Result:
    """Is ``data`` the start of a stream that opens with a PROXY header?"""
    if not data:
        return NEED_MORE
    first = data[0]
    if first == 0x50:                    # "P"
        return _parse_v1(data)
    if first == 0x0D:                    # "\r", as the v2 signature starts
        return _parse_v2(data)
    return _invalid("not a PROXY header")


# ---------------------------------------------------------------- v1 (text)

_V1_PREFIX = b"PROXY "
_V1_FAMILIES = (b"TCP4", b"TCP6", b"UNKNOWN")


def _parse_v1(data: bytes) -> Result:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end >= 0:
        return _v1_line(data[:end], end + 2)
    # No CRLF yet. A lone CR can only be the start of the final CRLF.
    if data[-1] == 0x0D:
        body = data[:-1]
        if len(body) > V1_MAX_LENGTH - 2:
            return _invalid("v1 header longer than 107 bytes")
        verdict = _v1_line(body, len(data) + 1)
        return NEED_MORE if verdict.status == "ok" else verdict
    if len(data) > V1_MAX_LENGTH - 2:
        return _invalid("v1 header longer than 107 bytes")
    return _v1_prefix(data)


def _printable(data: bytes) -> bool:
    return all(0x20 <= b <= 0x7E for b in data)


def _v1_line(line: bytes, consumed: int) -> Result:
    """A whole v1 line, CRLF stripped."""
    if not line.startswith(_V1_PREFIX):
        return _invalid("v1 header does not start with 'PROXY '")
    if not _printable(line):
        return _invalid("v1 header has a control or non-ASCII byte")
    fields = line[len(_V1_PREFIX):].split(b" ")
    family = fields[0]
    if family == b"UNKNOWN":
        return Result("ok", consumed, use_peer=True, reason="v1 UNKNOWN")
    if family not in (b"TCP4", b"TCP6"):
        return _invalid("v1 family is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        return _invalid("v1 header needs exactly 4 single-space separated fields after the family")
    _, src, dst, sport, dport = fields
    is_addr = _is_ipv4 if family == b"TCP4" else _is_ipv6
    if not (is_addr(src) and is_addr(dst)):
        return _invalid(f"v1 address is not a valid {family.decode()} address")
    if not (_is_port(sport) and _is_port(dport)):
        return _invalid("v1 port is not decimal 0-65535 without leading zeros")
    return Result("ok", consumed, (_host(src), int(sport)), (_host(dst), int(dport)),
                  reason=f"v1 {family.decode()}")


def _v1_prefix(data: bytes) -> Result:
    """Could ``data`` (no CR or LF yet, short enough) grow into a valid v1 line?"""
    if len(data) <= len(_V1_PREFIX):
        return NEED_MORE if _V1_PREFIX.startswith(data) else _invalid("not a PROXY header")
    if not data.startswith(_V1_PREFIX):
        return _invalid("not a PROXY header")
    if not _printable(data):
        return _invalid("v1 header has a control or non-ASCII byte")
    fields = data[len(_V1_PREFIX):].split(b" ")
    family = fields[0]
    if len(fields) == 1:                 # the family itself is still arriving
        if any(f.startswith(family) for f in _V1_FAMILIES):
            return NEED_MORE
        return _invalid("v1 family is not TCP4, TCP6 or UNKNOWN")
    if family == b"UNKNOWN":
        return NEED_MORE                 # anything up to the CRLF is ignored
    if family not in (b"TCP4", b"TCP6"):
        return _invalid("v1 family is not TCP4, TCP6 or UNKNOWN")
    if len(fields) > 5:
        return _invalid("v1 header has too many fields")
    # Fields before the last are complete; the last one may still be growing.
    is_addr, addr_prefix = ((_is_ipv4, _ipv4_prefix) if family == b"TCP4"
                            else (_is_ipv6, _ipv6_prefix))
    complete = (is_addr, is_addr, _is_port)
    partial = (addr_prefix, addr_prefix, _port_prefix, _port_prefix)
    for i, value in enumerate(fields[1:-1]):
        if not complete[i](value):
            return _invalid("v1 field is malformed")
    if not partial[len(fields) - 2](fields[-1]):
        return _invalid("v1 field is malformed")
    return NEED_MORE


def _is_port(value: bytes) -> bool:
    return (value.isdigit() and len(value) <= 5 and (value == b"0" or value[0] != 0x30)
            and int(value) <= 65535)


def _port_prefix(value: bytes) -> bool:
    return not value or _is_port(value)   # every prefix of a valid port is a valid port


def _is_octet(value: bytes) -> bool:
    return _is_port(value) and len(value) <= 3 and int(value) <= 255


def _is_ipv4(value: bytes) -> bool:
    parts = value.split(b".")
    return len(parts) == 4 and all(_is_octet(p) for p in parts)


def _ipv4_prefix(value: bytes) -> bool:
    parts = value.split(b".")
    return (len(parts) <= 4 and all(_is_octet(p) for p in parts[:-1])
            and (not parts[-1] or _is_octet(parts[-1])))


_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")
_IPV6_MAX = 45                           # ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255


def _is_ipv6(value: bytes) -> bool:
    # The charset rules out what ipaddress would accept but a header must not carry:
    # zone ids ("%eth0"), brackets, whitespace.
    if not value or len(value) > _IPV6_MAX or not _IPV6_CHARS.issuperset(value):
        return False
    try:
        ipaddress.IPv6Address(value.decode("ascii"))
    except ValueError:
        return False
    return True


# Enough endings to complete any viable IPv6 prefix whose last group is hex: finish the
# group (or not), then end, compress the rest with "::", or pad with ":0" groups.
_IPV6_ENDINGS = tuple(mid + tail for mid in (b"", b"0")
                      for tail in (b"", b":", b"::", *(b":0" * k for k in range(1, 8))))


def _ipv6_prefix(value: bytes) -> bool:
    if not value:
        return True
    if len(value) > _IPV6_MAX or not _IPV6_CHARS.issuperset(value):
        return False
    head, _, last = value.rpartition(b":")
    if b"." in last:
        # An embedded IPv4 tail must come last: only its octets can still grow.
        if not _ipv4_prefix(last):
            return False
        parts = last.split(b".")
        parts[-1] = parts[-1] or b"0"
        parts += [b"0"] * (4 - len(parts))
        return _is_ipv6(value[:len(value) - len(last)] + b".".join(parts))
    return any(_is_ipv6(value + ending) for ending in _IPV6_ENDINGS)


def _host(value: bytes) -> str:
    if b":" not in value:
        return value.decode("ascii")     # strict dotted quad: already canonical
    return _ipv6_text(ipaddress.IPv6Address(value.decode("ascii")).packed)


def _ipv6_text(packed: bytes) -> str:
    # The C library's form, as accept() reports peers: "::ffff:1.2.3.4" stays dotted
    # (ipaddress would print "::ffff:102:304" before Python 3.13), so REMOTE_ADDR and
    # forwarded_allow_ips compare alike with and without PROXY.
    return socket.inet_ntop(socket.AF_INET6, packed)


# ---------------------------------------------------------------- v2 (binary)

_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
# Address block sizes by family: two addresses, then two ports for the IP families.
_ADDR_LEN = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


def _parse_v2(data: bytes) -> Result:
    n = len(data)
    if n < 12:
        return NEED_MORE if V2_SIGNATURE.startswith(data) else _invalid("not a PROXY header")
    if data[:12] != V2_SIGNATURE:
        return _invalid("not a PROXY header")
    if n == 12:
        return NEED_MORE
    if data[12] >> 4 != 2:
        return _invalid("v2 version is not 2")
    command = data[12] & 0xF
    if command not in (_LOCAL, _PROXY):
        return _invalid("v2 command is neither LOCAL nor PROXY")
    if n == 13:
        return NEED_MORE
    family, transport = data[13] >> 4, data[13] & 0xF
    if command == _PROXY:
        if data[13] != 0x00 and (family not in _ADDR_LEN or family == _AF_UNSPEC
                                 or transport not in (_STREAM, _DGRAM)):
            return _invalid("v2 address family or transport is not one the spec defines")
        if transport == _DGRAM:
            return _invalid("v2 datagram transport on a stream listener")
    if n < V2_FIXED:
        return NEED_MORE
    length = int.from_bytes(data[14:16], "big")
    if length > V2_MAX_LENGTH:
        return _invalid(f"v2 header declares {length} bytes, more than {V2_MAX_LENGTH}")
    total = V2_FIXED + length
    if command == _LOCAL:
        # The balancer's own connection (a health check): the block is to be ignored.
        return NEED_MORE if n < total else Result("ok", total, use_peer=True, reason="v2 LOCAL")
    addr_len = _ADDR_LEN[family]
    if length < addr_len:
        return _invalid("v2 length is too short for the address family")
    if family != _AF_UNSPEC:
        # Walk the TLVs that have arrived, so a bad one is refused without waiting.
        at = V2_FIXED + addr_len
        while at + 3 <= min(n, total):
            at += 3 + int.from_bytes(data[at + 1:at + 3], "big")
        if at > total or (n >= total and at != total):
            return _invalid("v2 TLVs do not fill the declared length exactly")
    if n < total:
        return NEED_MORE
    if family == _AF_UNSPEC:
        return Result("ok", total, use_peer=True, reason="v2 PROXY AF_UNSPEC")
    block = data[V2_FIXED:V2_FIXED + addr_len]
    if family == _AF_UNIX:
        return Result("ok", total, reason="v2 PROXY AF_UNIX")
    size = 4 if family == _AF_INET else 16
    text = socket.inet_ntoa if family == _AF_INET else _ipv6_text
    src = text(block[:size])
    dst = text(block[size:2 * size])
    sport = int.from_bytes(block[2 * size:2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2:2 * size + 4], "big")
    return Result("ok", total, (src, sport), (dst, dport),
                  reason="v2 PROXY " + ("AF_INET" if family == _AF_INET else "AF_INET6"))
