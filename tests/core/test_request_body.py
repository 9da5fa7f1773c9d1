"""Request bodies, the pure parts: whether a response may keep the connection open
while its request's body is still arriving (the rest is then read and dropped), and
``wsgi.input`` over a body pulled piece by piece."""
from __future__ import annotations

import pytest

from supervisor.http import protocol as http11
from supervisor.http import wsgi

LIMIT = 100   # discard_limit in these cases


def _head(framing: bytes, extra: bytes = b"") -> bytes:
    return b"POST / HTTP/1.1\r\nHost: h\r\n" + framing + extra + b"\r\n"


CL_200 = b"Content-Length: 200\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
EXPECT = b"Expect: 100-continue\r\n"

# (what the client sent before the response, whether 100 Continue went out, keep-alive?)
KEEP_ALIVE = [
    ("whole body received", _head(b"Content-Length: 5\r\n") + b"hello", False, True),
    ("nothing of a body within the limit", _head(b"Content-Length: 100\r\n"), False, True),
    ("nothing of a body past the limit", _head(CL_200), False, False),
    ("the rest within the limit", _head(CL_200) + b"x" * 100, False, True),
    ("the rest one past the limit", _head(CL_200) + b"x" * 99, False, False),
    ("chunked, whole", _head(CHUNKED) + b"3\r\nabc\r\n0\r\n\r\n", False, True),
    ("chunked, unfinished: its size is unknown", _head(CHUNKED) + b"3\r\nabc\r\n", False, False),
    ("100-continue, not sent: the client may or may not send", _head(b"Content-Length: 5\r\n", EXPECT),
     False, False),
    ("100-continue sent: the body comes, and is small", _head(b"Content-Length: 5\r\n", EXPECT), True, True),
    ("100-continue, body sent anyway", _head(b"Content-Length: 5\r\n", EXPECT) + b"hello", False, True),
    ("Connection: close asked", _head(b"Content-Length: 5\r\n", b"Connection: close\r\n") + b"hello",
     False, False),
]


@pytest.mark.parametrize("sent, continued, keep_alive", [c[1:] for c in KEEP_ALIVE], ids=[c[0] for c in KEEP_ALIVE])
def test_a_response_keeps_the_connection_only_if_the_unread_body_is_small(sent, continued, keep_alive):
    conn = http11.Connection(discard_limit=LIMIT)
    conn.receive_data(sent)
    request = conn.next_event()
    assert isinstance(request, http11.Request)
    if continued:
        assert conn.interim_continue() == b"HTTP/1.1 100 Continue\r\n\r\n"
    head = conn.response_head(request, "405 Method Not Allowed", [("Content-Length", "0")])
    assert conn.response_keep_alive is keep_alive
    assert (b"Connection: close\r\n" in head) is not keep_alive


def test_the_unread_rest_of_a_body_is_dropped_and_the_next_request_follows():
    conn = http11.Connection(discard_limit=LIMIT)
    conn.receive_data(_head(b"Content-Length: 10\r\n") + b"01234")
    request = conn.next_event()
    conn.response_head(request, "200 OK", [("Content-Length", "0")])
    assert conn.response_keep_alive and conn.body_pending
    conn.start_next_cycle()
    conn.receive_data(b"56789GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    events = []
    while (event := conn.next_event()) is not http11.NEED_DATA:
        if event is http11.PAUSED:
            conn.start_next_cycle()
            continue
        events.append(event)
        if isinstance(event, http11.Request) and event.target == b"/next":
            break
    assert [type(e) for e in events] == [http11.Data, http11.Data, http11.EndOfMessage, http11.Request]
    assert not conn.body_pending


def test_a_response_that_closes_before_the_body_is_in_still_lets_the_body_be_read():
    conn = http11.Connection(discard_limit=LIMIT)
    conn.receive_data(_head(CL_200) + b"x" * 50)
    request = conn.next_event()
    conn.response_head(request, "200 OK", [])   # an echo, say: the head goes out first
    assert not conn.response_keep_alive
    got = []
    conn.receive_data(b"y" * 150 + b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n")
    while isinstance(event := conn.next_event(), http11.Data):
        got.append(event.data)
    assert b"".join(got) == b"x" * 50 + b"y" * 150 and isinstance(event, http11.EndOfMessage)
    assert conn.next_event() is http11.PAUSED
    conn.start_next_cycle()
    assert conn.next_event() is http11.CONNECTION_CLOSED   # nothing after it is parsed


def _input(pieces, prefix=b""):
    pieces = list(pieces)
    pulls = []

    def pull():
        pulls.append(1)
        piece = pieces.pop(0)
        if isinstance(piece, BaseException):
            raise piece
        return piece
    return wsgi.Input(pull, prefix), pulls


# (the body's pieces, what the prefix holds, reads: (method, argument, expected))
READS = [
    ("read(n) spans pieces", [b"ab", b"cde", b""], b"",
     [("read", 4, b"abcd"), ("read", 4, b"e"), ("read", 4, b"")]),
    ("read() takes the prefix and the rest", [b"cd", b"ef", b""], b"ab", [("read", -1, b"abcdef"), ("read", -1, b"")]),
    ("readline with and without a newline", [b"a\nbc", b"d\n", b"ef", b""], b"",
     [("readline", -1, b"a\n"), ("readline", -1, b"bcd\n"), ("readline", -1, b"ef"), ("readline", -1, b"")]),
    ("readline(size) stops at size", [b"abcdef\n", b""], b"", [("readline", 3, b"abc"), ("readline", -1, b"def\n")]),
    ("read(0) pulls nothing", [b""], b"", [("read", 0, b"")]),
    ("lines", [b"x\ny", b"\nz", b""], b"", [("lines", None, [b"x\n", b"y\n", b"z"])]),
]


@pytest.mark.parametrize("pieces, prefix, reads", [c[1:] for c in READS], ids=[c[0] for c in READS])
def test_input_reads_as_a_binary_file_does(pieces, prefix, reads):
    inp, pulls = _input(pieces, prefix)
    for method, arg, expected in reads:
        got = list(inp) if method == "lines" else getattr(inp, method)(arg)
        assert got == expected, (method, arg)
    assert len(pulls) <= len(pieces)   # never pulled past the end


def test_input_pulls_nothing_until_read_and_nothing_after_the_end():
    inp, pulls = _input([b"abc", b""], prefix=b"x")
    assert not pulls
    assert inp.read(1) == b"x" and not pulls   # the prefix first: no 100 Continue for it
    assert inp.read() == b"abc" and len(pulls) == 2
    assert inp.read() == b"" and inp.readline() == b"" and len(pulls) == 2


def test_an_error_while_reading_reaches_the_app_and_keeps_what_was_read():
    inp, _ = _input([b"abc", TimeoutError("no byte for 10s")])
    with pytest.raises(TimeoutError):
        inp.read()
    assert inp.read(3) == b"abc"
