"""A client that reads nothing of a large response holds up no one (real workers).

With threads = 1 the app runs on the worker's loop; its response goes out as the
socket takes it, so the worker serves other clients while one sits on 64 MiB it does
not read, and closes that one at `write_timeout` (from its last progress). Each test
checks the order of events, never how long they took: the others are answered while
the slow reader is still connected and its response still open."""
import os
import socket

import pytest
from conftest import REPO, get_json, http_request, wait_for

WRITE_TIMEOUT_S = 3


def _config(port: int, threads: int, write_timeout_s: float = WRITE_TIMEOUT_S) -> str:
    return f"""
    [master]
    graceful_timeout = 5

    [listeners.web]
    bind = "127.0.0.1:{port}"

    [apps.streams]
    module = "tests.apps.streams:app"
    chdir = "{REPO}"
    listeners = ["web"]
    threads = {threads}
    write_timeout = {write_timeout_s}
    """


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _slow_reader(port: int, path: str) -> socket.socket:
    """Ask for `path` and read nothing: the response fills both socket buffers."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return sock


@pytest.mark.parametrize("path,threads", [("/big", 1), ("/file", 1), ("/big", 2)])
def test_a_client_that_reads_nothing_holds_up_no_one(baton, port, scratch, path, threads):
    b = baton(_config(port, threads))
    [worker] = b.wait_workers(1)
    baseline = _fds(worker)   # before any connection (a closed one lingers until the worker reads its EOF)
    assert get_json(port)["pid"] == worker
    closed = scratch / "closed"
    # With threads = 2, two slow readers: neither holds a thread.
    slow = [_slow_reader(port, f"{path}?mb=64&closed={closed}") for _ in range(threads)]
    for _ in range(3):
        status, _, body = http_request(port, "/")
        assert status == 200 and b'"pid": %d' % worker in body
        assert not closed.exists(), "a client was served only after the slow reader was cut off"
        assert "took nothing of its response" not in b.log()
    # Then each slow reader is cut off, its response closed, and the worker lives on.
    b.wait_log("took nothing of its response", timeout=WRITE_TIMEOUT_S + 10, count=threads)
    wait_for(lambda: closed.exists() and closed.read_text().count("closed") == threads)
    for sock in slow:
        sock.close()
    assert get_json(port)["pid"] == worker
    wait_for(lambda: _fds(worker) == baseline, message=lambda: f"{_fds(worker)} fds, not {baseline}")


def test_a_single_chunk_response_waits_for_its_reader_off_the_loop(baton, port):
    """One bytes object of 64 MiB (the one-send path): what the socket does not take
    waits on the connection, and the loop serves the others meanwhile. (The write
    timeout is longer than the others' patience: they cannot wait for it.) The slow
    reader's leaving then frees the connection."""
    b = baton(_config(port, 1, write_timeout_s=600))
    [worker] = b.wait_workers(1)
    baseline = _fds(worker)
    slow = _slow_reader(port, "/whole?mb=64")
    for i in range(3):
        assert get_json(port, f"/other{i}")["pid"] == worker
    slow.close()   # unread bytes: a reset, which the next send sees
    assert get_json(port)["pid"] == worker
    wait_for(lambda: _fds(worker) == baseline, message=lambda: f"{_fds(worker)} fds, not {baseline}")
