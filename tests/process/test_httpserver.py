"""The serving loop over real sockets on 127.0.0.1 (Server.run in a thread)."""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
from wsgiref.validate import validator

import pytest

from supervisor.http import accesslog
from supervisor.http.connection import READING, ClientConnection
from supervisor.http.server import Server, ServerSettings
from supervisor.system.loop import Loop

DEADLINE_S = 10.0


def wait_for(cond, what: str = "condition") -> None:
    end = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def hello(environ, start_response):
    body = b"hello " + environ["PATH_INFO"].encode("latin-1")
    if environ["REQUEST_METHOD"] in ("POST", "PUT"):
        body = b"got " + environ["wsgi.input"].read(1 << 20)   # validator wants a size
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class Running:
    """A Server on its own loop, run in a thread; `in_loop(fn)` runs fn on that thread."""

    def __init__(self, app, validate: bool = True, proxy_protocol: bool = False,
                 defer_accept: bool = False, access_format: str = accesslog.DEFAULT_FORMAT,
                 **settings) -> None:
        self.clients: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        if defer_accept:
            self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.log = logging.getLogger("test.httpserver")
        self.records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = self.records.append
        self.log.addHandler(handler)
        self.log.propagate = False
        self.handler = handler
        self.access = logging.getLogger("test.httpserver.access")
        self.access_lines: list[str] = []
        self.access_records: list[accesslog.AccessRecord] = []
        ah = logging.Handler()
        line = accesslog.compile_format(access_format)

        def emit(record: logging.LogRecord) -> None:   # as log.setup's handler does
            self.access_records.append(record.msg)
            self.access_lines.append(line(record.msg))
        ah.emit = emit
        self.access.addHandler(ah)
        self.access.propagate = False
        self.access.setLevel(logging.INFO)
        self.access_handler = ah
        self.loop = Loop()
        self.server = Server(validator(app) if validate else app, [self.listener], ServerSettings(**settings),
                             self.log, self.access, listener_names=["web"],
                             proxy_protocol_fds=frozenset({self.listener.fileno()} if proxy_protocol else ()),
                             loop=self.loop, access_format=line)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_for_call = self.loop.threadsafe_waker(self._run_calls)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def in_loop(self, fn):
        """Run `fn()` on the loop's thread (where server methods must be called); its result."""
        done = threading.Event()
        outcome: list = []
        self._calls.put((fn, outcome, done))
        self._wake_for_call()
        assert done.wait(DEADLINE_S), "the loop did not run the call"
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _run_calls(self) -> None:
        while True:
            try:
                fn, outcome, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                outcome.append(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                outcome.append(exc)
            done.set()

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.settimeout(DEADLINE_S)
        self.clients.append(s)
        return s

    def close(self) -> None:
        self.server.stop(graceful=False)
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive()
        self.loop.close()
        self.listener.close()
        for c in self.clients:
            c.close()
        self.log.removeHandler(self.handler)
        self.access.removeHandler(self.access_handler)


@pytest.fixture
def serve():
    started = []

    def start(app=hello, validate=True, **settings) -> Running:
        r = Running(app, validate, **settings)
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


def read_response(sock: socket.socket, buf: bytearray, head_request: bool = False
                  ) -> tuple[bytes, dict, bytes]:
    """Read one response (Content-Length, chunked or until close) from sock."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(bytes(buf))
        buf += data
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    status = head[0].encode()
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    code = int(status.split()[1])
    if code < 200 or code in (204, 304) or head_request:
        return status, headers, b""
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            data = sock.recv(65536)
            if not data:
                raise EOFError
            buf += data
        body = bytes(buf[:n])
        del buf[:n]
        return status, headers, body
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            i = buf.index(b"\r\n")
            size = int(bytes(buf[:i]), 16)
            while len(buf) < i + 2 + size + 2:
                buf += sock.recv(65536)
            body += bytes(buf[i + 2:i + 2 + size])
            del buf[:i + 2 + size + 2]
            if size == 0:
                return status, headers, body
    while True:
        data = sock.recv(65536)
        if not data:
            body = bytes(buf)
            buf.clear()
            return status, headers, body
        buf += data


def get(sock, path="/", extra="", version="1.1") -> None:
    sock.sendall(f"GET {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode())


def test_keep_alive_and_pipelining(serve) -> None:
    r = serve()
    s = r.connect()
    buf = bytearray()
    for i in range(3):
        get(s, f"/k{i}")
        status, headers, body = read_response(s, buf)
        assert status == b"HTTP/1.1 200 OK" and body == f"hello /k{i}".encode()
        assert headers["server"] == "baton" and "date" in headers
    s.sendall(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(20)))
    for i in range(20):
        assert read_response(s, buf)[2] == f"hello /p{i}".encode()
    s.close()
    wait_for(lambda: r.server.requests_served == 23, "requests counted")
    assert len(r.access_lines) == 23 and '"GET /k0 HTTP/1.1" 200' in r.access_lines[0]


def test_http10_closes_and_head_has_no_body(serve) -> None:
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"a", b"bc"]
    r = serve(app)
    s = r.connect()
    get(s, version="1.0")
    status, headers, body = read_response(s, bytearray())
    assert body == b"abc" and headers.get("connection") == "close"
    assert s.recv(10) == b""
    s = r.connect()
    s.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    buf = bytearray()
    status, headers, body = read_response(s, buf, head_request=True)
    assert body == b"" and status == b"HTTP/1.1 200 OK"
    status, headers, body = read_response(s, buf)
    assert headers["transfer-encoding"] == "chunked" and body == b"abc"


def test_chunked_request_body_and_expect_continue(serve) -> None:
    r = serve()
    s = r.connect()
    buf = bytearray()
    s.sendall(b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
    assert read_response(s, buf)[2] == b"got abcde"
    s.sendall(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    status, _, _ = read_response(s, buf)
    assert status == b"HTTP/1.1 100 Continue"
    s.sendall(b"hello")
    assert read_response(s, buf)[2] == b"got hello"
    get(s, "/after")
    assert read_response(s, buf)[2] == b"hello /after"


def test_expect_continue_not_sent_when_app_does_not_read(serve) -> None:
    def app(environ, start_response):
        start_response("403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return []
    r = serve(app)
    s = r.connect()
    s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    status, headers, _ = read_response(s, bytearray())
    assert status == b"HTTP/1.1 403 Forbidden"
    assert s.recv(10) == b""     # the unread body makes the connection unusable


def test_sendfile_via_file_wrapper(serve, tmp_path) -> None:
    path = tmp_path / "f.bin"
    payload = os.urandom(300_000)
    path.write_bytes(payload)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(path, "rb"))
    # Not under wsgiref's validator: it wraps the result, hiding the file wrapper.
    r = serve(app, validate=False)
    s = r.connect()
    buf = bytearray()
    get(s)
    status, headers, body = read_response(s, buf)
    assert headers["content-length"] == str(len(payload)) and body == payload
    get(s)
    assert read_response(s, buf)[2] == payload


def test_app_exception_is_500_and_server_lives(serve) -> None:
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("kaboom")
        return hello(environ, start_response)
    r = serve(app)
    s = r.connect()
    get(s, "/boom")
    status, _, body = read_response(s, bytearray())
    assert status.startswith(b"HTTP/1.1 500") and b"kaboom" not in body
    assert any(rec.exc_info and "kaboom" in str(rec.exc_info[1]) for rec in r.records)
    s2 = r.connect()
    get(s2, "/ok")
    assert read_response(s2, bytearray())[2] == b"hello /ok"


def test_bad_header_from_app_is_500(serve) -> None:
    def app(environ, start_response):
        start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: x=1")])
        return [b"no"]
    r = serve(app)
    s = r.connect()
    get(s)
    status, headers, body = read_response(s, bytearray())
    assert status.startswith(b"HTTP/1.1 500") and "set-cookie" not in headers


def test_bad_request_400_and_pipelined_request_not_run(serve) -> None:
    seen = []

    def app(environ, start_response):
        seen.append(environ["PATH_INFO"])
        return hello(environ, start_response)
    r = serve(app)
    s = r.connect()
    s.sendall(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n"
              b"GET /two HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"
              b"GET /three HTTP/1.1\r\nHost: t\r\n\r\n")
    buf = bytearray()
    assert read_response(s, buf)[2] == b"hello /one"
    status, headers, _ = read_response(s, buf)
    assert status.startswith(b"HTTP/1.1 400") and headers["connection"] == "close"
    assert s.recv(10) == b"" and not buf
    assert seen == ["/one"]


def test_slowloris_does_not_block_threads_1(serve) -> None:
    r = serve(threads=1)
    slow = [r.connect() for _ in range(5)]
    for s in slow:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    s = r.connect()
    get(s, "/fast")
    assert read_response(s, bytearray())[2] == b"hello /fast"
    for s in slow:
        s.close()


def test_header_timeout_408(serve) -> None:
    r = serve(header_timeout_s=0.05)
    s = r.connect()
    s.sendall(b"GET / HTTP/1.1\r\n")
    status, headers, _ = read_response(s, bytearray())
    assert status.startswith(b"HTTP/1.1 408")
    assert s.recv(10) == b""


@pytest.mark.parametrize("initial, answer", [
    (b"", b""),                                               # silent: closed, no answer
    (b"GET / HTTP/1.1\r\n", b"HTTP/1.1 408"),                # a head begun: 408
    (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", b"HTTP/1.1 200"),  # served, then idle: closed
])
def test_a_handed_over_connection_is_bounded_by_its_deadlines(serve, initial, answer) -> None:
    """A connection given with add_connection (as from the balancer) gets its deadline
    after its initial bytes are served: header_timeout_s if it is still silent or in
    its head, keepalive_s after a response."""
    r = serve(header_timeout_s=0.05, keepalive_s=0.05)
    a, b = socket.socketpair()
    a.settimeout(DEADLINE_S)
    r.clients += [a, b]
    r.in_loop(lambda: r.server.add_connection(b, ("192.0.2.9", 5), "", initial))
    received = bytearray()
    while data := a.recv(65536):
        received += data
    assert received.startswith(answer)
    wait_for(lambda: r.server.active_connections == 0, "the connection forgotten")


@pytest.mark.parametrize("close, joins", [(True, False), (False, True)])
def test_a_handed_over_connection_joins_the_loop_only_if_it_waits_for_bytes(serve, close, joins):
    """One that brought its whole request and closes after the response is served and
    closed without an epoll registration (two syscalls less per connection); one kept
    alive waits on the loop for its next request, and is served when it comes."""
    r = serve()
    registered: list[int] = []
    register = r.loop.register
    r.loop.register = lambda fileobj, *args: registered.append(
        fileobj if type(fileobj) is int else fileobj.fileno()) or register(fileobj, *args)
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    try:
        client = socket.create_connection(other.getsockname(), timeout=DEADLINE_S)
        r.clients.append(client)
        get(client, "/first", "Connection: close\r\n" if close else "")
        sock, peer = other.accept()
        assert select.select([sock], [], [], DEADLINE_S)[0], "the request arrived"
        fd = sock.fileno()
        r.in_loop(lambda: r.server.add_connection(sock, peer, "elsewhere"))
        buf = bytearray()
        assert read_response(client, buf)[2] == b"hello /first"
        if close:
            assert client.recv(10) == b""
        else:
            get(client, "/second")
            assert read_response(client, buf)[2] == b"hello /second"
        assert (fd in registered) is joins
    finally:
        other.close()


@pytest.mark.parametrize("listener_nodelay", [0, 1])
def test_handed_over_tcp_connections_all_get_tcp_nodelay_whatever_their_listener_gave(serve, listener_nodelay):
    """The server learns from a listener's first handed-over connection whether its
    connections need TCP_NODELAY set; each one of them ends up with it."""
    r = serve()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, listener_nodelay)
    other.listen(8)
    try:
        handed = []
        for _ in range(3):
            client = socket.create_connection(other.getsockname(), timeout=DEADLINE_S)
            r.clients.append(client)
            sock, peer = other.accept()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == listener_nodelay   # the kernel's copy
            handed.append(sock)
            r.in_loop(lambda sock=sock, peer=peer: r.server.add_connection(sock, peer, "elsewhere"))
        assert all(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in handed)
    finally:
        other.close()


def test_threads_pool(serve) -> None:
    gate = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/wait":
            gate.wait(DEADLINE_S)
        return hello(environ, start_response)
    r = serve(app, threads=2)
    blocked = r.connect()
    get(blocked, "/wait")
    wait_for(lambda: r.server.busy_threads == 1, "one busy thread")
    s = r.connect()
    get(s, "/free")
    assert read_response(s, bytearray())[2] == b"hello /free"
    gate.set()
    assert read_response(blocked, bytearray())[2] == b"hello /wait"


def test_graceful_stop_finishes_inflight_request(serve) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def app(environ, start_response):
        entered.set()
        gate.wait(DEADLINE_S)
        return hello(environ, start_response)
    r = serve(app, threads=2)
    idle = r.connect()
    s = r.connect()
    get(s, "/slow")
    assert entered.wait(DEADLINE_S)
    wait_for(lambda: r.server.active_connections == 2, "both connections seen")
    r.server.stop(graceful=True)
    assert idle.recv(10) == b""          # an idle keep-alive connection is closed
    gate.set()
    status, headers, body = read_response(s, bytearray())
    assert body == b"hello /slow"
    r.thread.join(DEADLINE_S)
    assert not r.thread.is_alive()


def test_graceful_stop_hands_back_idle_connections_with_their_unparsed_bytes(serve) -> None:
    """The drain path production uses (``hand_back_with``, then a graceful stop): idle
    keep-alive connections, and what was read of a request not yet complete, reach the
    callback; a connection in the middle of a request is served first, then handed back."""
    gate = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            gate.wait(DEADLINE_S)
        return hello(environ, start_response)
    r = serve(app, threads=2)
    idle, partial, busy = r.connect(), r.connect(), r.connect()
    buf = bytearray()
    get(idle, "/first")
    assert read_response(idle, buf)[2] == b"hello /first"
    partial.sendall(b"GET /second HT")
    get(busy, "/slow")
    wait_for(lambda: r.server.busy_threads == 1 and r.in_loop(
        lambda: any(c.state is READING for c in r.server._conns.values())), "a partial request and a busy one")
    handed: list = []

    def hand_back(sock, unparsed, peer, listener):
        r.clients.append(sock)
        handed.append((sock, unparsed, peer, listener))
    r.in_loop(lambda: r.server.hand_back_with(hand_back))
    r.server.stop(graceful=True)
    wait_for(lambda: len(handed) == 2, "the two idle connections handed back")
    ports = {sock.getpeername()[1]: (unparsed, peer, listener) for sock, unparsed, peer, listener in handed}
    assert ports == {idle.getsockname()[1]: (b"", ("127.0.0.1", idle.getsockname()[1]), "web"),
                     partial.getsockname()[1]: (b"GET /second HT", ("127.0.0.1", partial.getsockname()[1]), "web")}
    gate.set()
    assert read_response(busy, bytearray())[2] == b"hello /slow"   # served, then handed back too
    r.thread.join(DEADLINE_S)
    assert not r.thread.is_alive() and len(handed) == 3
    # Another server takes them over, as a balancer's next worker would.
    r2 = serve()
    for handed_back in handed:
        r2.in_loop(lambda args=handed_back: r2.server.add_connection(args[0], args[2], args[3], args[1]))
    partial.sendall(b"TP/1.1\r\nHost: t\r\n\r\n")
    assert read_response(partial, bytearray())[2] == b"hello /second"
    get(idle, "/again")
    assert read_response(idle, buf)[2] == b"hello /again"


@pytest.mark.parametrize("threads", [1, 2])
def test_access_log_shows_response_headers_and_environ(serve, threads) -> None:
    """%({name}o)s and %({VAR}e)s through a real request, inline and on a pool thread;
    the environ is read after the response, so what the app (or a middleware) put in
    it is there."""
    def app(environ, start_response):
        environ["REMOTE_USER"] = "alice"   # as an authentication middleware would
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Served-By", "w1"),
                                  ("Content-Length", "2")])
        return [b"ok"]
    r = serve(app, threads=threads, access_format=(
        "%(s)s %({x-served-by}o)s %({Content-Type}o)s %({REMOTE_USER}e)s %({PATH_INFO}e)s"
        " %({HTTP_X_TRACE}e)s %({x-missing}o)s %({MISSING}e)s"))
    s = r.connect()
    get(s, "/p", "X-Trace: t-1\r\n")
    assert read_response(s, bytearray())[2] == b"ok"
    wait_for(lambda: r.access_lines, "the access line")
    assert r.access_lines == ["200 w1 text/plain alice /p t-1 - -"]


def test_access_log_keeps_no_headers_or_environ_unless_its_format_shows_them(serve) -> None:
    r = serve()   # the default format: no {..}o or {..}e atom
    s = r.connect()
    get(s, "/p")
    read_response(s, bytearray())
    wait_for(lambda: r.access_records, "the access record")
    record = r.access_records[0]
    assert (record.response_headers, record.environ) == ((), None)


# ---------------------------------------------------------------- PROXY protocol

def whoami(environ, start_response):
    body = f"{environ['REMOTE_ADDR']} {environ.get('REMOTE_PORT', '-')}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


PP_V2_INET6 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24"
               + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
               + socket.inet_pton(socket.AF_INET6, "2001:db8::2") + b"\xd4\x31\x01\xbb")
PP_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def assert_closed(sock: socket.socket) -> None:
    """The server closed without answering (a reset counts: it read everything we sent)."""
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass


def test_proxy_v1_and_v2_set_remote_addr(serve) -> None:
    r = serve(whoami, proxy_protocol=True)
    s = r.connect()
    buf = bytearray()
    s.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\nGET /a HTTP/1.1\r\nHost: t\r\n\r\n")
    assert read_response(s, buf)[2] == b"203.0.113.7 56324"
    get(s, "/again")                     # keep-alive: the address holds for the connection
    assert read_response(s, buf)[2] == b"203.0.113.7 56324"
    s2 = r.connect()
    s2.sendall(PP_V2_INET6[:20])         # a header split across reads
    wait_for(lambda: r.server.active_connections == 2, "second connection accepted")
    s2.sendall(PP_V2_INET6[20:])
    get(s2, "/v2")
    assert read_response(s2, bytearray())[2] == b"2001:db8::1 54321"
    s3 = r.connect()                     # LOCAL (a health check): the real peer
    s3.sendall(PP_V2_LOCAL + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert read_response(s3, bytearray())[2] == f"127.0.0.1 {s3.getsockname()[1]}".encode()
    assert '"GET /a HTTP/1.1" 200' in r.access_lines[0] and r.access_lines[0].startswith("203.0.113.7 ")


def test_proxy_garbage_is_closed_and_server_keeps_serving(serve) -> None:
    r = serve(whoami, proxy_protocol=True)
    bad = r.connect()
    get(bad, "/no-header")               # plain HTTP on a PROXY listener
    assert_closed(bad)
    assert any("bad PROXY header" in rec.getMessage() for rec in r.records)
    bad2 = r.connect()
    bad2.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n")
    assert_closed(bad2)
    s = r.connect()
    s.sendall(b"PROXY UNKNOWN\r\n")
    get(s, "/ok")
    assert read_response(s, bytearray())[2] == f"127.0.0.1 {s.getsockname()[1]}".encode()
    wait_for(lambda: r.server.requests_served == 1, "one request served")


def test_proxy_header_timeout_closes_without_408(serve) -> None:
    r = serve(whoami, proxy_protocol=True, header_timeout_s=0.05)
    s = r.connect()
    s.sendall(b"PROXY TCP4 1.2.3.4 ")
    assert_closed(s)


def test_plain_listener_ignores_proxy_lines(serve) -> None:
    """Without the flag a PROXY line is just a bad request line: no one can spoof."""
    r = serve(whoami)
    s = r.connect()
    s.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert read_response(s, bytearray())[0].startswith(b"HTTP/1.1 400")


def test_add_connection_with_proxy_header_in_initial_bytes(serve) -> None:
    r = serve(whoami)
    a, b = socket.socketpair()
    a.settimeout(DEADLINE_S)
    r.clients += [a, b]
    header = b"PROXY TCP6 2001:db8::7 2001:db8::1 1000 80\r\n"
    # As from the balancer: part of the header was already read off the socket.
    r.in_loop(lambda: r.server.add_connection(b, ("127.0.0.1", 5), "", header[:9], proxy_protocol=True))
    a.sendall(header[9:] + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert read_response(a, bytearray())[2] == b"2001:db8::7 1000"


def test_connection_awaiting_proxy_header_is_not_handed_back(serve) -> None:
    """A half-read PROXY header cannot travel as "unparsed bytes": the drain leaves the
    connection (bounded by header_timeout_s) until the header is whole, and hands it
    back with the address the header gave."""
    r = serve(whoami, proxy_protocol=True)
    s = r.connect()
    s.sendall(b"PROXY TCP4 1.2")
    wait_for(lambda: r.server.active_connections == 1, "connection accepted")
    handed: list = []

    def hand_back(sock, unparsed, peer, listener):
        r.clients.append(sock)
        handed.append((sock, unparsed, peer, listener))
    r.in_loop(lambda: r.server.hand_back_with(hand_back))
    r.server.stop(graceful=True)
    r.in_loop(lambda: None)   # the loop went round since the stop: a drain step ran
    assert handed == [] and r.thread.is_alive()
    s.sendall(b".3.4 5.6.7.8 1 2\r\n")
    wait_for(lambda: handed, "the connection handed back once its header was whole")
    (sock, unparsed, peer, listener), = handed
    assert (unparsed, peer, listener) == (b"", ("1.2.3.4", 1), "web")
    r2 = serve(whoami)   # where the balancer would pass it next
    r2.in_loop(lambda: r2.server.add_connection(sock, peer, listener, unparsed))
    get(s, "/")
    assert read_response(s, bytearray())[2] == b"1.2.3.4 1"


def _conn_objects() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is ClientConnection)


def test_timers_and_connections_stay_bounded_over_many_requests(serve) -> None:
    """Memory does not grow with traffic: 20k keep-alive requests and 2k one-request
    connections leave the loop's timer heap with a few entries per live connection,
    and no closed connection alive (each used to stay in the heap until its deadline)."""
    r = serve(validate=False)
    server = r.server
    s = r.connect()
    buf = bytearray()
    batch = b"GET /k HTTP/1.1\r\nHost: t\r\n\r\n" * 100
    for _ in range(200):
        s.sendall(batch)
        for _ in range(100):
            assert read_response(s, buf)[2] == b"hello /k"
    wait_for(lambda: server.requests_served == 20_000, "20k requests served")
    assert server.active_connections == 1
    assert len(r.loop._timers) <= 2 * server.active_connections + 65
    for i in range(2000):
        c = socket.create_connection(("127.0.0.1", r.port))
        c.settimeout(DEADLINE_S)
        c.sendall(b"GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        cbuf = bytearray()
        status, headers, body = read_response(c, cbuf)
        assert body == b"hello /c" and headers["connection"] == "close"
        assert c.recv(1) == b""   # closed right after the response, no lingering
        c.close()
    wait_for(lambda: server.active_connections == 1, "closed connections forgotten")
    assert len(r.loop._timers) <= 2 * server.active_connections + 65
    assert _conn_objects() <= 70
    get(s, "/still")   # the keep-alive connection still works
    assert read_response(s, buf)[2] == b"hello /still"


def test_keepalive_deadline_moves_with_each_request(serve) -> None:
    """A deadline moved later is honoured (its heap entry is re-armed, not fired)."""
    r = serve(keepalive_s=1.0)
    s = r.connect()
    buf = bytearray()
    get(s, "/1")
    read_response(s, buf)
    first_deadline = time.monotonic() + 1.0      # no later than the first request's
    time.sleep(0.5)       # a gap between the requests (an input, not a wait for the server)
    get(s, "/2")          # the keep-alive deadline is now 1 s after this
    read_response(s, buf)
    wait_for(lambda: time.monotonic() > first_deadline + 0.1, "the first deadline to pass")
    assert r.server.active_connections == 1      # still open: the old deadline did not fire
    s.settimeout(DEADLINE_S)
    assert s.recv(1) == b""   # then the idle connection is closed


@pytest.mark.parametrize("defer", [True, False])
def test_with_deferred_accept_the_accept_step_already_answers(defer) -> None:
    """TCP_DEFER_ACCEPT hands over connections with their first bytes, so the worker
    reads them at accept; without it they wait for the loop's next wait."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if defer:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    listener.listen(8)
    loop = Loop()
    server = Server(hello, [listener], ServerSettings(), logging.getLogger("test.httpserver"), loop=loop)
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            client.sendall(b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_for(lambda: select.select([listener], [], [], 0)[0], "a connection to accept")
            loop.run_once(max_wait_s=0)   # one iteration: the listener's accept step
            assert bool(select.select([client], [], [], 0)[0]) == defer
    finally:
        server.stop(graceful=False)
        server.run()   # returns at once, closing what the server opened
        loop.close()
        listener.close()


def test_deferred_accept_serves_pipelined_and_late_clients(serve) -> None:
    r = serve(defer_accept=True)
    silent = r.connect()          # accepted only once it speaks
    clients = [r.connect() for _ in range(5)]
    for i, s in enumerate(clients):
        s.sendall(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\nGET /again HTTP/1.1\r\nHost: t\r\n\r\n" % i)
    for i, s in enumerate(clients):
        buf = bytearray()
        assert read_response(s, buf)[2] == b"hello /%d" % i
        assert read_response(s, buf)[2] == b"hello /again"
    get(silent, "/late")
    assert read_response(silent, bytearray())[2] == b"hello /late"


def test_accepted_connections_have_nodelay(serve) -> None:
    for preset in (False, True):
        r = serve()
        if preset:   # then it is inherited from the listener, not set again
            r.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = r.connect()
        get(s, "/")
        read_response(s, bytearray())
        conn = next(iter(r.server._conns.values()))
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# ---------------------------------------------------------------- responses that wait for the socket

STREAM_CHUNK = 64 * 1024


def streaming(closed: threading.Event, total: int = 8 << 20):
    """An app whose response is `total` bytes in 64 KiB chunks, a pattern the reader can
    check; `closed` is set when the server closes the iterable."""
    class Body:
        def __iter__(self):
            for i in range(total // STREAM_CHUNK):
                yield bytes([i % 251]) * STREAM_CHUNK

        def close(self):
            closed.set()

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/stream":
            return hello(environ, start_response)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(total))])
        return Body()
    return app


def expected_stream(total: int = 8 << 20) -> bytes:
    return b"".join(bytes([i % 251]) * STREAM_CHUNK for i in range(total // STREAM_CHUNK))


def slow_reader(r: Running) -> socket.socket:
    """A client with small socket buffers at both ends (an accepted socket inherits the
    listener's), so that a response of a few MiB fills them while it reads nothing."""
    r.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    s.settimeout(DEADLINE_S)
    s.connect(("127.0.0.1", r.port))
    r.clients.append(s)
    return s


def waiting_for_client(r: Running) -> bool:
    return r.in_loop(lambda: any(c.state.name == "WRITING" for c in r.server._conns.values()))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_response_waits_for_its_reader_and_then_the_next_request_is_served(serve, threads) -> None:
    closed = threading.Event()
    r = serve(streaming(closed), validate=False, threads=threads)
    s = slow_reader(r)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    wait_for(lambda: waiting_for_client(r), "the response to wait for its reader")
    # Meanwhile the server serves others, and no app call is running.
    other = r.connect()
    get(other, "/other")
    assert read_response(other, bytearray())[2] == b"hello /other"
    # No thread waits for the reader: nothing counts as a running app call.
    wait_for(lambda: r.in_loop(r.server.oldest_request_age) is None and r.server.busy_threads == 0,
             "no app call running")
    assert not closed.is_set()
    buf = bytearray()
    status, headers, body = read_response(s, buf)
    assert body == expected_stream()
    # Closed once its last bytes are written: the client may have read them first.
    wait_for(closed.is_set, "the response's iterable closed")
    assert read_response(s, buf)[2] == b"hello /after"   # keep-alive and the pipelined request


@pytest.mark.parametrize("threads", [1, 2])
def test_a_client_that_stops_reading_is_cut_off_and_its_response_closed(serve, threads) -> None:
    closed = threading.Event()
    r = serve(streaming(closed, 64 << 20), validate=False, threads=threads, write_timeout_s=2.0)
    stuck = [slow_reader(r) for _ in range(threads + 1)]   # more than there are threads
    for s in stuck:
        get(s, "/stream")
    wait_for(lambda: r.in_loop(lambda: sum(c.state.name == "WRITING" for c in r.server._conns.values()))
             == len(stuck), "every response to wait for its reader")
    for i in range(3):
        other = r.connect()
        get(other, f"/other{i}")
        assert read_response(other, bytearray())[2] == b"hello /other%d" % i
        assert not closed.is_set(), "served only once a stuck reader was cut off"
    assert closed.wait(DEADLINE_S)
    wait_for(lambda: r.server.active_connections <= 3, "the stuck readers to be closed")
    # Each logged with the part of its response it got.
    wait_for(lambda: len([rec for rec in r.access_records if rec.path == b"/stream"]) == len(stuck),
             "the cut responses logged")
    cut = [rec for rec in r.access_records if rec.path == b"/stream"]
    assert all(rec.status == "200" and rec.length < 64 << 20 for rec in cut)


def test_graceful_stop_lets_a_waiting_response_finish(serve) -> None:
    closed = threading.Event()
    r = serve(streaming(closed), validate=False)
    s = slow_reader(r)
    get(s, "/stream")
    wait_for(lambda: waiting_for_client(r), "the response to wait for its reader")
    r.server.stop(graceful=True)
    assert read_response(s, bytearray())[2] == expected_stream()
    r.thread.join(DEADLINE_S)
    assert not r.thread.is_alive() and closed.is_set()


def test_file_wrapper_response_waits_for_its_reader_without_blocking_others(serve, tmp_path) -> None:
    path = tmp_path / "f.bin"
    payload = os.urandom(8 << 20)
    path.write_bytes(payload)

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/file":
            return hello(environ, start_response)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        f = open(path, "rb")
        f.seek(100)   # sent from the file's offset
        return environ["wsgi.file_wrapper"](f)
    r = serve(app, validate=False)
    s = slow_reader(r)
    get(s, "/file")
    wait_for(lambda: waiting_for_client(r), "the file to wait for its reader")
    other = r.connect()
    get(other, "/other")
    assert read_response(other, bytearray())[2] == b"hello /other"
    status, headers, body = read_response(s, bytearray())
    assert headers["content-length"] == str(len(payload) - 100) and body == payload[100:]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_bad_chunked_body_read_after_100_continue_is_answered_400(serve, threads) -> None:
    """The app reads a body that breaks the protocol: wsgi.input raises (an OSError,
    the client's doing), the client gets 400 and a closed connection, nothing is logged
    as an error of ours."""
    seen = []

    def app(environ, start_response):
        try:
            environ["wsgi.input"].read(100)
        except OSError as exc:
            seen.append(exc)
            raise
        start_response("200 OK", [("Content-Length", "0")])
        return []
    r = serve(app, validate=False, threads=threads)
    s = r.connect()
    s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
    buf = bytearray()
    assert read_response(s, buf)[0] == b"HTTP/1.1 100 Continue"
    s.sendall(b"2\r\nhi\r\nnot-hex\r\n")
    status, headers, _ = read_response(s, buf)
    assert status == b"HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert s.recv(10) == b""
    assert len(seen) == 1 and not [rec for rec in r.records if rec.levelname == "ERROR"]
