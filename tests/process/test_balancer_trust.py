"""The balancer trusts no worker, and weathers running out of fds: real masters.

App code in a worker can write anything on its channels: it cannot hand another app
a connection, nor forge a client address, and no fuzzed message costs the master or
the balancer their process, a request or an fd. Under `ulimit -n 1024` a flood of
silent connections and a worker with no fd left are weathered, and recovered from."""
from __future__ import annotations

import http.client
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Baton, alive, http_request, wait_for

FORGED = "203.0.113.9"   # tests/apps/intruder.py's


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(pid: int, baseline: int, what: str) -> None:
    """No fd leaked: back to the baseline (which may have held a connection in flight)."""
    wait_for(lambda: fds(pid) <= baseline, timeout=15,
             message=lambda: f"the {what}'s fds back to {baseline} (it has {fds(pid)})")


def answers_for(port: int, host: str) -> bool:
    try:
        return http_request(port, "/", headers={"Host": host}, timeout=3)[0] == 200
    except OSError:
        return False


def body_of(port: int, path: str, host: str) -> bytes:
    return http_request(port, path, headers={"Host": host}, timeout=15)[2]


def two_apps(port: int, scratch=None, a_module="intruder", a_workers=2, b_workers=1, master="", extra_a=""):
    env = f'env = {{ INTRUDER_SEEN = "{scratch}/seen-b" }}' if scratch else ""
    return f"""
        [master]
        graceful_timeout = 5
        crash_backoff_max = 0.5
        {master}

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.a]
        module = "tests.apps.{a_module}:app"
        listeners = ["web"]
        hosts = ["a.test"]
        workers = {a_workers}
        chdir = "{REPO}"
        {extra_a}

        [apps.b]
        module = "tests.apps.intruder:app"
        listeners = ["web"]
        hosts = ["b.test"]
        workers = {b_workers}
        chdir = "{REPO}"
        {env}
    """


# -- item 2: a worker hands back only what it was given, to its own app --------------------


@pytest.mark.parametrize("target", ["b", "own"])
def test_a_worker_cannot_hand_back_a_connection_of_its_own_making(baton, port, scratch, target):
    master = baton(two_apps(port, scratch))
    master.wait_workers(3)
    balancer = master.balancer()
    wait_for(lambda: answers_for(port, "b.test"), message="app b answering")
    before = fds(balancer)
    answer = body_of(port, f"/?forge={target}", "a.test")
    # Believed, the forged connection reached an app, whose answer came back to the forger.
    assert FORGED.encode() not in answer and b"pid=" not in answer, answer
    assert answer == b"nothing came back"
    master.wait_log("handed back something that is not a connection it may hand back")
    assert "dropping its link" in master.log()
    assert alive(master.pid) and alive(balancer) and master.balancer() == balancer
    # The forger's worker heard its link drop and stopped; the master replaced it.
    master.wait_log("the balancer dropped this worker's link; stopping")
    master.wait_workers(3)
    wait_for(lambda: answers_for(port, "a.test") and answers_for(port, "b.test"), message="both apps answering")
    seen = (scratch / "seen-b").read_text()
    assert FORGED not in seen and "127.0.0.1" in seen   # app b saw only real clients
    settle(balancer, before, "balancer")


# -- the fuzz: the master and the balancer outlive anything app code sends -------------------


FUZZ_ROUNDS = 6
FUZZ_LEADING = 40     # random valid messages of the kind the receiver takes from a worker
FUZZ_PER_ROUND = 100  # then the valid messages of every kind, then mutations


def fuzz_rounds(master: Baton, port: int, to: str, scratch) -> int:
    """Each round, app code in a worker sends a burst of fuzzed messages to `to`; the
    receiver drops the channel at the first bad one and the worker is replaced. How
    many went out in all (a byte each in the tally file: a killed worker cannot say)."""
    tally = scratch / f"tally-{to}"
    for seed in range(FUZZ_ROUNDS):
        (worker,) = master.wait_workers(1, timeout=15)
        try:
            status, _, _ = http_request(port, f"/?to={to}&seed={seed}&count={FUZZ_PER_ROUND}&leading={FUZZ_LEADING}&tally={tally}",
                                        timeout=10)
            # 503: a fuzzed REPORT said the request's own connection never reached the
            # worker (it may lie about what it was given), and the balancer answered.
            assert status in (200, 503)
        except (ConnectionError, http.client.HTTPException):
            pass   # the master killed the worker mid-request
        wait_for(lambda: not alive(worker), timeout=15, message=lambda: f"worker {worker} to be replaced; log:\n{master.log()}")
    return tally.stat().st_size


def fuzz_config(port: int) -> str:
    return f"""
        [master]
        graceful_timeout = 2
        crash_backoff_max = 0.2

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.fuzz]
        module = "tests.apps.fuzzer:app"
        listeners = ["web"]
        chdir = "{REPO}"
    """


@pytest.mark.timeout(60)
def test_fuzzed_messages_from_app_code_cost_the_master_nothing_but_that_worker(baton, port, scratch):
    master = baton(fuzz_config(port))
    master.wait_workers(1)
    balancer = master.balancer()
    wait_for(lambda: http_request(port, "/")[0] == 200, message="the app answering")
    master_fds, balancer_fds = fds(master.pid), fds(balancer)
    sent = fuzz_rounds(master, port, "master", scratch)
    assert sent >= FUZZ_ROUNDS * (FUZZ_LEADING + 19)   # at least the valid ones, each round
    master.wait_log("sent a bad message", count=1)
    assert "; replacing it" in master.log()
    master.wait_workers(1, timeout=15)
    assert alive(master.pid) and master.balancer() == balancer
    assert http_request(port, "/")[0] == 200
    settle(master.pid, master_fds, "master")
    settle(balancer, balancer_fds, "balancer")
    assert "Traceback" not in master.log()


