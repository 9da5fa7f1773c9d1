"""http11.Connection without sockets: each case whole, byte by byte, and pipelined."""

from __future__ import annotations

import pytest

from supervisor.http import protocol as http11

GOOD = b"GET /a%20b?x=1 HTTP/1.1\r\nHost: h\r\nX_Evil: 1\r\nX-Val: v \t\r\n\r\n"


def feed(conn, chunks):
    out = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is http11.NEED_DATA or ev is http11.CONNECTION_CLOSED:
                break
            if ev is http11.PAUSED:
                conn.start_next_cycle()
                continue
            out.append(ev)
    return out


def splits(data):
    return [[data], [bytes([b]) for b in data]]


@pytest.mark.parametrize("mode", [0, 1])
def test_request_head(mode) -> None:
    evs = feed(http11.Connection(), splits(GOOD)[mode])
    req = evs[0]
    assert (req.method, req.target, req.path, req.query, req.version) == (
        b"GET", b"/a%20b?x=1", b"/a%20b", b"x=1", "1.1")
    assert req.headers == [(b"Host", b"h"), (b"X-Val", b"v")]   # "_" dropped, OWS trimmed
    assert req.keep_alive and not req.chunked and req.content_length is None
    assert req.ends_message and len(evs) == 1   # no body: the head is the whole request


@pytest.mark.parametrize(("data", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                     # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: br, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 9000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
])
def test_rejections(data, status) -> None:
    for chunks in splits(data):
        with pytest.raises(http11.RemoteProtocolError) as info:
            feed(http11.Connection(), chunks + [b""])
        assert info.value.status == status


