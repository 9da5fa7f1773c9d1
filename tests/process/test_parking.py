"""The balancer balances per request (issue #12, items 1 and 2), as real processes: a
connection goes only to a worker that can serve it now, and an idle keep-alive
connection is parked in the balancer, so its next request goes to a free worker.

Which worker answered is read from the answer (the app's pid), never from timing."""
from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from pathlib import Path

from conftest import REPO, free_port, http_request, pidfd_count, wait_for

from supervisor.http.server import INLINE_PARK_AFTER_S


def config(port: int, health: int, workers: int = 2, app: str = "", park_after: float = 0.002) -> str:
    return f"""
        [master]
        graceful_timeout = 5
        health = "127.0.0.1:{health}"

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.sleeper]
        module = "tests.apps.sleeper:app"
        listeners = ["web"]
        workers = {workers}
        threads = 1
        park_after = {park_after}
        chdir = "{REPO}"
        {app}
    """


def metrics_text(health: int) -> str:
    """/metrics, read to the end of the connection: the balancer closes its side before
    the client sees EOF, so a count of the balancer's fds taken after it is exact."""
    with socket.create_connection(("127.0.0.1", health), timeout=10) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer.partition(b"\r\n\r\n")[2].decode()


def metric(health: int, name: str, app: str | None = None) -> float | None:
    prefix = f'{name}{{app="{app}"}} ' if app else f"{name} "
    for line in metrics_text(health).splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pid_of(port: int, path: str = "/") -> int:
    """One request on a new connection; the pid of the worker that answered."""
    status, _, body = http_request(port, path, headers={"Connection": "close"})
    assert status == 200, body
    return int(body)


def ask(conn: http.client.HTTPConnection, path: str = "/") -> int:
    """One request on a kept connection; the pid of the worker that answered."""
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    return int(response.read())


def slow_on(port: int, scratch: Path, pid: int) -> list["Slow"]:
    """Slow requests until one runs on worker `pid` (the balancer picks: one that lands
    elsewhere is waited out); all of them, that one last."""
    slows = []
    for attempt in range(3):
        slow = Slow(port, scratch / f"slow-{attempt}")
        slows.append(slow)
        if slow.pid == pid:
            return slows
        slow.join()
    raise AssertionError(f"no slow request ran on worker {pid}: {[slow.pid for slow in slows]}")


class Slow:
    """A slow request in a thread; `pid` is the worker that runs it (from its mark)."""

    def __init__(self, port: int, mark: Path, seconds: float = 1.0):
        self.mark = mark
        self.answer: list[int] = []
        self.thread = threading.Thread(target=lambda: self.answer.append(
            pid_of(port, f"/?sleep={seconds}&mark={mark}")))
        self.thread.start()
        self.pid = int(wait_for(lambda: mark.exists() and mark.read_text(), message="the slow request to run"))

    def join(self) -> None:
        self.thread.join(15)
        assert self.answer == [self.pid]


def test_a_slow_request_never_delays_a_fast_one_on_a_new_connection_while_another_worker_is_free(
        baton, port, scratch):
    health = free_port()
    master = baton(config(port, health))
    workers = master.wait_workers(2)
    slow = Slow(port, scratch / "slow")
    other = next(pid for pid in workers if pid != slow.pid)
    # One after the other, each on a new connection, with no wait for the balancer to
    # hear that the previous one ended: the worker says it is free as its request ends.
    fast = [pid_of(port) for _ in range(20)]
    slow.join()
    assert fast == [other] * 20


def test_a_parked_keep_alive_connection_is_served_by_another_worker_when_its_first_is_busy(
        baton, port, scratch):
    health = free_port()
    master = baton(config(port, health))
    master.wait_workers(2)
    wait_for(lambda: metric(health, "baton_parked") == 0, message="the balancer's /metrics")
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        first = ask(kept)
        wait_for(lambda: metric(health, "baton_parked") == 1, message="the kept connection to be parked")
        slows = slow_on(port, scratch, first)   # the next, on the only one free, is on the first
        second = ask(kept)   # the same connection, while its first worker is busy
        assert second != first
        for slow in slows:
            slow.join()
        assert metric(health, "baton_parks_total", "sleeper") >= 2
    finally:
        kept.close()


