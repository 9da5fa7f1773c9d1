"""Hostile and odd requests through a real master and worker: bounded memory for any
body, 400 (and a closed connection, the worker alive) for every request llhttp would let
through loosely, bodies of requests that ask to upgrade, and PROXY headers only from the
peers a listener allows."""
from __future__ import annotations

import json
import socket
import zlib

import pytest
from conftest import REPO, free_port, http_request, proc_status, wait_for

BODY_MB = 200


def config(port, mode="share", listener_extra="", more=""):
    return f"""
        [master]
        graceful_timeout = 5

        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "{mode}"
        {listener_extra}

        {more}

        [apps.bodies]
        module = "tests.apps.bodies:app"
        listeners = ["web"{', "strict"' if more else ''}]
        workers = 1
        max_body_size = 0   # no limit: bodies past the default 100 MiB are sent
        chdir = "{REPO}"
    """


def exchange(port, data: bytes, timeout=10.0) -> tuple[bytes, bool]:
    """Send ``data``, read until the server closes; what came back, and whether the
    server closed (rather than the read timing out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = bytearray()
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    return bytes(got), True
                got += piece
        except TimeoutError:
            return bytes(got), False


def served_by(port) -> int:
    status, _, body = http_request(port, "/", method="POST", body=b"x")
    assert status == 200, body
    return json.loads(body)["pid"]


def kib(pid, key) -> int:
    return int(proc_status(pid)[key].split()[0])


@pytest.fixture
def worker(baton, port):
    master = baton(config(port))
    pid = master.wait_workers(1)[0]
    assert served_by(port) == pid
    return master, pid


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_long_body_costs_the_worker_no_memory_of_its_size(worker, port, framing):
    """200 MB streamed to the app: the worker's peak resident memory grows by far less
    than the body (it was kept whole in memory, beside the spool file, before)."""
    master, pid = worker
    piece = bytes(range(256)) * 256            # 64 KiB
    count = BODY_MB * 16
    head = b"POST /up HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    head += (b"Content-Length: %d\r\n\r\n" % (len(piece) * count) if framing == "content-length"
             else b"Transfer-Encoding: chunked\r\n\r\n")
    frame = piece if framing == "content-length" else b"%x\r\n%b\r\n" % (len(piece), piece)
    peak_before, rss_before = kib(pid, "VmHWM"), kib(pid, "VmRSS")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for _ in range(count):
            sock.sendall(frame)
        if framing == "chunked":
            sock.sendall(b"0\r\n\r\n")
        got = bytearray()
        while piece_in := sock.recv(65536):
            got += piece_in
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    answer = json.loads(bytes(got).partition(b"\r\n\r\n")[2])
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(piece, crc)
    assert answer == {"bytes": len(piece) * count, "crc": crc, "upgrade": None, "remote": "127.0.0.1",
                      "pid": pid}
    grown_mb = (kib(pid, "VmHWM") - peak_before) / 1024
    assert grown_mb < BODY_MB / 8, f"the worker's peak memory grew by {grown_mb:.0f} MB"
    assert (kib(pid, "VmRSS") - rss_before) / 1024 < BODY_MB / 8


BAD_REQUESTS = {
    "host with a space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host with a slash": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "host with userinfo": b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
    "two spaces in the request line": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    "a bare CR before the request line": b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "userinfo in an absolute target": b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
}


def test_loosely_formed_requests_are_refused_and_the_worker_lives_on(worker, port):
    master, pid = worker
    for what, data in BAD_REQUESTS.items():
        got, closed = exchange(port, data)
        assert got.startswith(b"HTTP/1.1 400 ") and b"Connection: close\r\n" in got, (what, got)
        assert closed, what
        assert served_by(port) == pid, what


def test_a_bad_chunked_body_after_100_continue_is_a_400_not_a_500(worker, port):
    master, pid = worker
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        got = bytearray()
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n")
        got = bytearray()
        while piece := sock.recv(65536):
            got += piece
    assert got.startswith(b"HTTP/1.1 400 ") and b"Connection: close\r\n" in got, got
    assert served_by(port) == pid
    assert "Traceback" not in master.log()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_request_asking_to_upgrade_gets_its_body_to_the_app(worker, port, framing):
    master, pid = worker
    body = b"hello, h2c"
    head = (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n")
    if framing == "chunked":
        data = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    else:
        data = head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    got, closed = exchange(port, data)
    assert got.startswith(b"HTTP/1.1 200 "), got
    assert closed   # no protocol is switched, and the connection is not kept
    answer = json.loads(got.partition(b"\r\n\r\n")[2])
    assert (answer["bytes"], answer["crc"], answer["upgrade"]) == (len(body), zlib.crc32(body), None)


@pytest.mark.parametrize("mode", ["balance", "share"])
def test_proxy_headers_are_taken_only_from_allowed_peers(baton, port, mode):
    """Two PROXY listeners: one with the default allow-list (127.0.0.1 is on it), one
    that allows only 10.0.0.0/8, so our 127.0.0.1 is refused: closed, unanswered, and
    the refusals logged once."""
    strict_port = free_port()
    more = f"""
        [listeners.strict]
        bind = "127.0.0.1:{strict_port}"
        mode = "{mode}"
        proxy_protocol = true
        proxy_allow_ips = ["10.0.0.0/8"]
    """
    master = baton(config(port, mode, "proxy_protocol = true", more))
    pid = master.wait_workers(1)[0]
    request = (b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n"
               b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
    got = wait_for(lambda: (lambda r: r[0] if r[0].startswith(b"HTTP/1.1 200 ") else None)(exchange(port, request)),
                   message="an answer on the allowed listener")
    answer = json.loads(got.partition(b"\r\n\r\n")[2])
    assert (answer["remote"], answer["bytes"], answer["pid"]) == ("203.0.113.9", 2, pid)
    for _ in range(3):
        got, closed = exchange(strict_port, request)
        assert (got, closed) == (b"", True)
    master.wait_log("takes PROXY headers only from its proxy_allow_ips")
    assert master.log().count("takes PROXY headers only from its proxy_allow_ips") == 1
    assert "('127.0.0.1'," in master.log()
