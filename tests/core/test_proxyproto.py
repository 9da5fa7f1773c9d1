"""PROXY protocol header parsing (supervisor.http.proxyproto), data-driven.

Every valid header is checked whole, byte by byte (each proper prefix is need_more) and
with HTTP bytes after it (``consumed`` stops at the header). Every invalid input is
checked for the byte at which it becomes invalid: need_more before, invalid from there
on, whatever follows.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from supervisor.http import proxyproto
from supervisor.http.proxyproto import V2_SIGNATURE, parse

HTTP = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


def v2(command: int = 0x21, family: int = 0x11, block: bytes = b"", length: int | None = None) -> bytes:
    n = len(block) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", n) + block


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


WORST_V6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

# (id, header, source, dest, use_peer)
VALID = [
    ("v1_tcp4", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     ("192.168.0.1", 56324), ("192.168.0.11", 443), False),
    ("v1_tcp4_edges", b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
     ("0.0.0.0", 0), ("255.255.255.255", 65535), False),
    ("v1_tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n",
     ("2001:db8::1", 1234), ("2001:db8::2", 80), False),
    ("v1_tcp6_normalised", b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n",
     ("2001:db8::1", 1), ("::1", 2), False),
    ("v1_tcp6_v4_mapped", b"PROXY TCP6 ::ffff:10.0.0.1 ::ffff:10.0.0.2 1 2\r\n",
     ("::ffff:10.0.0.1", 1), ("::ffff:10.0.0.2", 2), False),
    ("v1_tcp6_longest", f"PROXY TCP6 {WORST_V6} {WORST_V6} 65535 65535\r\n".encode(),
     (WORST_V6, 65535), (WORST_V6, 65535), False),
    ("v1_unknown", b"PROXY UNKNOWN\r\n", None, None, True),
    ("v1_unknown_fields", b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", None, None, True),
    # The spec's worst case: exactly 107 bytes.
    ("v1_unknown_107", f"PROXY UNKNOWN {WORST_V6} {WORST_V6} 65535 65535\r\n".encode(),
     None, None, True),
    ("v2_inet", v2(0x21, 0x11, inet("192.168.1.10", "192.168.1.1", 12345, 443)),
     ("192.168.1.10", 12345), ("192.168.1.1", 443), False),
    ("v2_inet6", v2(0x21, 0x21, inet("2001:db8::1", "2001:db8::2", 54321, 80)),
     ("2001:db8::1", 54321), ("2001:db8::2", 80), False),
    ("v2_inet6_v4_mapped", v2(0x21, 0x21, inet("::ffff:1.2.3.4", "::1", 1, 2)),
     ("::ffff:1.2.3.4", 1), ("::1", 2), False),
    ("v2_inet_tlvs", v2(0x21, 0x11, inet("10.0.0.1", "10.0.0.2", 1, 2)
                        + tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0xEA, b"\x01vpce-1")),
     ("10.0.0.1", 1), ("10.0.0.2", 2), False),
    ("v2_inet6_max_length", v2(0x21, 0x21, inet("::2", "::3", 7, 8)
                               + tlv(0x04, bytes(proxyproto.V2_MAX_LENGTH - 36 - 3))),
     ("::2", 7), ("::3", 8), False),
    ("v2_local", v2(0x20, 0x00), None, None, True),
    # LOCAL: the family and the whole block are ignored, as the spec says.
    ("v2_local_with_block", v2(0x20, 0x11, inet("10.0.0.1", "10.0.0.2", 1, 2)), None, None, True),
    ("v2_unspec", v2(0x21, 0x00), None, None, True),
    ("v2_unspec_with_bytes", v2(0x21, 0x00, b"\x01\x02\x03"), None, None, True),
    ("v2_unix", v2(0x21, 0x31, b"/run/src.sock".ljust(108, b"\0") + b"/run/dst".ljust(108, b"\0")),
     None, None, False),
]


@pytest.mark.parametrize(("header", "source", "dest", "use_peer"),
                         [pytest.param(*case[1:], id=case[0]) for case in VALID])
def test_valid(header: bytes, source, dest, use_peer: bool) -> None:
    want = proxyproto.Result("ok", len(header), source, dest, use_peer)
    assert parse(header) == want
    for i in range(len(header)):
        assert parse(header[:i]).status == "need_more", header[:i]
    for tail in (HTTP, b"\r\n", b"PROXY TCP4 1.1.1.1 1.1.1.1 1 1\r\n", V2_SIGNATURE):
        assert parse(header + tail) == want


# (id, data, length at which it becomes invalid: need_more for every shorter prefix)
INVALID = [
    ("http", HTTP, 1),
    ("tls", b"\x16\x03\x01\x02\x00\x01", 1),
    ("lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 1),
    ("no_space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", 6),
    ("double_space", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 7),
    ("tab", b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n", 6),
    ("bad_family", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", 10),
    ("family_udp", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", 8),   # "U" may start UNKNOWN
    ("unknownx", b"PROXY UNKNOWNX\r\n", 14),
    ("v6_in_tcp4", b"PROXY TCP4 ::1 ::1 1 2\r\n", 12),
    ("v4_in_tcp6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", 13),
    ("octet_leading_zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", 13),
    ("octet_256", b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", 14),
    ("three_octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", 17),
    ("five_octets", b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", 19),
    ("empty_octet", b"PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n", 14),
    ("hostname", b"PROXY TCP4 not-an-ip 192.168.0.11 56324 443\r\n", 12),
    ("v6_double_compression", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", 17),
    ("v6_group_too_long", b"PROXY TCP6 12345::1 ::1 1 2\r\n", 16),
    ("v6_nine_groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", 27),
    ("v6_zone_id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", 19),
    ("v6_brackets", b"PROXY TCP6 [::1] ::1 1 2\r\n", 12),
    ("v6_v4_tail_too_early", b"PROXY TCP6 1:2:3:4:5:6:7:1.2.3.4 ::1 1 2\r\n", 27),
    ("port_too_big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", 32),
    ("port_leading_zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 0443 2\r\n", 29),
    ("port_sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", 28),
    ("port_letters", b"PROXY TCP4 192.168.0.1 192.168.0.11 65iii 100000\r\n", 39),
    ("dport_too_big", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n", 35),
    ("missing_dport", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", 29),
    ("missing_port_field", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n", 28),
    ("extra_field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", 31),
    ("trailing_space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", 31),
    ("truncated_address", b"PROXY TCP4 192.168.0.1 192.16...\r\n", 31),
    ("bare_lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31),
    ("cr_without_lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n", 32),
    ("cr_inside", b"PROXY UNKNOWN \r \r\n", 16),
    ("non_ascii", b"PROXY UNKNOWN caf\xc3\xa9\r\n", 18),
    ("nul", b"PROXY UNKNOWN \x00\r\n", 15),
    # The CRLF must end by byte 107: at 106 bytes without a pending CR it cannot.
    ("too_long", b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", 106),
    ("too_long_cr", b"PROXY UNKNOWN " + b"x" * 91 + b"\r\r\n", 107),
    ("v2_bad_signature", V2_SIGNATURE[:5] + b"X" + V2_SIGNATURE[6:] + b"\x21\x11\x00\x00", 6),
    ("v2_signature_then_http", V2_SIGNATURE[:3] + HTTP, 4),
    ("v2_version_1", v2(0x11, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2)), 13),
    ("v2_version_3", v2(0x31, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2)), 13),
    ("v2_command_2", v2(0x22, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2)), 13),
    ("v2_family_4", v2(0x21, 0x41, inet("1.2.3.4", "5.6.7.8", 1, 2)), 14),
    ("v2_inet_unspec_transport", v2(0x21, 0x10, inet("1.2.3.4", "5.6.7.8", 1, 2)), 14),
    ("v2_unspec_stream", v2(0x21, 0x01), 14),
    ("v2_transport_3", v2(0x21, 0x13, inet("1.2.3.4", "5.6.7.8", 1, 2)), 14),
    ("v2_dgram", v2(0x21, 0x12, inet("1.2.3.4", "5.6.7.8", 1, 2)), 14),
    ("v2_too_long", v2(0x21, 0x11, length=proxyproto.V2_MAX_LENGTH + 1), 16),
    ("v2_local_too_long", v2(0x20, 0x00, length=0xFFFF), 16),
    ("v2_inet_short", v2(0x21, 0x11, b"\x01" * 8), 16),
    ("v2_inet6_short", v2(0x21, 0x21, inet("1.2.3.4", "5.6.7.8", 1, 2)), 16),
    ("v2_unix_short", v2(0x21, 0x31, bytes(108)), 16),
    # A TLV that overruns the declared length is refused once its own header is in.
    ("v2_tlv_overrun", v2(0x21, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x02\x00\x14" + b"a" * 10,
                          length=12 + 13), 16 + 12 + 3),
    ("v2_tlv_stub", v2(0x21, 0x11, inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x04\x00"), 16 + 14),
]


@pytest.mark.parametrize(("data", "at"), [pytest.param(*case[1:], id=case[0]) for case in INVALID])
def test_invalid(data: bytes, at: int) -> None:
    assert at <= len(data)
    for i in range(at):
        assert parse(data[:i]).status == "need_more", data[:i]
    for i in range(at, len(data) + 1):
        result = parse(data[:i])
        assert result.status == "invalid", data[:i]
        assert result.reason and not result.consumed and result.source is None
    assert parse(data + HTTP).status == "invalid"


def test_result_is_frozen() -> None:
    result = parse(VALID[0][1])
    with pytest.raises(AttributeError):
        result.source = ("6.6.6.6", 1)  # type: ignore[misc]


def _random_ipv6(rnd: random.Random) -> str:
    groups = [rnd.choice((0, 0, rnd.getrandbits(16), rnd.getrandbits(4))) for _ in range(8)]
    addr = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
    style = rnd.randrange(5)
    if style == 0:
        return addr.exploded
    if style == 1:
        return addr.compressed.upper()
    if style == 2:   # an embedded IPv4 tail, after six groups or after "::"
        tail = str(ipaddress.IPv4Address(addr.packed[12:]))
        groups = addr.exploded.split(":")
        if rnd.random() < 0.5:
            return ":".join(groups[:6]) + ":" + tail
        return ":".join(groups[:rnd.randrange(6)]) + "::" + tail
    if style == 3:   # "::" standing for a single zero group
        parts = addr.exploded.split(":")
        i = rnd.randrange(8)
        return ":".join(parts[:i]) + "::" + ":".join(parts[i + 1:])
    return addr.compressed


def test_every_prefix_of_random_ipv6_headers_is_need_more() -> None:
    """The IPv6 prefix check must never refuse the start of a valid address."""
    rnd = random.Random(3)
    for _ in range(300):
        src, dst = _random_ipv6(rnd), _random_ipv6(rnd)
        header = f"PROXY TCP6 {src} {dst} {rnd.randrange(65536)} 443\r\n".encode()
        result = parse(header)
        assert result.status == "ok", header
        assert result.source[0] == str(ipaddress.IPv6Address(src)) or "." in result.source[0]
        assert ipaddress.IPv6Address(result.source[0]) == ipaddress.IPv6Address(src)
        for i in range(len(header)):
            assert parse(header[:i]).status == "need_more", header[:i]


def test_mutations_are_prefix_monotone() -> None:
    """Random single-byte damage to valid headers: need_more, then one final answer."""
    rnd = random.Random(5)
    headers = [case[1] for case in VALID if len(case[1]) < 400]
    for _ in range(2000):
        data = bytearray(rnd.choice(headers) + HTTP)
        data[rnd.randrange(len(data))] = rnd.choice(b"\x00\r\n :.0159afxP\xff")
        data = bytes(data)
        final = None
        for i in range(len(data) + 1):
            result = parse(data[:i])
            if final is None:
                if result.status != "need_more":
                    final = result
            else:
                assert result == final, data[:i]
        if final is not None and final.status == "ok":
            assert final.consumed <= len(data)


# ---------------------------------------------------------------- who may send a header

@pytest.mark.parametrize(("entries", "peer", "allowed"), [
    (proxyproto.DEFAULT_ALLOW_IPS, ("127.0.0.1", 5000), True),
    (proxyproto.DEFAULT_ALLOW_IPS, ("::1", 5000, 0, 0), True),
    (proxyproto.DEFAULT_ALLOW_IPS, ("::ffff:127.0.0.1", 5000, 0, 0), True),   # a dual-stack listener
    (proxyproto.DEFAULT_ALLOW_IPS, ("127.0.0.2", 5000), False),
    (proxyproto.DEFAULT_ALLOW_IPS, ("10.0.0.9", 5000), False),
    (("10.0.0.0/8",), ("10.255.0.1", 1), True),
    (("10.0.0.0/8",), ("11.0.0.1", 1), False),
    (("10.0.0.0/8",), ("127.0.0.1", 1), False),
    (("10.0.0.0/8",), ("::ffff:10.1.1.1", 1, 0, 0), True),
    (("fd00::/8",), ("fd12::1", 1, 0, 0), True),
    (("fd00::/8",), ("fe80::1", 1, 0, 0), False),
    (("192.0.2.7",), ("192.0.2.7", 1), True),
    (("*",), ("203.0.113.5", 1), True),
    ((), ("127.0.0.1", 1), False),
    (("10.0.0.0/8",), "", True),               # a UNIX socket's peer: its permissions choose
    (("10.0.0.0/8",), "/run/lb.sock", True),
    (("10.0.0.0/8",), ("not an address", 1), False),
])
def test_allow_list(entries, peer, allowed) -> None:
    allow = proxyproto.AllowList(entries)
    assert allow.allows(peer) is allowed
    assert allow.allows(peer) is allowed   # the memoised verdict is the same


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "10.0.0.0/33", "localhost", "10.0.0", "", "::1/129", "**"])
def test_allow_list_refuses_entries_it_cannot_read(entry) -> None:
    with pytest.raises(ValueError):
        proxyproto.AllowList([entry])
    with pytest.raises(ValueError):
        proxyproto.allow_entry(entry)


def test_refusal_log_says_one_line_per_interval_with_the_count_left_unsaid() -> None:
    log = proxyproto.RefusalLog(60.0)
    assert [log.note(t) for t in (0.0, 1.0, 59.9, 60.0, 61.0, 200.0)] == [0, None, None, 2, None, 1]