def test_a_one_thread_worker_parks_its_idle_connections_as_an_app_call_starts(baton, port, scratch):
    """park_after is long here, so only the park as the slow call starts on the kept
    connection's worker can move it (http.server.INLINE_PARK_AFTER_S): its next request
    is then served by the other worker, not after the slow one."""
    health = free_port()
    # Round robin: least-connections would keep the slow requests off the worker that
    # holds the kept connection.
    master = baton(config(port, health, park_after=30, app='balance = "round-robin"'))
    master.wait_workers(2)
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        first = ask(kept)
        answered_at = time.monotonic()
        # Its worker decides by how long the connection has been idle (its own clock).
        wait_for(lambda: time.monotonic() - answered_at > 20 * INLINE_PARK_AFTER_S, interval=0.001)
        slows = slow_on(port, scratch, first)
        second = ask(kept)
        assert second != first
        for slow in slows:
            slow.join()
        assert metric(health, "baton_parks_total", "sleeper") == 1
    finally:
        kept.close()


def test_a_parked_connection_the_client_closes_leaks_nothing_in_the_balancer(baton, port):
    health = free_port()
    master = baton(config(port, health))
    master.wait_workers(2)
    balancer = master.balancer()
    wait_for(lambda: metric(health, "baton_parked") == 0, message="the balancer's /metrics")
    # Each link's RECLAIM (a pidfd and a channel end) follows its ATTACH: both in first.
    wait_for(lambda: pidfd_count(balancer) == 2, message="both workers' links complete")
    baseline = fds(balancer)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    for client in clients:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
    wait_for(lambda: metric(health, "baton_parked") == 5, message="the five to be parked")
    assert fds(balancer) > baseline   # it holds them
    for client in clients:
        client.close()
    wait_for(lambda: metric(health, "baton_parked") == 0, message="the closes to be seen")
    wait_for(lambda: fds(balancer) == baseline,
             message=lambda: f"the balancer's fds back to {baseline} (it has {fds(balancer)})")


def test_a_parked_connection_idle_past_keepalive_is_closed_by_the_balancer(baton, port):
    health = free_port()
    master = baton(config(port, health, app="keepalive = 1"))
    master.wait_workers(2)
    wait_for(lambda: metric(health, "baton_parked") == 0, message="the balancer's /metrics")
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    with client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        wait_for(lambda: metric(health, "baton_parked") == 1, message="the connection to be parked")
        assert client.recv(1) == b""   # closed, unanswered (blocks until then, 10 s at most)
    wait_for(lambda: metric(health, "baton_parked") == 0, message="the balancer to let it go")


def test_a_parked_connection_serves_on_and_is_parked_again(baton, port):
    """A parked connection's next requests are served as if it had never moved (the one
    worker takes it back each time), and it is parked again when it idles."""
    health = free_port()
    master = baton(config(port, health, workers=1))
    master.wait_workers(1)
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        ask(kept)
        wait_for(lambda: metric(health, "baton_parks_total", "sleeper") == 1, message="the first park")
        for _ in range(50):
            ask(kept)
        wait_for(lambda: metric(health, "baton_parked") == 1, message="parked again")
        assert ask(kept) > 0
    finally:
        kept.close()


def test_a_parked_connection_on_a_listener_shared_by_host_goes_to_the_app_its_next_request_names(
        baton, port):
    health = free_port()
    master = baton(f"""
        [master]
        graceful_timeout = 5
        health = "127.0.0.1:{health}"

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.alpha]
        module = "tests.apps.sleeper:app"
        listeners = ["web"]
        hosts = ["alpha.test"]
        park_after = 0.002
        chdir = "{REPO}"

        [apps.beta]
        module = "tests.apps.sleeper:app"
        listeners = ["web"]
        hosts = ["beta.test"]
        park_after = 0.002
        chdir = "{REPO}"
    """)
    master.wait_workers(2)
    alpha, beta = (pid_of_host(port, host) for host in ("alpha.test", "beta.test"))
    assert alpha != beta
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        kept.request("GET", "/", headers={"Host": "alpha.test"})
        assert int(kept.getresponse().read()) == alpha
        wait_for(lambda: metric(health, "baton_parked") == 1, message="the kept connection to be parked")
        kept.request("GET", "/", headers={"Host": "beta.test"})
        response = kept.getresponse()   # not a 421: the balancer routed this request anew
        assert (response.status, int(response.read())) == (200, beta)
    finally:
        kept.close()


def pid_of_host(port: int, host: str) -> int:
    status, _, body = http_request(port, "/", headers={"Host": host, "Connection": "close"})
    assert status == 200, body
    return int(body)
