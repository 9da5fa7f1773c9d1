"""Request bodies through a real master and worker: `max_body_size` (413 on the head,
and mid-way through a chunked body), bodies streamed to the app as they arrive (it
answers before the client sent everything), a body the app leaves unread (dropped
for keep-alive when small, else the connection closes without taking it in).

Each client sends and reads at once, so a server that answers early is seen doing so;
what a test measures is what came back and how many body bytes the client got to
send, never how long anything took."""
from __future__ import annotations

import hashlib
import os
import select
import socket
import time

import pytest
from conftest import REPO

MB = 1 << 20
CLIENT_DEADLINE_S = 30.0   # a server that never answers fails the test, not hangs it
MODES = ["balance", "share"]


def config(port, mode, threads=1, app=""):
    return f"""
    [master]
    graceful_timeout = 5

    [listeners.web]
    bind = "127.0.0.1:{port}"
    mode = "{mode}"

    [apps.uploads]
    module = "tests.apps.uploads:app"
    chdir = "{REPO}"
    listeners = ["web"]
    workers = 1
    threads = {threads}
    {app}
    """


def response(data: bytes):
    """(status, headers, body) of the complete response at the start of ``data``, and
    what follows it; None while it is incomplete (a body until the close is complete
    only with ``data`` ending at the close: the caller says so by passing it then)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if status == 100:
        return status, headers, b"", rest
    if "content-length" in headers:
        size = int(headers["content-length"])
        return (status, headers, rest[:size], rest[size:]) if len(rest) >= size else None
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            line, crlf, after = rest.partition(b"\r\n")
            if not crlf:
                return None
            size = int(line, 16)
            if len(after) < size + 2:
                return None
            body += after[:size]
            rest = after[size + 2:]
            if size == 0:
                return status, headers, bytes(body), rest
    return None


class Client:
    """One connection that sends and reads at the same time (non-blocking)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.got = bytearray()
        self.closed = False    # the server closed (or reset) the connection
        self.sent = 0          # bytes of what `send` was given that went out

    def send(self, pieces, until=lambda got: False) -> None:
        """Send ``pieces`` (an iterable of bytes) while reading; stop early once
        ``until(received)`` holds or the server closes or refuses more."""
        pieces = iter(pieces)
        out = memoryview(b"")
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        while not self.closed and not until(bytes(self.got)):
            if not out:
                piece = next(pieces, None)
                if piece is None:
                    return
                out = memoryview(piece)
            readable, writable, _ = select.select([self.sock], [self.sock], [], deadline - time.monotonic())
            if not readable and not writable:
                raise AssertionError("the server neither read nor answered in time")
            if readable:
                self._recv()
            if writable and not self.closed:
                try:
                    n = self.sock.send(out)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    self.closed = True
                    return
                self.sent += n
                out = out[n:]

    def read(self, until) -> bytes:
        """Read until ``until(received)`` holds or the server closes; what came."""
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        while not self.closed and not until(bytes(self.got)):
            readable, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            if not readable:
                raise AssertionError(f"no answer in time; got {bytes(self.got)[:300]!r}")
            self._recv()
        return bytes(self.got)

    def read_to_close(self) -> bytes:
        return self.read(lambda got: False)

    def _recv(self) -> None:
        try:
            data = self.sock.recv(MB)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if data:
            self.got += data
        else:
            self.closed = True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(port):
    made = []

    def connect() -> Client:
        made.append(Client(port))
        return made[-1]
    yield connect
    for c in made:
        c.close()


