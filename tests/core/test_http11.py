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