@pytest.mark.timeout(60)
def test_fuzzed_messages_from_app_code_cost_the_balancer_nothing_but_that_link(baton, port, scratch):
    master = baton(fuzz_config(port))
    master.wait_workers(1)
    balancer = master.balancer()
    wait_for(lambda: http_request(port, "/")[0] == 200, message="the app answering")
    master_fds, balancer_fds = fds(master.pid), fds(balancer)
    sent = fuzz_rounds(master, port, "balancer", scratch)
    assert sent >= FUZZ_ROUNDS * (FUZZ_LEADING + 1)   # the reports, then the first lie
    assert master.log().count("dropping its link") >= FUZZ_ROUNDS
    master.wait_workers(1, timeout=15)
    assert alive(master.pid) and master.balancer() == balancer
    wait_for(lambda: http_request(port, "/")[0] == 200, message="the app answering again")
    settle(master.pid, master_fds, "master")
    settle(balancer, balancer_fds, "balancer")
    assert "Traceback" not in master.log()


# -- item 3: out of fds ---------------------------------------------------------------------


class Limited(Baton):
    """A master, and so every child of it, under `ulimit -n 1024` (hard limit too)."""

    def start(self, *args: str) -> "Limited":
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "-c", str(self.config), *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
        return self


@pytest.fixture
def limited(tmp_path):
    started = []

    def start(toml: str) -> Limited:
        master = Limited(tmp_path, toml).start()
        started.append(master)
        return master
    yield start
    for master in started:
        master.close()


FLOOD = 1100
BURSTS = 3


def silent_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections that never send a byte (connecting in the background: the
    kernel completes them from the listener's backlog)."""
    made = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        made.append(sock)
    return made


@pytest.mark.timeout(120)
def test_a_flood_of_silent_connections_at_the_fd_limit_is_shed_and_recovered_from(limited, port):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FLOOD + 100:
        pytest.skip(f"the test needs {FLOOD + 100} fds of its own, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 100), hard))
    master = limited(two_apps(port, a_module="intruder"))
    master.wait_workers(3)
    balancer = master.balancer()
    assert re.search(r"Max open files\s+1024\s+1024", Path(f"/proc/{balancer}/limits").read_text())
    wait_for(lambda: answers_for(port, "a.test") and answers_for(port, "b.test"), message="both apps answering")
    baseline, lines_before = fds(balancer), master.log().count("\n")
    try:
        for burst in range(BURSTS):
            flood = silent_connections(port, FLOOD)
            try:   # the balancer holds all it can (it sheds SHED_BATCH at a time): it is out of fds
                wait_for(lambda: fds(balancer) >= 900, timeout=20,
                         message=lambda: f"burst {burst}: the balancer at its limit (it has {fds(balancer)})")
                wait_for(lambda: "accept on web failed" in master.log(), timeout=20, message="the accept failure")
            finally:
                ended = time.monotonic()
                for sock in flood:
                    sock.close()
        # Good clients are served again soon after the flood ends.
        wait_for(lambda: answers_for(port, "b.test"), timeout=20, message=lambda: f"app b again; log:\n{master.log()}")
        recovered_s = time.monotonic() - ended
        print(f"\nserved again {recovered_s:.3f} s after the flood ended")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    settle(balancer, baseline, "balancer")
    assert alive(balancer) and master.balancer() == balancer
    log = master.log()
    assert log.count("accept on web failed") <= BURSTS + 6   # once per interval, not per accept
    assert log.count("\n") - lines_before < 100, log[-5000:]


@pytest.mark.timeout(60)
def test_connections_sent_to_a_worker_out_of_fds_go_to_another_and_leak_nothing(limited, port):
    # Not parked: parking would hand the exhausted worker's idle connections back (and
    # so give it fds again), and hold the others in the balancer.
    master = limited(two_apps(port, a_module="intruder", extra_a='balance = "round-robin"\npark_after = 0'))
    master.wait_workers(3)
    balancer = master.balancer()
    wait_for(lambda: answers_for(port, "a.test"), message="app a answering")
    baseline = fds(balancer)
    # Every connection stays open to the end, so the worker that ran out of fds never
    # gets one back.
    clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=15) for _ in range(21)]
    try:
        bodies = []
        for client in clients:   # each on a new connection, one after the other
            client.request("GET", "/?exhaust" if not bodies else "/", headers={"Host": "a.test"})
            response = client.getresponse()
            bodies.append((response.status, response.read()))
        exhausted = bodies.pop(0)[1].split()[0]
        assert {status for status, _ in bodies} == {200}
        assert all(body.startswith(b"pid=") and not body.startswith(exhausted + b" ") for _, body in bodies), (exhausted, bodies)
        master.wait_log("could not take a connection from the balancer")
        master.wait_log("could not take 1 connection (out of fds); passing them on")
        assert alive(int(exhausted.split(b"=")[1]))
        settle(balancer, baseline, "balancer")
    finally:
        for client in clients:
            client.close()
