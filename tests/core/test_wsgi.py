"""PEP 3333 glue without sockets."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from supervisor.http import protocol as http11
from supervisor.http import wsgi


def make_request(data: bytes):
    conn = http11.Connection()
    conn.receive_data(data)
    req = conn.next_event()
    body = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, http11.Data):
            body += ev.data
        else:
            break
    return conn, req, body


RAW = (b"POST /a%2Fb%C3%A9?q=1 HTTP/1.1\r\nHost: ex:80\r\nContent-Type: text/plain\r\n"
       b"Content-Length: 11\r\nAccept: a\r\nAccept: b\r\nX-Forwarded-For: 9.9.9.9, 1.1.1.1\r\n"
       b"X-Forwarded-Proto: https\r\n\r\nline1\nline2")


def environ_for(builder: wsgi.EnvironBuilder, req, wsgi_input, peer) -> dict:
    """As the server builds one: the connection's base once, then each request's environ."""
    return builder.build_from(builder.connection_base(peer), req, wsgi_input)


def build(peer=("10.0.0.1", 1234), allow=("127.0.0.1",)):
    conn, req, body = make_request(RAW)
    b = wsgi.EnvironBuilder(server_name="127.0.0.1", server_port="8000",
                            forwarded_allow_ips=allow)
    return conn, req, environ_for(b, req, io.BytesIO(body), peer)


def test_environ_keys_and_types() -> None:
    _, _, env = build()
    assert env["REQUEST_METHOD"] == "POST" and env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/a/b\xc3\xa9" and env["QUERY_STRING"] == "q=1"
    assert env["CONTENT_TYPE"] == "text/plain" and env["CONTENT_LENGTH"] == "11"
    assert "HTTP_CONTENT_TYPE" not in env and env["HTTP_ACCEPT"] == "a, b"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["SERVER_PORT"] == "8000"
    assert env["REMOTE_ADDR"] == "10.0.0.1" and env["wsgi.url_scheme"] == "http"
    assert env["wsgi.version"] == (1, 0) and env["wsgi.multiprocess"] is True
    for k, v in env.items():
        if k.isupper():
            assert type(v) is str, k


@pytest.mark.parametrize(("target", "path_info", "query"), [
    (b"/", "/", ""),
    (b"/a%20b/%41", "/a b/A", ""),        # escapes are decoded even without a query
    (b"/a%3Fb?x=%20", "/a?b", "x=%20"),   # the query string stays as sent
    (b"/p#frag", "/p", ""),
    (b"/p?q#frag", "/p", "q"),
])
def test_path_info_and_query_string(target, path_info, query) -> None:
    _, req, _ = make_request(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    env = environ_for(wsgi.EnvironBuilder(server_name="h", server_port="80"), req, io.BytesIO(), ("1.2.3.4", 1))
    assert (env["PATH_INFO"], env["QUERY_STRING"], env["RAW_URI"]) == (path_info, query, target.decode())


def test_forwarded_only_from_allowed_peers() -> None:
    _, _, env = build(peer=("127.0.0.1", 5), allow=("127.0.0.1",))
    assert env["REMOTE_ADDR"] == "1.1.1.1" and env["wsgi.url_scheme"] == "https"
    _, _, env = build(peer=("10.0.0.1", 5), allow=("127.0.0.1",))
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"], env["wsgi.url_scheme"]) == ("10.0.0.1", "5", "http")


def forwarded_environ(headers, peer=("127.0.0.1", 5), allow=("127.0.0.1", "::1"), header="x-forwarded-for",
                      scheme_headers=None):
    head = b"".join(name.encode() + b": " + value.encode() + b"\r\n" for name, value in headers)
    _, req, _ = make_request(b"GET / HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n")
    kwargs = {} if scheme_headers is None else {"secure_scheme_headers": scheme_headers}
    builder = wsgi.EnvironBuilder(server_name="h", server_port="80", forwarded_allow_ips=allow,
                                  forwarded_header=header, **kwargs)
    env = environ_for(builder, req, io.BytesIO(), peer)
    return env["REMOTE_ADDR"], env.get("REMOTE_PORT"), env["wsgi.url_scheme"]


XFF = "X-Forwarded-For"
# (headers, peer, allow, header) -> (REMOTE_ADDR, REMOTE_PORT, scheme)
FORWARDED_CASES = [
    # nginx appends the peer it saw: the leftmost entry is the client's to write.
    ([(XFF, "6.6.6.6, 203.0.113.7")], ("127.0.0.1", 5), None, None, ("203.0.113.7", None, "http")),
    ([(XFF, "203.0.113.7")], ("127.0.0.1", 5), None, None, ("203.0.113.7", None, "http")),
    ([(XFF, "not-an-ip")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([(XFF, "")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([(XFF, "6.6.6.6, not-an-ip")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([(XFF, "6.6.6.6,, 203.0.113.7")], ("127.0.0.1", 5), None, None, ("203.0.113.7", None, "http")),
    # Trusted hops are skipped, from the right; garbage past them keeps the last trusted one.
    ([(XFF, "6.6.6.6, 203.0.113.7, 10.0.0.2")], ("127.0.0.1", 5), ("127.0.0.1", "10.0.0.0/8"), None,
     ("203.0.113.7", None, "http")),
    ([(XFF, "junk, 10.0.0.3, 10.0.0.2")], ("127.0.0.1", 5), ("127.0.0.1", "10.0.0.0/8"), None,
     ("10.0.0.3", None, "http")),
    ([(XFF, "10.0.0.3, 10.0.0.2")], ("127.0.0.1", 5), ("127.0.0.1", "10.0.0.0/8"), None,
     ("10.0.0.3", None, "http")),
    ([(XFF, "6.6.6.6, 203.0.113.7")], ("127.0.0.1", 5), ("*",), None, ("6.6.6.6", None, "http")),
    # Two header lines read as one list, in order.
    ([(XFF, "6.6.6.6"), (XFF, "203.0.113.7")], ("127.0.0.1", 5), None, None, ("203.0.113.7", None, "http")),
    # Ports and IPv6, in canonical form.
    ([(XFF, "203.0.113.7:4711")], ("127.0.0.1", 5), None, None, ("203.0.113.7", "4711", "http")),
    ([(XFF, "2001:DB8:0::1")], ("127.0.0.1", 5), None, None, ("2001:db8::1", None, "http")),
    ([(XFF, "[2001:db8::1]:4711")], ("::1", 5), None, None, ("2001:db8::1", "4711", "http")),
    ([(XFF, "[2001:db8::1]x")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([(XFF, "203.0.113.7:99999")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([(XFF, "fe80::1%eth0")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([(XFF, "01.2.3.4")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([(XFF, "::ffff:10.0.0.9")], ("127.0.0.1", 5), None, None, ("::ffff:10.0.0.9", None, "http")),
    # An untrusted peer changes nothing, whatever it sends.
    ([(XFF, "203.0.113.7"), ("X-Forwarded-Proto", "https")], ("198.51.100.1", 5), None, None,
     ("198.51.100.1", "5", "http")),
    ([(XFF, "203.0.113.7")], ("10.1.2.3", 5), ("10.0.0.0/16",), None, ("10.1.2.3", "5", "http")),
    ([(XFF, "203.0.113.7")], ("10.0.2.3", 5), ("10.0.0.0/16",), None, ("203.0.113.7", None, "http")),
    # A UNIX socket's peer (nginx on the same host) is trusted: its file mode chose it.
    ([(XFF, "6.6.6.6, 203.0.113.7")], "", None, None, ("203.0.113.7", None, "http")),
    # Only the configured header names the client: nginx passes a client's Forwarded through.
    ([("Forwarded", "for=6.6.6.6"), (XFF, "203.0.113.7")], ("127.0.0.1", 5), None, None,
     ("203.0.113.7", None, "http")),
    ([("Forwarded", "for=203.0.113.7"), (XFF, "6.6.6.6")], ("127.0.0.1", 5), None, "forwarded",
     ("203.0.113.7", None, "http")),
    # Forwarded (RFC 7239): the same walk, quoted values, proto=.
    ([("Forwarded", "for=6.6.6.6, for=203.0.113.7;proto=https")], ("127.0.0.1", 5), None, "forwarded",
     ("203.0.113.7", None, "https")),
    ([("Forwarded", 'for="[2001:db8::1]:4711";proto=https')], ("127.0.0.1", 5), None, "forwarded",
     ("2001:db8::1", "4711", "https")),
    ([("Forwarded", 'For="203.0.113.7:_port"; Proto=HTTPS')], ("127.0.0.1", 5), None, "forwarded",
     ("203.0.113.7", None, "https")),
    ([("Forwarded", "for=unknown;proto=https")], ("127.0.0.1", 5), None, "forwarded", ("127.0.0.1", "5", "https")),
    ([("Forwarded", "for=_hidden")], ("127.0.0.1", 5), None, "forwarded", ("127.0.0.1", "5", "http")),
    ([("Forwarded", "for=6.6.6.6, for=_hidden")], ("127.0.0.1", 5), None, "forwarded", ("127.0.0.1", "5", "http")),
    ([("Forwarded", "proto=https")], ("127.0.0.1", 5), None, "forwarded", ("127.0.0.1", "5", "https")),
    ([("Forwarded", 'for="6.6.6.6, for=1.1.1.1", for=203.0.113.7')], ("127.0.0.1", 5), None, "forwarded",
     ("203.0.113.7", None, "http")),
    ([("Forwarded", "for=6.6.6.6"), ("Forwarded", "for=10.0.0.2;proto=https")], ("127.0.0.1", 5),
     ("127.0.0.1", "10.0.0.0/8"), "forwarded", ("6.6.6.6", None, "http")),
    # Unparseable: none of it counts.
    ([("Forwarded", "for=203.0.113.7;for=1.1.1.1")], ("127.0.0.1", 5), None, "forwarded", ("127.0.0.1", "5", "http")),
    ([("Forwarded", 'for="203.0.113.7')], ("127.0.0.1", 5), None, "forwarded", ("127.0.0.1", "5", "http")),
    ([("Forwarded", "garbage")], ("127.0.0.1", 5), None, "forwarded", ("127.0.0.1", "5", "http")),
    ([("Forwarded", "for=203.0.113.7;proto=https")], ("198.51.100.1", 5), None, "forwarded",
     ("198.51.100.1", "5", "http")),
    # The scheme headers (gunicorn's map), all agreeing, or the connection's own scheme.
    ([("X-Forwarded-Proto", "https")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "https")),
    ([("X-Forwarded-Proto", "HTTPS")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "https")),
    ([("X-Forwarded-Proto", "http")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "http")),
    ([("X-Forwarded-Ssl", "on")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "https")),
    ([("X-Forwarded-Protocol", "ssl")], ("127.0.0.1", 5), None, None, ("127.0.0.1", "5", "https")),
    ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Ssl", "on")], ("127.0.0.1", 5), None, None,
     ("127.0.0.1", "5", "https")),
    ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Ssl", "off")], ("127.0.0.1", 5), None, None,
     ("127.0.0.1", "5", "http")),
    ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Proto", "http")], ("127.0.0.1", 5), None, None,
     ("127.0.0.1", "5", "http")),
    ([("Forwarded", "proto=http"), ("X-Forwarded-Proto", "https")], ("127.0.0.1", 5), None, "forwarded",
     ("127.0.0.1", "5", "http")),
]


@pytest.mark.parametrize(("headers", "peer", "allow", "header", "expected"), FORWARDED_CASES)
def test_forwarded_table(headers, peer, allow, header, expected) -> None:
    got = forwarded_environ(headers, peer=peer, allow=allow or ("127.0.0.1", "::1"),
                            header=header or "x-forwarded-for")
    assert got == expected


def test_forwarded_host_and_custom_scheme_headers() -> None:
    def env_of(headers, scheme_headers=None):
        head = b"".join(name.encode() + b": " + value.encode() + b"\r\n" for name, value in headers)
        _, req, _ = make_request(b"GET / HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n")
        kwargs = {} if scheme_headers is None else {"secure_scheme_headers": scheme_headers}
        builder = wsgi.EnvironBuilder(server_name="h", server_port="80", forwarded_header="forwarded", **kwargs)
        return environ_for(builder, req, io.BytesIO(), ("127.0.0.1", 5))
    assert env_of([("Forwarded", 'for=1.2.3.4;host="blog.example:8443"')])["HTTP_HOST"] == "blog.example:8443"
    assert env_of([("Forwarded", "for=1.2.3.4;host=[::1]")])["HTTP_HOST"] == "[::1]"
    assert env_of([("Forwarded", 'for=1.2.3.4;host="bad host"')])["HTTP_HOST"] == "h"
    assert env_of([("Forwarded", "for=1.2.3.4;host=a.b:99999")])["HTTP_HOST"] == "h"
    # A header name outside X-Forwarded-*: still read; the default map then no longer applies.
    custom = {"Front-End-Https": "on"}
    assert env_of([("Front-End-Https", "on")], custom)["wsgi.url_scheme"] == "https"
    assert env_of([("X-Forwarded-Proto", "https")], custom)["wsgi.url_scheme"] == "http"
    assert env_of([("X-Forwarded-Proto", "https")], {})["wsgi.url_scheme"] == "http"


def test_input_lazy_semantics() -> None:
    pieces = [b"ab\ncd", b"\nef", b""]
    pulled = []

    def pull():
        pulled.append(1)
        return pieces.pop(0)
    inp = wsgi.Input(pull)
    assert not pulled                   # nothing read (no 100 Continue) until the app reads
    assert inp.readline() == b"ab\n" and inp.read(2) == b"cd"
    assert list(inp) == [b"\n", b"ef"] and inp.read() == b""


def run(app, data=b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"):
    conn, req, body = make_request(data)
    env = environ_for(wsgi.EnvironBuilder(server_name="h", server_port="80"), req, io.BytesIO(body), ("1.2.3.4", 1))
    sent = []
    log = logging.getLogger("test.wsgi")
    out = wsgi.run_app(app, env, conn, req, sent.append, log)
    return out, b"".join(sent)


def test_bad_status_and_header_become_500() -> None:
    for status, headers in [("200 OK\r\nX: y", []), ("OK", []),
                            ("200 OK", [("X", "a\nb")]), ("200 OK", [("Bad Name", "v")]),
                            ("200 OK", [("X", "\0")])]:
        def app(environ, start_response, status=status, headers=headers):
            start_response(status, headers)
            return [b"body"]
        out, data = run(app)
        assert data.startswith(b"HTTP/1.1 500 ") and out.must_close


def test_exc_info_rules_and_close_called() -> None:
    closed = []

    class Body(list):
        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("200 OK", [])
        try:
            raise ValueError("x")
        except ValueError:
            start_response("503 Busy", [("Content-Type", "text/plain")], sys.exc_info())
        return Body([b"a", b"b"])
    out, data = run(app)
    assert data.startswith(b"HTTP/1.1 503 Busy") and closed == [True]

    def twice(environ, start_response):
        start_response("200 OK", [])
        start_response("200 OK", [])
        return [b""]
    out, data = run(twice)
    assert data.startswith(b"HTTP/1.1 500")


def test_exception_after_head_closes() -> None:
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"partial"
        raise RuntimeError("late")
    out, data = run(app)
    assert data.startswith(b"HTTP/1.1 200") and out.must_close and b"500" not in data


def test_write_callable() -> None:
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Length", "6")])
        write(b"abc")
        return [b"def"]
    out, data = run(app)
    assert data.endswith(b"\r\n\r\nabcdef") and out.sent == 6


@pytest.mark.parametrize("name", ["Connection", "Transfer-Encoding"])
def test_app_hop_by_hop(name) -> None:
    def app(environ, start_response):
        start_response("200 OK", [(name, "close")])
        return [b"x"]
    out, data = run(app)
    assert data.startswith(b"HTTP/1.1 200" if name == "Connection" else b"HTTP/1.1 500")


def test_headers_are_checked_and_sent_as_given_to_start_response() -> None:
    """start_response snapshots the list: a later change is neither sent nor unchecked."""
    def app(environ, start_response):
        headers = [("Content-Type", "text/plain")]
        start_response("200 OK", headers)
        headers.append(("X-Late", "a\r\nInjected: 1"))
        return [b"ok"]
    out, data = run(app)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"X-Late" not in data and not out.must_close


def test_memoised_checks_still_reject() -> None:
    """The same good headers twice, then bad ones (and unhashable ones): each is judged."""
    for headers in ([("X", "1")], [("X", "1")], [("X", "1\n")], [("X", ["1"])], [["X", "1"]]):
        def app(environ, start_response, headers=headers):
            start_response("200 OK", headers)
            return [b"body"]
        out, data = run(app)
        good = headers == [("X", "1")]
        assert data.startswith(b"HTTP/1.1 200 " if good else b"HTTP/1.1 500 "), headers
        assert (b"X: 1\r\n" in data) == good


def test_single_chunk_longer_than_content_length_is_500() -> None:
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"too long"]
    out, data = run(app)
    assert data.startswith(b"HTTP/1.1 500 ") and b"too long" not in data and out.must_close


def test_single_chunk_response_is_one_send() -> None:
    conn, req, body = make_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    env = environ_for(wsgi.EnvironBuilder(server_name="h", server_port="80"), req, io.BytesIO(body), ("1.2.3.4", 1))
    sent = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]
    out = wsgi.run_app(app, env, conn, req, sent.append, logging.getLogger("test.wsgi"))
    assert len(sent) == 1 and sent[0].endswith(b"Content-Length: 5\r\n\r\nhello")
    assert out.status == "200" and out.sent == 5 and not out.must_close