def _pieces(total: int, size: int = 64 * 1024):
    piece = os.urandom(size)
    for _ in range(total // size):
        yield piece


def _chunked(pieces):
    for piece in pieces:
        yield b"%x\r\n%b\r\n" % (len(piece), piece)


@pytest.mark.parametrize("mode", MODES)
def test_a_content_length_over_the_default_limit_is_refused_before_any_body_byte(baton, port, client, mode):
    """The default max_body_size is 100 MiB: a head announcing more is answered 413 at
    once, the client having sent nothing else (nor been told 100 Continue)."""
    b = baton(config(port, mode))
    b.wait_workers(1)
    for expect in (b"", b"Expect: 100-continue\r\n"):
        c = client()
        c.send([b"POST /all HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%b\r\n" % (101 * MB, expect)])
        status, headers, _, _ = response(c.read_to_close())
        assert (status, headers["connection"], c.closed) == (413, "close", True)


def test_max_body_size_0_is_no_limit(baton, port, client):
    b = baton(config(port, "share", app="max_body_size = 0"))
    b.wait_workers(1)
    c = client()
    c.send([b"POST /all HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"])
    status, _, body, _ = response(c.read(response))
    assert (status, body) == (200, b"3 " + hashlib.sha256(b"abc").hexdigest().encode())


@pytest.mark.parametrize("mode", MODES)
def test_a_chunked_body_is_refused_once_it_passes_the_limit(baton, port, client, mode):
    b = baton(config(port, mode))
    b.wait_workers(1)
    c = client()
    c.send([b"POST /all HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"])
    c.send(_chunked(_pieces(200 * MB)), until=response)
    status, headers, _, _ = response(c.read(response))
    assert (status, headers["connection"]) == (413, "close")
    assert c.sent < 200 * MB   # told before the end of its body
    c.read_to_close()


@pytest.mark.parametrize("mode, threads", [("balance", 1), ("share", 1), ("share", 4)])
def test_an_app_refusing_a_200_mb_upload_answers_before_the_body_is_taken_in(baton, port, client, mode, threads):
    """The app answers 405 without reading: the response closes the connection, and
    the worker takes in a bounded part of the body (what the client could send before
    it saw the end: socket buffers and a drain, not 200 MB)."""
    b = baton(config(port, mode, threads, app="max_body_size = 0"))
    b.wait_workers(1)
    c = client()
    c.send([b"POST /refuse HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (200 * MB)])
    c.sent = 0
    c.send(_pieces(200 * MB), until=response)
    status, headers, _, _ = response(c.read(response))
    assert (status, headers["connection"]) == (405, "close")
    c.read_to_close()
    assert c.sent < 50 * MB, f"the client sent {c.sent / MB:.0f} MB"


@pytest.mark.parametrize("mode, threads", [("balance", 1), ("share", 1), ("balance", 2)])
def test_the_app_reads_the_body_while_the_client_is_still_sending_it(baton, port, client, mode, threads):
    """The app echoes the first bytes at once: they come back before the client sends
    the rest, so the app ran with the head (not after the whole body)."""
    b = baton(config(port, mode, threads))
    b.wait_workers(1)
    c = client()
    c.send([b"POST /echo?n=5 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\nhello" % MB])
    got = c.read(lambda got: b"\r\n5\r\nhello\r\n" in got)
    assert got.startswith(b"HTTP/1.1 200 ")
    c.send([b"x" * (MB - 5)])
    status, _, body, _ = response(c.read(response))
    assert (status, body) == (200, b"hello|%d" % (MB - 5))


@pytest.mark.parametrize("mode, threads", [("balance", 1), ("share", 2)])
def test_a_small_unread_body_is_dropped_and_the_connection_kept(baton, port, client, mode, threads):
    """With buffer_body = 0 the app runs on the head; it answers without reading a 40 KB
    body, the response keeps the connection, and the body, sent after it, is dropped
    before the next request on the same connection is served."""
    b = baton(config(port, mode, threads, app="buffer_body = 0"))
    b.wait_workers(1)
    c = client()
    c.send([b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 40000\r\n\r\n"])
    status, headers, body, rest = response(c.read(response))
    assert (status, body, "connection" in headers) == (200, b"ok", False)
    c.got.clear()
    c.send([os.urandom(40000), b"GET /ignore HTTP/1.1\r\nHost: t\r\n\r\n"])
    status, headers, body, rest = response(c.read(response))
    assert (status, body, rest, c.closed) == (200, b"ok", b"", False)


@pytest.mark.parametrize("mode, threads", [("balance", 1), ("share", 1), ("balance", 2)])
def test_a_chunked_20_mb_body_is_streamed_to_the_app_byte_exact(baton, port, client, mode, threads):
    """The app reads 20 MB by read(n), readline(n) and iteration and sends their sha256
    before the client ends the body; then it finds nothing more in it."""
    b = baton(config(port, mode, threads))
    b.wait_workers(1)
    data = os.urandom(20 * MB)
    sizes = [1, 100, 65536, 300000, 7777, 2 * MB]
    pieces, at, i = [], 0, 0
    while at < len(data):
        pieces.append(data[at:at + sizes[i % len(sizes)]])
        at += len(pieces[-1])
        i += 1
    digest = hashlib.sha256(data).hexdigest().encode()
    c = client()
    c.send([b"POST /digest?size=%d HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" % len(data)])
    c.send(_chunked(pieces))
    c.read(lambda got: digest in got)
    c.send([b"0\r\n\r\n"])
    status, _, body, _ = response(c.read(response))
    assert (status, body) == (200, digest + b"\nend 0")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_streamed_body_that_stops_coming_is_answered_408(baton, port, client, threads):
    """The client is told 100 Continue, sends a little of its body and nothing more:
    after header_timeout without a byte, wsgi.input raises TimeoutError (an OSError)
    in the app, which lets it go, and the client is answered 408."""
    b = baton(config(port, "share", threads, app="header_timeout = 1"))
    b.wait_workers(1)
    c = client()
    c.send([b"POST /all HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"])
    assert c.read(lambda got: b"\r\n\r\n" in got) == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.got.clear()
    c.send([b"0123456789"])
    status, headers, _, _ = response(c.read_to_close())
    assert (status, headers["connection"]) == (408, "close")
    assert "Traceback" not in b.log()
