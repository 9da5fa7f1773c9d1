"""`timeout` through real workers (issue #11, item 11).

The hung-request deadline used to be measured from the worker's last heartbeat, not
from the request's start, so it fired up to one heartbeat interval early: requests
well within `timeout` aborted workers. And a SIGSTOPped worker was killed with the
promise of stacks it could not write (SIGABRT waits while a process is stopped).
"""
from __future__ import annotations

import os
import signal
import socket

import pytest
from conftest import REPO, free_port, get_json, http_request, probe_config, wait_for


def config(port, *, workers, timeout):
    return probe_config(port, f"workers = {workers}\ntimeout = {timeout}")


@pytest.mark.timeout(90)
def test_requests_shorter_than_timeout_abort_no_worker(baton, port):
    """Calls of 1.7 s under `timeout = 2` (heartbeats every 0.5 s), each starting late
    in a heartbeat interval, where the old rule cut it short. A worker's heartbeat
    fires as a call returns, so back-to-back calls start early in one; a call on
    another app in between (its workload, 1.2-1.45 s) leaves this worker idle long
    enough to start the next call 0.2-0.45 s after a heartbeat."""
    other = free_port()
    master = baton(config(port, workers=1, timeout=2) + f"""
        [listeners.other]
        bind = "127.0.0.1:{other}"

        [apps.other]
        module = "tests.apps.probe:app"
        listeners = ["other"]
        chdir = "{REPO}"
    """)
    workers = set(master.wait_workers(2))
    statuses = []
    for gap, duration in ((1.4, 1.7), (1.45, 1.7), (1.35, 1.6), (1.2, 1.5)):
        statuses.append(http_request(other, f"/?sleep={gap}", timeout=30)[0])
        statuses.append(http_request(port, f"/?sleep={duration}", timeout=30)[0])
    assert statuses == [200] * 8
    log = master.log()
    assert "timed out" not in log and "aborting it" not in log
    assert set(master.wait_workers(2)) == workers   # the very same workers


@pytest.mark.timeout(60)
def test_a_stopped_worker_is_replaced_and_its_stacks_reach_the_log(baton, port):
    master = baton(config(port, workers=1, timeout=1))
    (stopped,) = master.wait_workers(1)
    os.kill(stopped, signal.SIGSTOP)
    (replacement,) = master.wait_workers(1, exclude=(stopped,), timeout=20)
    assert get_json(port)["pid"] == replacement
    master.wait_log(f"(pid {stopped}) timed out (silent for")
    # Woken (SIGCONT) before the SIGABRT, it wrote its stacks, then died of the abort.
    wait_for(lambda: "Fatal Python error: Aborted" in master.log().split(f"(pid {stopped}) timed out", 1)[1],
             message=lambda: f"the stopped worker's stacks; log:\n{master.log()}")
    assert "Current thread" in master.log() or "Thread 0x" in master.log()


def stalls_config(port, *, threads):
    return f"""
        [master]
        graceful_timeout = 5

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.stalls]
        module = "tests.apps.stalls:app"
        listeners = ["web"]
        chdir = "{REPO}"
        threads = {threads}
        timeout = 1
    """


def raw_exchange(port, path, timeout=30.0) -> bytes:
    """Send one GET and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not data:
                return received
            received += data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_request_past_timeout_is_answered_504_before_its_worker_goes(baton, port, threads):
    """Issue 13 item 4: a closed connection with nothing on it is what nginx reports
    as 502; the client now gets a 504, the stacks are logged as before, and the
    replacement serves the next client."""
    master = baton(stalls_config(port, threads=threads))
    (hung,) = master.wait_workers(1)
    answer = raw_exchange(port, "/?sleep=60")
    assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head and body == b"Gateway Timeout\n"
    master.wait_log(f"(pid {hung}) timed out")
    wait_for(lambda: "Fatal Python error: Aborted" in master.log(), message=lambda: master.log())
    assert 'tests/apps/stalls.py", line' in master.log()   # the hung frame, in the stacks
    # Written after the 504 went out (and after the stacks): it may follow them.
    master.wait_log("answered 504 to 1 running request")
    (replacement,) = master.wait_workers(1, exclude=(hung,), timeout=20)
    status, _, body = http_request(port, "/")
    assert (status, body) == (200, str(replacement).encode())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_timed_out_response_that_had_begun_is_only_closed(baton, port, threads):
    """The head went out: a second status line would corrupt the response, so the
    client sees it end short (the chunked body never ends)."""
    master = baton(stalls_config(port, threads=threads))
    (hung,) = master.wait_workers(1)
    answer = raw_exchange(port, "/stream?sleep=60")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.count(b"HTTP/1.1") == 1 and b"Gateway Timeout" not in answer, answer   # (a pid in the body may hold "504")
    assert answer.endswith(f"{hung}\n\r\n".encode()), answer    # the first chunk, nothing after
    master.wait_log("closed 1 whose response had begun")
    master.wait_workers(1, exclude=(hung,), timeout=20)
