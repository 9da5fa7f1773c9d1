"""Host and SNI peeking, and host -> app matching.

Every peek case is fed whole, as every growing prefix (the answers must be "need_more"
until one final answer that more bytes never change), and with trailing bytes after it
(a body, a pipelined request, garbage) which must not change the answer.
"""
from __future__ import annotations

import struct

import pytest

from supervisor.balancer.routing import (
    HostTable,
    Peek,
    looks_like_tls,
    peek_host,
    peek_sni,
)

TRAILERS = [b"hello", b"GET /second HTTP/1.1\r\nHost: other.example\r\n\r\n", b"\x00\xff\r\n\r\n"]


def head(*lines: str, request: str = "GET / HTTP/1.1") -> bytes:
    return "\r\n".join((request, *lines, "", "")).encode("latin-1")


def host(name: str) -> Peek:
    return Peek("host", name)


NO_HOST = Peek("no_host")
INVALID = Peek("invalid")

# (id, bytes, expected). Only reason-free Peeks here: `reason` is not compared.
HTTP_CASES = [
    ("simple", head("Host: example.com"), host("example.com")),
    ("case-and-port", head("hOsT: Example.COM:8080"), host("example.com")),
    ("empty-port", head("Host: example.com:"), host("example.com")),
    ("trailing-dot", head("Host: example.com."), host("example.com")),
    ("ows", head("Host: \t example.com \t"), host("example.com")),
    ("no-ows", head("Host:example.com"), host("example.com")),
    ("other-fields", head("User-Agent: x", "Host: a.b.example", "Accept: */*"), host("a.b.example")),
    ("underscore-label", head("Host: my_app.internal"), host("my_app.internal")),
    ("obs-text-other-field", head("X-Name: caf\xe9", "Host: a.example"), host("a.example")),
    ("ipv4", head("Host: 127.0.0.1:8000"), host("127.0.0.1")),
    ("ipv6", head("Host: [::1]:8080"), host("::1")),
    ("ipv6-compressed", head("Host: [0:0:0:0::1]"), host("::1")),
    ("ipv6-case", head("Host: [FE80::A]"), host("fe80::a")),
    ("http10-host", head("Host: a.example", request="GET / HTTP/1.0"), host("a.example")),
    ("http10-no-host", head(request="GET / HTTP/1.0"), NO_HOST),
    ("http10-no-host-fields", head("Accept: */*", request="GET / HTTP/1.0"), NO_HOST),
    ("empty-host", head("Host:"), NO_HOST),
    ("empty-host-ows", head("Host:  "), NO_HOST),
    ("leading-crlf", b"\r\n" + head("Host: a.example"), host("a.example")),
    ("absolute-form", head("Host: ignored.example", request="GET http://Target.example:81/x?y HTTP/1.1"),
     host("target.example")),
    ("absolute-form-no-path", head("Host: b", request="GET https://t.example HTTP/1.1"), host("t.example")),
    ("absolute-form-http10", head(request="GET http://t.example/ HTTP/1.0"), host("t.example")),
    ("absolute-form-ipv6", head("Host: b", request="GET http://[::2]/ HTTP/1.1"), host("::2")),
    ("options-star", head("Host: a.example", request="OPTIONS * HTTP/1.1"), host("a.example")),
    ("connect", head("Host: a.example:443", request="CONNECT a.example:443 HTTP/1.1"), host("a.example")),
    ("odd-method-token", head("Host: a", request="M-SEARCH! / HTTP/1.1"), host("a")),
    ("http19", head("Host: a", request="GET / HTTP/1.9"), host("a")),
    # Hostile or broken heads.
    ("no-host-http11", head("Accept: */*"), INVALID),
    ("no-host-http11-absolute", head(request="GET http://t.example/ HTTP/1.1"), INVALID),
    ("two-hosts", head("Host: a.example", "Host: a.example"), INVALID),
    ("two-hosts-case", head("Host: a.example", "X: y", "HOST: b.example"), INVALID),
    ("obs-fold", head("Host: a.example", "X-Long: one", " two"), INVALID),
    ("obs-fold-tab", head("Host:", "\ta.example"), INVALID),
    ("space-before-colon", head("Host : a.example"), INVALID),
    ("no-colon", head("Host a.example"), INVALID),
    ("empty-field-name", head(": x", "Host: a"), INVALID),
    ("nul-in-value", head("Host: a.example", "X: a\x00b"), INVALID),
    ("nul-in-host", head("Host: a\x00.example"), INVALID),
    ("ctl-in-name", head("X\x01: y", "Host: a"), INVALID),
    ("del-in-value", head("Host: a", "X: \x7f"), INVALID),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", INVALID),
    ("bare-cr-before-crlf", b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", INVALID),
    ("bare-lf-lines", b"GET / HTTP/1.1\nHost: a\n\n", INVALID),
    ("bare-lf-end", b"GET / HTTP/1.1\r\nHost: a\n\r\n", INVALID),
    ("bare-lf-mixed", b"GET / HTTP/1.1\r\nHost: a\r\n\n", INVALID),
    ("request-line-double-space", head("Host: a", request="GET  / HTTP/1.1"), INVALID),
    ("request-line-leading-space", head("Host: a", request=" GET / HTTP/1.1"), INVALID),
    ("request-line-trailing-space", head("Host: a", request="GET / HTTP/1.1 "), INVALID),
    ("request-line-two-parts", head("Host: a", request="GET /"), INVALID),
    ("request-line-tab", head("Host: a", request="GET\t/ HTTP/1.1"), INVALID),
    ("method-not-token", head("Host: a", request="G(T / HTTP/1.1"), INVALID),
    ("http2-version", head("Host: a", request="GET / HTTP/2.0"), INVALID),
    ("lowercase-version", head("Host: a", request="GET / http/1.1"), INVALID),
    ("version-junk", head("Host: a", request="GET / HTTP/1.1x"), INVALID),
    ("tls-bytes", b"\x16\x03\x01\x00\x05hello", INVALID),
    ("binary", b"\x00\x00\x00\x00", INVALID),
    ("only-crlfs-then-space", b"\r\n\r\n \r\n", INVALID),
    ("host-userinfo", head("Host: user@a.example"), INVALID),
    ("host-path", head("Host: a.example/x"), INVALID),
    ("host-space", head("Host: a example"), INVALID),
    ("host-percent", head("Host: a%2eexample"), INVALID),
    ("host-non-ascii", head("Host: caf\xe9.example"), INVALID),
    ("host-empty-label", head("Host: a..example"), INVALID),
    ("host-leading-dot", head("Host: .a.example"), INVALID),
    ("host-only-dot", head("Host: ."), INVALID),
    ("host-hyphen-edge", head("Host: -a.example"), INVALID),
    ("host-label-too-long", head("Host: " + "a" * 64 + ".example"), INVALID),
    ("host-too-long", head("Host: " + ".".join(["a" * 63] * 4) + ".x"), INVALID),
    ("host-port-letters", head("Host: a.example:http"), INVALID),
    ("host-port-too-big", head("Host: a.example:65536"), INVALID),
    ("host-port-too-long", head("Host: a.example:000080"), INVALID),
    ("host-two-colons", head("Host: a.example:80:80"), INVALID),
    ("host-only-port", head("Host: :80"), INVALID),
    ("host-bad-ipv4", head("Host: 256.1.1.1"), INVALID),
    ("host-short-ipv4", head("Host: 1.2.3"), INVALID),
    ("host-ipv4-leading-zero", head("Host: 01.2.3.4"), INVALID),
    ("host-numeric-tld", head("Host: a.123"), INVALID),
    ("host-bare-ipv6", head("Host: ::1"), INVALID),
    ("host-ipv6-unclosed", head("Host: [::1"), INVALID),
    ("host-ipv6-bad", head("Host: [::g]"), INVALID),
    ("host-ipv6-zone", head("Host: [fe80::1%25eth0]"), INVALID),
    ("host-ipvfuture", head("Host: [v1.x]"), INVALID),
    ("host-ipv6-junk-after", head("Host: [::1]x"), INVALID),
    ("host-unicode-digit-port", head("Host: a.example:\xb2"), INVALID),
    ("bad-host-absolute-form", head("Host: a b", request="GET http://t.example/ HTTP/1.1"), INVALID),
    ("absolute-form-userinfo", head("Host: a", request="GET http://u:p@t.example/ HTTP/1.1"), INVALID),
    ("absolute-form-empty-authority", head("Host: a", request="GET http:/// HTTP/1.1"), INVALID),
    ("absolute-form-bad-authority", head("Host: a", request="GET http://t!x/ HTTP/1.1"), INVALID),
]

VALID_HTTP = [case for case in HTTP_CASES if case[2].status != "invalid"]


def prefix_answers(peek, data: bytes) -> list[Peek]:
    return [peek(data[:n]) for n in range(len(data) + 1)]


def assert_monotone(answers: list[Peek]) -> None:
    """need_more, ..., need_more, then one answer that never changes again."""
    decided = next((i for i, answer in enumerate(answers) if answer.status != "need_more"),
                   len(answers))
    assert all(answer.status == "need_more" for answer in answers[:decided])
    assert all(answer == answers[-1] for answer in answers[decided:]), answers[decided:]


@pytest.mark.parametrize("data, expected", [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_peek_host_whole(data, expected):
    result = peek_host(data)
    assert result == expected, result.reason
    assert (result.reason != "") == (expected.status == "invalid")


@pytest.mark.parametrize("data, expected", [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_peek_host_prefixes_are_monotone(data, expected):
    answers = prefix_answers(peek_host, data)
    assert answers[-1] == expected
    assert_monotone(answers)


@pytest.mark.parametrize("data, expected", [c[1:] for c in VALID_HTTP], ids=[c[0] for c in VALID_HTTP])
def test_peek_host_valid_needs_the_whole_head(data, expected):
    # Every proper prefix, including one holding a complete Host line, is "need_more":
    # the verdict waits for the blank line so a later second Host cannot be smuggled.
    assert all(answer == Peek("need_more") for answer in prefix_answers(peek_host, data)[:-1])


@pytest.mark.parametrize("trailer", TRAILERS)
@pytest.mark.parametrize("data, expected", [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_peek_host_ignores_trailing_bytes(data, expected, trailer):
    assert peek_host(data + trailer) == expected


@pytest.mark.parametrize("data, reason", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n", "more than one Host"),
    (b"GET / HTTP/1.1\r\nX: y\r\n z", "obsolete line folding"),
    (b"GET / HTTP/1.1\r\nHo st", "bad field name"),
    (b"GET / HTTP/1.1\r\n:", "bad field name"),
    (b"GET / HTTP/1.1\r\nX: \x00", "control character in request head"),
    (b"GET / HTTP/1.1\n", "bare CR or LF in request head"),
    (b"GET / HTTP/1.1\r\r", "bare CR or LF in request head"),
    (b"GET / HTTP/3", "bad HTTP version"),
    (b"GET / HTTP/1.1 ", "malformed request line"),
    (b"GET  ", "malformed request line"),
    (b"\x16", "control character in request head"),
    (b"G{", "bad method"),
])
def test_peek_host_rejects_early(data, reason):
    # Hostile prefixes are refused before the head is complete, so the balancer need not
    # wait for (or buffer) the rest of them.
    result = peek_host(data)
    assert result.status == "invalid"
    assert result.reason == reason


def test_max_head_bound():
    data = head("Host: a.example")
    assert peek_host(data, max_head=len(data)) == host("a.example")
    assert peek_host(data + b"body", max_head=len(data)) == host("a.example")
    assert peek_host(data, max_head=len(data) - 1).status == "invalid"
    assert peek_host(data[:-1], max_head=len(data)) == Peek("need_more")


def test_huge_heads():
    valid_so_far = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 8000
    assert len(valid_so_far) < 8192
    assert peek_host(valid_so_far) == Peek("need_more")
    assert peek_host(valid_so_far + b"y" * 200).status == "invalid"
    assert peek_host(b"GET /" + b"a" * 100_000).status == "invalid"
    assert peek_host(b"\r\n" * 5000).status == "invalid"
    many_fields = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"Host: a\r\n\r\n"
    assert peek_host(many_fields).status == "invalid"
    assert peek_host(many_fields, max_head=len(many_fields)) == host("a")


def test_empty_is_need_more():
    assert peek_host(b"") == Peek("need_more")
    assert peek_sni(b"") == Peek("need_more")


def test_peek_is_hashable_and_frozen():
    result = peek_host(head("Host: a"))
    with pytest.raises(AttributeError):
        result.host = "b"
    assert {result, Peek("host", "a", "other reason")} == {result}


# ---------------------------------------------------------------------------------------
# TLS


def u8(n): return struct.pack("!B", n)
def u16(n): return struct.pack("!H", n)
def u24(n): return struct.pack("!I", n)[1:]


def ext(kind: int, payload: bytes) -> bytes:
    return u16(kind) + u16(len(payload)) + payload


def server_name(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(u8(kind) + u16(len(name)) + name for kind, name in names)
    return ext(0, u16(len(entries)) + entries)


def client_hello_body(extensions: bytes | None, *, session_id=b"\x11" * 32,
                      suites=b"\x13\x01\x13\x02\xc0\x2f", compression=b"\x00",
                      version=b"\x03\x03") -> bytes:
    body = (version + b"\x42" * 32 + u8(len(session_id)) + session_id
            + u16(len(suites)) + suites + u8(len(compression)) + compression)
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    return body


def handshake(body: bytes, kind: int = 1) -> bytes:
    return u8(kind) + u24(len(body)) + body


def records(message: bytes, *, fragment: int = 1 << 14, version=b"\x03\x01") -> bytes:
    """`message` as handshake records of at most `fragment` bytes each."""
    return b"".join(b"\x16" + version + u16(len(message[i:i + fragment])) + message[i:i + fragment]
                    for i in range(0, len(message), fragment))


def hello(sni: str | None = "example.com", *, others=True, **kwargs) -> bytes:
    """A plausible TLS 1.3 ClientHello, with SNI between other extensions."""
    extensions = b""
    if others:
        extensions += ext(0x000A, u16(4) + b"\x00\x1d\x00\x17")      # supported_groups
        extensions += ext(0x002B, u8(2) + b"\x03\x04")               # supported_versions
    if sni is not None:
        extensions += server_name((0, sni.encode("latin-1")))
    if others:
        extensions += ext(0x0033, u16(36) + b"\x00\x1d" + u16(32) + b"\x07" * 32)  # key_share
    return records(handshake(client_hello_body(extensions)), **kwargs)


def hello_with(extensions: bytes, **kwargs) -> bytes:
    return records(handshake(client_hello_body(extensions, **kwargs)))


SNI_CASES = [
    ("simple", hello("example.com"), host("example.com")),
    ("case", hello("WWW.Example.COM"), host("www.example.com")),
    ("trailing-dot", hello("example.com."), host("example.com")),
    ("only-sni", hello("a.example", others=False), host("a.example")),
    ("record-version-1.0", hello("a.example", version=b"\x03\x00"), host("a.example")),
    ("record-version-1.2", hello("a.example", version=b"\x03\x03"), host("a.example")),
    ("fragmented-records", hello("a.example", fragment=7), host("a.example")),
    ("one-byte-records", hello("a.example", fragment=1), host("a.example")),
    ("no-sni", hello(None), NO_HOST),
    ("no-extensions-block", records(handshake(client_hello_body(None))), NO_HOST),
    ("empty-extensions-block", hello_with(b""), NO_HOST),
    ("unknown-name-type-only", hello_with(server_name((7, b"opaque"))), NO_HOST),
    ("unknown-name-type-and-host", hello_with(server_name((7, b"opaque"), (0, b"a.example"))), host("a.example")),
    ("no-session-id", hello_with(server_name((0, b"a.example")), session_id=b""), host("a.example")),
    # Malformed.
    ("not-client-hello", records(handshake(client_hello_body(b""), kind=2)), INVALID),
    ("two-host-names", hello_with(server_name((0, b"a.example"), (0, b"b.example"))), INVALID),
    ("duplicate-sni-ext", hello_with(server_name((0, b"a.example")) + server_name((0, b"a.example"))), INVALID),
    ("duplicate-other-ext", hello_with(ext(10, b"") + ext(10, b"")), INVALID),
    ("empty-sni-ext", hello_with(ext(0, b"")), INVALID),
    ("empty-server-name-list", hello_with(ext(0, u16(0))), INVALID),
    ("empty-host-name", hello_with(server_name((0, b""))), INVALID),
    ("sni-list-length-short", hello_with(ext(0, u16(5) + b"\x00" + u16(9) + b"a.example")), INVALID),
    ("sni-list-length-long", hello_with(ext(0, u16(30) + b"\x00" + u16(9) + b"a.example")), INVALID),
    ("sni-name-length-long", hello_with(ext(0, u16(12) + b"\x00" + u16(40) + b"a.example")), INVALID),
    ("sni-ipv4", hello("192.0.2.1"), INVALID),
    ("sni-ipv6", hello("::1"), INVALID),
    ("sni-with-port", hello("a.example:443"), INVALID),
    ("sni-nul", hello("a\x00.example"), INVALID),
    ("sni-non-ascii", hello("caf\xe9.example"), INVALID),
    ("extension-overruns", hello_with(u16(10) + u16(50) + b"x"), INVALID),
    ("extensions-length-too-short", records(handshake(client_hello_body(b"")[:-2] + u16(3) + b"\x00\x0a\x00\x00")), INVALID),
    ("bytes-after-extensions", records(handshake(client_hello_body(ext(10, b"")) + b"\x00")), INVALID),
    ("session-id-too-long", hello_with(b"", session_id=b"\x00" * 33), INVALID),
    ("no-cipher-suites", hello_with(b"", suites=b""), INVALID),
    ("odd-cipher-suites", hello_with(b"", suites=b"\x13\x01\x13"), INVALID),
    ("no-compression", hello_with(b"", compression=b""), INVALID),
    ("legacy-version-not-3", hello_with(b"", version=b"\x02\x00"), INVALID),
    ("truncated-random", records(handshake(b"\x03\x03" + b"\x00" * 10)), INVALID),
    ("empty-body", records(handshake(b"")), INVALID),
    ("zero-length-record", b"\x16\x03\x01\x00\x00" + hello("a.example"), INVALID),
    ("oversized-record", b"\x16\x03\x01\x40\x01" + b"\x01", INVALID),
    ("oversized-hello", b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", INVALID),
    ("alert-record", b"\x15\x03\x01\x00\x02\x02\x28", INVALID),
    ("record-version-2", b"\x16\x02\x00\x00\x01\x01", INVALID),
    ("record-version-1.5", b"\x16\x03\x05\x00\x01\x01", INVALID),
    ("sslv2-hello", b"\x80\x2e\x01\x00\x02", INVALID),
    ("http", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", INVALID),
    ("interleaved-alert", hello("a.example", fragment=20)[:25] + b"\x15\x03\x01\x00\x02\x02\x28", INVALID),
]

VALID_SNI = [case for case in SNI_CASES if case[2].status != "invalid"]


@pytest.mark.parametrize("data, expected", [c[1:] for c in SNI_CASES], ids=[c[0] for c in SNI_CASES])
def test_peek_sni_whole(data, expected):
    result = peek_sni(data)
    assert result == expected, result.reason


@pytest.mark.parametrize("data, expected", [c[1:] for c in SNI_CASES], ids=[c[0] for c in SNI_CASES])
def test_peek_sni_prefixes_are_monotone(data, expected):
    answers = prefix_answers(peek_sni, data)
    assert answers[-1] == expected
    assert_monotone(answers)


@pytest.mark.parametrize("data, expected", [c[1:] for c in VALID_SNI], ids=[c[0] for c in VALID_SNI])
def test_peek_sni_valid_needs_the_whole_hello(data, expected):
    assert all(answer == Peek("need_more") for answer in prefix_answers(peek_sni, data)[:-1])


@pytest.mark.parametrize("trailer", [b"\x14\x03\x03\x00\x01\x01", b"\x16\x03\x03\x00\x05junk!", b"\x00"])
@pytest.mark.parametrize("data, expected", [c[1:] for c in SNI_CASES], ids=[c[0] for c in SNI_CASES])
def test_peek_sni_ignores_trailing_bytes(data, expected, trailer):
    assert peek_sni(data + trailer) == expected


def test_peek_sni_max_hello():
    data = hello("a.example")
    body_length = int.from_bytes(data[6:9], "big")
    assert peek_sni(data, max_hello=body_length) == host("a.example")
    assert peek_sni(data, max_hello=body_length - 1).status == "invalid"
    # A declared length beyond the bound is refused from the handshake header alone.
    assert peek_sni(data[:9], max_hello=body_length - 1).status == "invalid"


@pytest.mark.parametrize("data, expected", [
    (b"", False),
    (b"\x16", True),
    (b"\x16\x03", True),
    (b"\x16\x03\x00", True),
    (b"\x16\x03\x01\x02\x00", True),
    (b"\x16\x03\x04", True),
    (b"\x16\x03\x05", False),
    (b"\x16\x02", False),
    (b"\x15\x03\x01", False),
    (b"GET", False),
    (b"\x80\x2e", False),
])
def test_looks_like_tls(data, expected):
    assert looks_like_tls(data) is expected


def test_dispatch_on_first_byte():
    # The balancer can choose the parser from one byte: TLS starts with 0x16, which HTTP
    # refuses outright, and HTTP never looks like TLS.
    tls, http = hello("a.example"), head("Host: a.example")
    assert looks_like_tls(tls[:1]) and not looks_like_tls(http[:1])
    assert peek_host(tls[:1]).status == "invalid"
    assert peek_sni(http[:1]).status == "invalid"


# ---------------------------------------------------------------------------------------
# HostTable


@pytest.fixture
def table():
    return HostTable([
        ("main", ("example.org", "www.example.org", "[::1]", "127.0.0.1"), True),
        ("wild", ("*.example.org",), False),
        ("deep", ("*.eu.example.org", "Exact.EU.example.org."), False),
        ("other", ("other.test",), False),
    ])


@pytest.mark.parametrize("name, app", [
    ("example.org", "main"),
    ("www.example.org", "main"),            # exact beats wildcard
    ("WWW.Example.Org.", "main"),
    ("a.example.org", "wild"),
    ("a.b.example.org", "wild"),            # any depth
    ("eu.example.org", "wild"),
    ("x.eu.example.org", "deep"),           # longer wildcard beats shorter
    ("y.x.eu.example.org", "deep"),
    ("exact.eu.example.org", "deep"),
    ("other.test", "other"),
    ("sub.other.test", "main"),             # no wildcard for other.test: the default
    ("example.com", "main"),
    ("org", "main"),
    ("::1", "main"),
    ("127.0.0.1", "main"),
    ("1.example.org", "wild"),
    (None, "main"),
])
def test_host_table_match(table, name, app):
    assert table.match(name) == app


def test_wildcard_does_not_match_bare_domain():
    table = HostTable([("wild", ("*.example.org",), False)])
    assert table.match("example.org") is None
    assert table.match("a.example.org") == "wild"
    assert table.match("aexample.org") is None
    assert table.match(None) is None
    assert table.default is None


def test_host_table_matches_what_peeks_return():
    table = HostTable([("v6", ("[0::1]",), False), ("tls", ("*.example.org",), False)])
    assert table.match(peek_host(head("Host: [::1]:8443")).host) == "v6"
    assert table.match(peek_sni(hello("API.example.org.")).host) == "tls"


def test_same_app_may_repeat_a_host():
    table = HostTable([("a", ("x.test", "X.test."), False)])
    assert table.match("x.test") == "a"


def test_empty_table():
    assert HostTable([]).match("a.test") is None


@pytest.mark.parametrize("entries", [
    [("a", ("x.test",), False), ("b", ("X.Test.",), False)],
    [("a", ("*.x.test",), False), ("b", ("*.X.TEST",), False)],
    [("a", ("::1",), False), ("b", ("[0::1]",), False)],
    [("a", (), True), ("b", (), True)],
    [("a", ("x.test",), False), ("a", ("y.test",), False)],
], ids=["exact", "wildcard", "ipv6", "two-defaults", "app-twice"])
def test_host_table_conflicts(entries):
    with pytest.raises(ValueError):
        HostTable(entries)


@pytest.mark.parametrize("pattern", [
    "", "*", "*.", "**.x.test", "a.*.test", "x*.test", "*x.test", "x.test:80", "[::1]:80",
    "a..test", "-a.test", "a b.test", "caf\xe9.test", "*.1.2.3.4", "*.[::1]", "256.0.0.1",
    "[fe80::1%eth0]", "x.test/", "user@x.test",
])
def test_host_table_invalid_patterns(pattern):
    with pytest.raises(ValueError):
        HostTable([("a", (pattern,), False)])


def test_host_table_hosts_must_not_be_a_string():
    with pytest.raises(ValueError):
        HostTable([("a", "x.test", False)])


def test_exact_and_wildcard_of_same_suffix_may_differ():
    table = HostTable([("apex", ("x.test",), False), ("subs", ("*.x.test",), False)])
    assert table.match("x.test") == "apex"
    assert table.match("a.x.test") == "subs"


def test_real_client_hello_from_the_ssl_module():
    # Whatever OpenSSL version is installed, its first flight must parse: this catches
    # extensions our hand-built hellos never use (GREASE, padding, PSK modes, ...).
    import ssl

    outgoing = ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing,
                                                   server_hostname="Api.Example.org")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    data = outgoing.read()
    assert looks_like_tls(data)
    assert peek_sni(data) == host("api.example.org")
    assert all(answer == Peek("need_more") for answer in prefix_answers(peek_sni, data)[:-1])