def test_max_body_size() -> None:
    with pytest.raises(http11.RemoteProtocolError) as info:
        feed(http11.Connection(max_body_size=3),
             [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"])
    assert info.value.status == 413


def test_error_after_pipelined_good_request_and_nothing_after() -> None:
    conn = http11.Connection()
    conn.receive_data(GOOD + b"BAD\r\n\r\n" + GOOD)
    assert isinstance(conn.next_event(), http11.Request)
    assert conn.next_event() is http11.PAUSED
    conn.start_next_cycle()
    with pytest.raises(http11.RemoteProtocolError):
        conn.next_event()
    assert conn.next_event() is http11.CONNECTION_CLOSED


def test_connection_close_stops_parsing() -> None:
    conn = http11.Connection()
    evs = feed(conn, [b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GOOD])
    assert len(evs) == 1 and not evs[0].keep_alive


def test_unparsed_bytes_after_pipelined_chunked() -> None:
    conn = http11.Connection()
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHo")
    evs = feed(conn, [data])
    assert [type(e) for e in evs] == [http11.Request, http11.Data, http11.EndOfMessage]
    assert [e.ends_message for e in evs] == [False, False, True]
    assert conn.idle and conn.unparsed_bytes() == b"GET /next HTTP/1.1\r\nHo"


@pytest.mark.parametrize(("data", "requests", "unparsed"), [
    (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", 1, b""),
    (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\r\n", 1, b""),              # an empty line may follow
    (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nG", 1, b"G"),
    (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n" * 3 + b"GET /b HT", 3, b"GET /b HT"),
    (b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi\r\nGET /", 1, b"\r\nGET /"),
])
def test_unparsed_bytes_are_those_of_the_request_still_arriving(data, requests, unparsed) -> None:
    for chunks in ([data], [data[:20], data[20:]]):
        conn = http11.Connection()
        evs = feed(conn, chunks)
        assert sum(isinstance(e, http11.Request) for e in evs) == requests
        assert conn.idle and conn.unparsed_bytes() == unparsed


def test_http10_keep_alive_rules() -> None:
    assert not feed(http11.Connection(), [b"GET / HTTP/1.0\r\n\r\n"])[0].keep_alive
    assert feed(http11.Connection(), [b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"])[0].keep_alive


def _req(conn, data):
    conn.receive_data(data)
    return conn.next_event()


def test_response_heads() -> None:
    conn = http11.Connection()
    req = _req(conn, GOOD)
    head = conn.response_head(req, "200 OK", [("Content-Type", "text/plain")])
    assert head.startswith(b"HTTP/1.1 200 OK\r\nServer: baton\r\nDate: ")
    assert b"Transfer-Encoding: chunked\r\n" in head and b"Connection" not in head
    assert conn.body(b"abc") == b"3\r\nabc\r\n" and conn.end_of_response() == b"0\r\n\r\n"
    conn10 = http11.Connection()
    req10 = _req(conn10, b"HEAD / HTTP/1.0\r\n\r\n")
    head = conn10.response_head(req10, "200 OK", [("Content-Length", "10")])
    assert head.endswith(b"Content-Length: 10\r\nConnection: close\r\n\r\n")
    assert conn10.body(b"x" * 10) == b"" and not conn10.response_keep_alive
    conn3 = http11.Connection()
    req3 = _req(conn3, GOOD)
    head = conn3.response_head(req3, "204 No Content", [])
    assert conn3.body(b"zzz") == b""
    with pytest.raises(http11.LocalProtocolError):
        http11.Connection().response_head(req3, "200 OK", [("Transfer-Encoding", "chunked")])


def test_short_body_closes_connection() -> None:
    conn = http11.Connection()
    req = _req(conn, GOOD)
    conn.response_head(req, "200 OK", [("Content-Length", "5")])
    conn.body(b"ab")
    conn.end_of_response()
    assert not conn.response_keep_alive
    with pytest.raises(http11.LocalProtocolError):
        conn.body(b"toolong")


def test_whole_response() -> None:
    conn = http11.Connection()
    req = _req(conn, GOOD)
    data = conn.whole_response(req, http11.render_head("200 OK", [("Content-Type", "text/plain")]), b"abc")
    assert data.startswith(b"HTTP/1.1 200 OK\r\nServer: baton\r\nDate: ")
    assert data.endswith(b"\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc")
    assert conn.response_keep_alive
    conn = http11.Connection()
    req = _req(conn, GOOD)
    rendered = http11.render_head("200 OK", [("Content-Length", "5"), ("Connection", "close")])
    data = conn.whole_response(req, rendered, b"ab")
    assert data.endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\nab")
    assert not conn.response_keep_alive
    head = http11.Connection()
    req = _req(head, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert head.whole_response(req, http11.render_head("200 OK", []), b"abc").endswith(b"\r\n\r\n")


def test_a_body_longer_than_its_content_length_is_refused_before_sending() -> None:
    conn = http11.Connection()
    req = _req(conn, GOOD)
    with pytest.raises(http11.LocalProtocolError):
        conn.whole_response(req, http11.render_head("200 OK", [("Content-Length", "2")]), b"abc")
    # Nothing went out: an error response can still be sent.
    assert conn.response_head(req, "500 Internal Server Error", [], 0).startswith(b"HTTP/1.1 500 ")


def test_trailers_count_against_the_field_limit() -> None:
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"T: v\r\n" * 5 + b"\r\n")
    with pytest.raises(http11.RemoteProtocolError) as info:
        feed(http11.Connection(limit_request_fields=4), [data])
    assert info.value.status == 431
    evs = feed(http11.Connection(), [data.replace(b"T: v\r\n" * 5, b"T: v \r\nT_x: 1\r\n")])
    assert evs[-1].trailers == [(b"T", b"v")]


def test_closed_connection_parses_nothing() -> None:
    conn = http11.Connection()
    conn.close()
    conn.receive_data(GOOD)
    assert conn.next_event() is http11.CONNECTION_CLOSED


# ---------------------------------------------------------------- strict request lines and Host

@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a:123456\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n",              # an IPv6 literal needs brackets
    b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.1\r\n\r\n",            # numeric, but not a dotted quad
    b"GET / HTTP/1.1\r\nHost: a%2eb\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",               # two spaces before the target
    b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n",               # two after it
    b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",              # a bare CR before the request line
    b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",              # a bare LF
    b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",   # userinfo in an absolute-form target
    b"GET http://user:pw@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a b/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT user@a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"CONNECT a HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT [::1] HTTP/1.1\r\nHost: a\r\n\r\n",
    # The same leniencies in a request pipelined after a good one.
    GOOD + b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    GOOD + b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    GOOD + b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
])
def test_leniencies_llhttp_allows_are_refused(data) -> None:
    for chunks in splits(data):
        with pytest.raises(http11.RemoteProtocolError) as info:
            feed(http11.Connection(), chunks + [b""])
        assert info.value.status == 400


@pytest.mark.parametrize("host", [
    b"a", b"a.example", b"a.example.", b"A.Example:8080", b"127.0.0.1", b"127.0.0.1:1",
    b"[::1]", b"[::1]:8080", b"[2001:db8::1]:65535", b"under_score.internal", b"",
])
def test_host_values_that_pass(host) -> None:
    data = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    for chunks in splits(data):
        evs = feed(http11.Connection(), chunks)
        assert len(evs) == 1 and (b"Host", host) in evs[0].headers


@pytest.mark.parametrize("data", [
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",          # an empty line before a request is fine
    GOOD + b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a.example:8080/x?y HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
])
def test_request_lines_that_pass(data) -> None:
    for chunks in splits(data):
        evs = feed(http11.Connection(), chunks)
        assert all(isinstance(e, http11.Request) for e in evs) and evs


# ---------------------------------------------------------------- Upgrade: an ordinary request

H2C = b"Host: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


@pytest.mark.parametrize(("data", "body"), [
    (b"POST / HTTP/1.1\r\n" + H2C + b"Content-Length: 5\r\n\r\nhello", b"hello"),
    (b"POST / HTTP/1.1\r\n" + H2C + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\nT: v\r\n\r\n",
     b"hello"),
    (b"GET / HTTP/1.1\r\n" + H2C + b"\r\n", b""),
])
def test_a_request_asking_to_upgrade_is_served_with_its_body(data, body) -> None:
    """Baton never switches protocols: the app gets the body, not the Upgrade field,
    and nothing after the request is parsed (the connection closes after it)."""
    for chunks in splits(data + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"):
        conn = http11.Connection()
        evs = feed(conn, chunks)
        request = evs[0]
        assert isinstance(request, http11.Request) and request.upgrade and not request.keep_alive
        assert b"upgrade" not in [n.lower() for n, _ in request.headers]
        assert b"".join(e.data for e in evs if isinstance(e, http11.Data)) == body
        assert [type(e) for e in evs if not isinstance(e, http11.Data)] == (
            [http11.Request, http11.EndOfMessage] if body else [http11.Request])
        if b"chunked" in data:
            assert evs[-1].trailers == [(b"T", b"v")]
        assert conn.next_event() is http11.CONNECTION_CLOSED


def test_an_upgrade_request_with_a_bad_chunked_body_is_refused() -> None:
    data = b"POST / HTTP/1.1\r\n" + H2C + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    for chunks in splits(data):
        with pytest.raises(http11.RemoteProtocolError) as info:
            feed(http11.Connection(), chunks)
        assert info.value.status == 400


# ---------------------------------------------------------------- a body is never kept

def _post(body: bytes, chunked: bool, piece: int = 65536) -> bytes:
    if not chunked:
        return b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    chunks = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                      for i in range(0, len(body), piece))
    return b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nT: v\r\n\r\n"


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("read", [65536, 4093, 1])
def test_a_long_body_is_not_kept_and_what_follows_it_is(chunked, read) -> None:
    """However long a body, the connection keeps at most an unfinished framing line of
    it; the request after it (here partly arrived) is kept whole for a hand-back."""
    size = (8 << 20) if read > 1 else 20000
    body = bytes(range(256)) * (size // 256)
    tail = b"GET /next HTTP/1.1\r\nHo"
    data = _post(body, chunked, piece=7777) + GOOD + tail
    conn = http11.Connection()
    got = bytearray()
    requests = 0
    most = 0
    for i in range(0, len(data), read):
        conn.receive_data(data[i:i + read])
        most = max(most, conn.buffered)
        while True:
            ev = conn.next_event()
            if ev is http11.NEED_DATA:
                break
            if ev is http11.PAUSED:
                conn.start_next_cycle()
            elif isinstance(ev, http11.Data):
                got += ev.data
            elif isinstance(ev, http11.Request):
                requests += 1
    assert got == body and requests == 2
    assert most <= len(GOOD) + len(tail) + 64   # a head's bytes, never the body's
    assert conn.idle and conn.unparsed_bytes() == tail


@pytest.mark.parametrize("seed", range(40))
def test_pipelined_bodies_in_random_reads_parse_as_a_whole(seed) -> None:
    import random
    rnd = random.Random(seed)
    messages = []
    for _ in range(rnd.randint(1, 5)):
        body = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 300)))
        if rnd.random() < 0.5 or not body:
            messages.append(_post(body, False) if body else GOOD)
        else:
            messages.append(_post(body, True, piece=rnd.randint(1, 50)))
    data = b"".join(messages) + b"GET /rest HTTP/1.1\r\nHost: a\r\nX: "
    whole = http11.Connection()
    want = [(type(e), getattr(e, "data", None)) for e in feed(whole, [data])]
    pieces, i = [], 0
    while i < len(data):
        n = rnd.choice((1, 2, 3, 5, 17, 64, 500))
        pieces.append(data[i:i + n])
        i += n
    conn = http11.Connection()
    got = feed(conn, pieces)
    # Data events come in other sizes; compare the bodies request by request.
    def shape(evs):
        out, body = [], None
        for cls, chunk in evs:
            if cls is http11.Data:
                body = (body or b"") + chunk
            else:
                if body is not None:
                    out.append(body)
                    body = None
                out.append(cls)
        return out
    assert shape([(type(e), getattr(e, "data", None)) for e in got]) == shape(want)
    assert conn.idle and conn.unparsed_bytes() == whole.unparsed_bytes() == b"GET /rest HTTP/1.1\r\nHost: a\r\nX: "
