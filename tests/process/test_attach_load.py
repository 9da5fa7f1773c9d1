"""Attached workers under load (issue #16): a blue/green switch and its rollback with
kept connections, an attached worker killed or silenced while others serve, and a fuzz
of the attach socket's protocol. Real masters, real `baton worker --attach` processes
(as nobody), real clients; every wait polls a condition, and which worker answered is
read from the answer (the probe app's pid)."""
from __future__ import annotations

import array
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, get_json, http_request, probe_config, wait_for
from test_attach import NOBODY, attach_config
from test_operations import ctl
from test_parking import fds

from supervisor.ipc import messages

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run workers as other users")

# Requests each client makes at most: the tests stop them sooner, this bounds a stuck test.
CLIENT_LIMIT = 20000


class Worker:
    """One `baton worker --attach` process as nobody; its output goes to a file, so a
    pipe nobody reads can never stall it."""

    def __init__(self, path: Path, tag: str, out: Path):
        with open(out, "wb") as sink:
            self.proc = subprocess.Popen(
                [*NOBODY, sys.executable, "-m", "supervisor", "worker", "--attach", str(path), "--tag", tag,
                 "tests.apps.probe:app"], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid   # setpriv execs: the pid the master and the app see

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)   # one a test stopped must be able to die
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def workers(attach_dir):
    """Factory: workers(path, tag) -> a started Worker; each is killed at teardown."""
    started: list[Worker] = []

    def start(path: Path, tag: str) -> Worker:
        started.append(Worker(path, tag, attach_dir / f"worker-{len(started)}.out"))
        return started[-1]
    yield start
    for worker in started:
        worker.stop()


def attach_ready(master, workers, path: Path, tag: str, count: int, state: str = "serving") -> dict[int, Worker]:
    """Start `count` workers of `tag` and wait until the master logs each ready in `state`;
    them, by pid."""
    started = [workers(path, tag) for _ in range(count)]
    word = "serving" if state == "serving" else "standing by"
    for worker in started:
        master.wait_log(f"worker attached probe tag {tag} (pid {worker.pid}, uid 65534) ready, {word}", timeout=20)
    return {worker.pid: worker for worker in started}


class KeptClient(threading.Thread):
    """Requests back to back on one HTTPConnection. http.client reconnects silently, so
    each request checks the socket is the one it started with: a connection the server
    closed counts in `closed`, never as a success on a new one. `once_failed` says what
    a failure does: "stop" (none is allowed), or "reconnect" (noted with the pid of the
    last answer on that connection, and a new connection goes on)."""

    def __init__(self, port: int, once_failed: str = "stop", marks: Path | None = None):
        super().__init__(daemon=True)
        self.port = port
        self.once_failed = once_failed
        self.marks = marks   # if given, each request names a mark file, as FreshClient's do
        self.pids: list[int] = []
        # (the last pid on that connection, whether its request had started, what)
        self.failures: list[tuple[int | None, bool, str]] = []
        self.closed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        sock, last = None, None
        try:
            for number in range(CLIENT_LIMIT):
                if self.halt.is_set():
                    return
                mark = self.marks / f"{self.name}-{number}" if self.marks is not None else None
                try:
                    conn.request("GET", f"/?mark={mark}" if mark is not None else "/")
                    if sock is None:
                        sock = conn.sock
                    elif conn.sock is not sock:
                        self.closed += 1
                        sock = conn.sock
                    response = conn.getresponse()
                    body = response.read()
                    if response.status != 200:
                        raise AssertionError(f"status {response.status}: {body!r}")
                    if conn.sock is not sock:   # the answer said Connection: close
                        self.closed += 1
                    last = get_pid(body)
                    self.pids.append(last)
                except Exception as exc:
                    self.failures.append((last, mark is not None and mark.exists(), repr(exc)))
                    if self.once_failed == "stop":
                        return
                    conn.close()
                    sock, last = None, None
        finally:
            conn.close()

    def finish(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive()


class FreshClient(threading.Thread):
    """Requests back to back, each on a new connection that says Connection: close.
    Each names a mark file, which the app makes as it starts the request: a failure is
    noted with whether its request had started (its mark exists)."""

    def __init__(self, port: int, marks: Path):
        super().__init__(daemon=True)
        self.port = port
        self.marks = marks
        self.pids: list[int] = []
        self.failures: list[tuple[bool, str]] = []   # (it had started, what)
        self.halt = threading.Event()

    def run(self) -> None:
        for number in range(CLIENT_LIMIT):
            if self.halt.is_set():
                return
            mark = self.marks / f"{self.name}-{number}"
            try:
                status, _, body = http_request(self.port, f"/?mark={mark}", headers={"Connection": "close"},
                                               timeout=20)
                if status != 200:
                    raise AssertionError(f"status {status}: {body!r}")
                self.pids.append(get_pid(body))
            except Exception as exc:
                self.failures.append((mark.exists(), repr(exc)))

    def finish(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive()


def get_pid(body: bytes) -> int:
    return json.loads(body)["pid"]


def progressed(clients, more: int) -> None:
    """Wait until every client has made `more` requests beyond its count now."""
    marks = [len(client.pids) for client in clients]
    wait_for(lambda: all(len(c.pids) >= mark + more or c.failures for c, mark in zip(clients, marks)), 30,
             message=lambda: f"{more} more answers per client: {[len(c.pids) for c in clients]} from {marks}")
    assert [c.failures for c in clients if c.failures] == []


def switched_to(clients, pids: set[int]) -> None:
    """Wait until every client's latest answer came from `pids`; then each client's
    next answers must all come from them (no connection goes back)."""
    wait_for(lambda: all(c.pids and c.pids[-1] in pids for c in clients) or any(c.failures for c in clients), 30,
             message=lambda: f"every client answered by {sorted(pids)}: {[c.pids[-1:] for c in clients]}")
    marks = [len(client.pids) for client in clients]
    progressed(clients, 20)
    strays = {pid for client, mark in zip(clients, marks) for pid in client.pids[mark:]} - pids
    assert not strays, f"answers from {strays} after the switch to {sorted(pids)}"


def promote(master, tag: str) -> None:
    result = ctl(master, "promote", "probe", tag)
    assert result.returncode == 0, result.stderr


def client_sockets(pid: int) -> list[str]:
    """The TCP connections (not listeners) `pid` holds: a balancer holds each it passed
    on until the worker says it took it."""
    connected = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":
                connected.add(f"socket:[{fields[9]}]")
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue   # closed meanwhile
        if target in connected:
            held.append(target)
    return held


def settled_fds(balancer: int, port: int, pids: set[int]) -> int:
    """The balancer's fd count once every worker in `pids` has answered through it (its
    link is complete) and it holds no client connection."""
    seen: set[int] = set()
    wait_for(lambda: seen.add(get_json(port)["pid"]) or seen >= pids, message=f"answers from each of {pids}")
    wait_for(lambda: not client_sockets(balancer), message="the balancer holding no client connection")
    return fds(balancer)


def blue_green_config(port: int, path: Path, app: str = "") -> str:
    # Connections stay at their worker (back to back, none idles 5 s): only STANDBY
    # makes a worker hand its kept connections back.
    return attach_config(port, path, f"park_after = 5\n{app}")


def blue_under_load(baton, port: int, path: Path, workers, app: str = ""):
    """A master whose app is served by two attached workers of tag blue, and 16
    keep-alive clients that have made 10 requests each (stopped by the caller)."""
    master = baton(blue_green_config(port, path, app))
    master.wait_log(f"app probe: workers may attach at {path}")
    blue = set(attach_ready(master, workers, path, "blue", 2))
    clients = [KeptClient(port) for _ in range(16)]
    for client in clients:
        client.start()
    progressed(clients, 10)
    return master, blue, clients


@pytest.mark.timeout(180)
def test_blue_green_promote_and_rollback_keep_every_connection(baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    master, blue, clients = blue_under_load(baton, port, path, workers)
    try:
        green = set(attach_ready(master, workers, path, "green", 2, state="standby"))
        progressed(clients, 20)
        before = [list(client.pids) for client in clients]
        assert {pid for pids in before for pid in pids} <= blue   # green stood by: it answered nothing

        promote(master, "green")
        master.wait_log("app probe: tag 'green' is live, 'blue' stands by (promoted)")
        switched_to(clients, green)

        promote(master, "blue")
        master.wait_log("app probe: tag 'blue' is live, 'green' stands by (promoted)")
        switched_to(clients, blue)
    finally:
        for client in clients:
            client.finish()
    assert [c.failures for c in clients if c.failures] == []
    assert sum(client.closed for client in clients) == 0
    assert "left:" not in master.log()   # both tags stayed attached throughout


@pytest.mark.timeout(180)
def test_attach_promote_switches_by_itself_once_enough_of_the_new_tag_are_ready(baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    master, blue, clients = blue_under_load(baton, port, path, workers, "attach_promote = 2")
    try:
        first = set(attach_ready(master, workers, path, "green", 1, state="standby"))
        progressed(clients, 20)
        assert {pid for client in clients for pid in client.pids} <= blue   # one of two: no switch
        second = set(attach_ready(master, workers, path, "green", 1, state="standby"))
        master.wait_log("app probe: tag 'green' is live, 'blue' stands by (2 of its workers are ready)")
        switched_to(clients, first | second)
    finally:
        for client in clients:
            client.finish()
    assert [c.failures for c in clients if c.failures] == []
    assert sum(client.closed for client in clients) == 0


@pytest.mark.timeout(180)
def test_killing_an_attached_worker_under_load_fails_only_connections_it_had_taken(
        baton, port, attach_dir, workers, scratch):
    path = attach_dir / "probe.sock"
    # Parking as by default: a connection stays claimed, and unacknowledged, until its
    # request starts, so one the victim held but had not started goes to the others.
    master = baton(attach_config(port, path))
    master.wait_log(f"app probe: workers may attach at {path}")
    survivors = set(attach_ready(master, workers, path, "v1", 2))
    balancer = master.balancer()
    baseline = settled_fds(balancer, port, survivors)
    (victim,) = attach_ready(master, workers, path, "v1", 1)

    fresh = [FreshClient(port, scratch) for _ in range(8)]
    kept = [KeptClient(port, once_failed="reconnect", marks=scratch) for _ in range(8)]
    clients = [*fresh, *kept]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: all(victim in client.pids for client in fresh), 30,
                 message="the victim serving every fresh client")
        progressed(clients, 10)
        os.kill(victim, signal.SIGKILL)
        master.wait_log(f"worker attached probe tag v1 (pid {victim}, uid 65534) left: its channel closed")
        marks = [len(client.pids) for client in clients]
        wait_for(lambda: all(len(c.pids) >= mark + 30 for c, mark in zip(clients, marks)), 30,
                 message="30 answers per client after the kill")
    finally:
        for client in clients:
            client.finish()
    # A new connection fails only if the victim had taken its request: one it never
    # read, and one it read from its channel but never touched (nothing read from the
    # socket), went to the others (links.py, balancer/untouched.py). Taken means its app
    # call had begun (the mark), or its bytes were read: then the close is a clean EOF,
    # where an unread request would have made it a reset. With one thread, one at most.
    failed = [failure for client in fresh for failure in client.failures]
    assert len(failed) <= 1 and all(started or "RemoteDisconnected" in what for started, what in failed), failed
    # A kept connection fails once at most: if its request had started, or if the
    # victim held it (its last answer, idle there, not yet parked: `last`, read as it
    # failed, since a connection may come back to the victim between any snapshot
    # and the kill); the client's next connection is served by the others.
    for client in kept:
        assert len(client.failures) <= 1, client.failures
        for last, started, what in client.failures:
            assert started or last == victim, client.failures
    # Every request sent after the marks went to the others. (A client may have had one
    # in flight at its mark, answered by the victim before it died and read after.)
    after = [pid for client, mark in zip(clients, marks) for pid in client.pids[mark + 1:]]
    assert set(after) <= survivors
    wait_for(lambda: fds(balancer) == baseline, 15,
             message=lambda: f"the balancer's fds back to {baseline} (it has {fds(balancer)})")
    assert not client_sockets(balancer)


@pytest.mark.timeout(120)
def test_a_silent_attached_worker_is_dropped_and_exits_once_it_runs_again(baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    # Round robin: of the requests below, every third is given to the stopped worker.
    master = baton(attach_config(port, path, 'timeout = 1\nbalance = "round-robin"'))
    master.wait_log(f"app probe: workers may attach at {path}")
    others = set(attach_ready(master, workers, path, "v1", 2))
    ((silent, worker),) = attach_ready(master, workers, path, "v1", 1).items()
    os.kill(silent, signal.SIGSTOP)
    # Requests go on while it is stopped: what the balancer gave it and it never read
    # comes back when it is dropped, and is served by the others.
    answered = [get_json(port)["pid"] for _ in range(12)]
    assert set(answered) <= others
    master.wait_log(f"worker attached probe tag v1 (pid {silent}, uid 65534) sent no heartbeat for", timeout=15)
    assert {get_json(port)["pid"] for _ in range(12)} <= others
    os.kill(silent, signal.SIGCONT)
    # Its channel was closed while it was stopped: running again, it finds that and exits.
    worker.proc.wait(15)
    assert {get_json(port)["pid"] for _ in range(4)} <= others



# -- the attach socket's protocol, fuzzed ------------------------------------------------

FUZZ_ATTEMPTS = 300
CROWD = 80   # peers at once, past attach_points.PENDING_MAX (64)


def _introduction(rng: random.Random) -> bytes:
    return messages.encode(messages.Introduce(app=rng.choice(["probe", ""]), pid=rng.randrange(1, 1 << 22),
                                              tag=rng.choice(["v1", "", "x" * 64])))


def _garbled(rng: random.Random) -> bytes:
    data = bytearray(_introduction(rng))
    for _ in range(rng.randrange(1, 6)):
        what, at = rng.randrange(4), rng.randrange(len(data))
        if what == 0:
            data[at] = rng.randrange(256)
        elif what == 1:
            del data[at:at + rng.randrange(1, 8)]
        elif what == 2:
            data[at:at] = rng.randbytes(rng.randrange(1, 8))
        else:
            data[at:at + 4] = rng.choice([b'"a"', b"-1", b"1e999", b"[]", b"{}", b"null", b"\0", b"\xff"])
    return bytes(data)


def _fuzz_case(rng: random.Random) -> tuple[bytes | None, int]:
    """What one peer sends (None: nothing) and how many fds of /dev/null go with it."""
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300)), 0
    if kind == 1:
        data = _introduction(rng)
        return data[:rng.randrange(len(data))], 0
    if kind == 2:
        return _garbled(rng), 0
    if kind == 3:   # a good introduction with fds it must not carry
        return _introduction(rng), rng.randrange(1, 4)
    if kind == 4:   # fds that the message even announces
        data = bytearray(_introduction(rng))
        data[0] = count = rng.choice([1, 2, 200])
        return bytes(data), count
    if kind == 5:   # too many fds for one message of ours
        return _introduction(rng), 250
    if kind == 6:   # kinds that are not an introduction
        return messages.encode(rng.choice([
            messages.Ready(pid=1), messages.Heartbeat(requests=1, connections=0, busy=0, oldest_s=None),
            messages.Refusal(reason="no"), messages.Standby(standby=True),
            messages.Welcome(balancers=0, key=1, access=False)])), 0
    if kind == 7:
        return None, 0
    if kind == 8:   # welcomed, and gone without reading the welcome
        return messages.encode(messages.Introduce(app="probe", pid=1, tag="fuzz")), 0
    return b"introduce\0" + b"x" * (200 * 1024), 0   # huge: past one message's size


def _converse(path: Path, data: bytes | None, fd_count: int) -> None:
    """One peer: connect, send `data` (with fds), then read until the master ends it; a
    WELCOME (a mutation that is still a valid introduction) is left unread, and we go."""
    nulls = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(fd_count)]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
            peer.settimeout(20)
            peer.connect(str(path))
            if data is not None:
                try:
                    if nulls:
                        peer.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", nulls))])
                    else:
                        peer.send(data)
                except (BrokenPipeError, ConnectionResetError):
                    return
            if data is None:   # nothing at all, then close
                return
            while True:
                try:
                    answer, ancillary, _, _ = peer.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
                except ConnectionResetError:
                    return
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for fd in array.array("i", payload[:len(payload) - len(payload) % 4]):
                            os.close(fd)
                if not answer or answer[1:].startswith(b"welcome\0"):
                    return
    finally:
        for fd in nulls:
            os.close(fd)


@pytest.mark.timeout(180)
def test_the_attach_socket_survives_a_fuzz_and_leaks_nothing(baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    # root may attach too (it is who the fuzz connects as), and one worker of the app's
    # own keeps serving throughout.
    master = baton(probe_config(port, f"""
        workers = 1
        attach = "unix:{path}"
        attach_group = "nogroup"
        attach_allow = ["nobody", "root"]
    """))
    (own,) = master.wait_workers(1)
    master.wait_log(f"app probe: workers may attach at {path} (mode 0660, group nogroup; allowed: nobody, root)")
    baseline = fds(master.pid)

    rng = random.Random(16)
    for _ in range(FUZZ_ATTEMPTS):
        _converse(path, *_fuzz_case(rng))
    assert get_json(port)["pid"] == own

    crowd = []
    try:
        for _ in range(CROWD):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            crowd.append(peer)
            peer.connect(str(path))
        # Past the 64 that may wait, each is refused at once, and told why.
        master.wait_log("64 peers are introducing themselves already", count=CROWD - 64)
        # The 64 are dropped once their time to introduce themselves is up.
        master.wait_log("it did not introduce itself within 5 s", count=64, timeout=15)
    finally:
        for peer in crowd:
            peer.close()

    wait_for(lambda: fds(master.pid) == baseline, 15,
             message=lambda: f"the master's fds back to {baseline} (it has {fds(master.pid)})")
    log = master.log()
    assert master.proc.poll() is None
    assert "dropped a peer on the attach socket" in log
    assert "sent a malformed introduction" in log and "instead of an introduction" in log
    assert "worker attached probe tag fuzz (pid " in log and "left: its channel closed" in log
    assert "Traceback" not in log and "internal error" not in log

    worker = workers(path, "v1")
    master.wait_log(f"worker attached probe tag v1 (pid {worker.pid}, uid 65534) ready, serving", timeout=20)
    wait_for(lambda: get_json(port)["pid"] == worker.pid, message="the attached worker serving")


@pytest.mark.timeout(120)
def test_a_welcomed_peer_that_then_speaks_garbage_is_dropped_and_leaks_nothing(baton, port, attach_dir):
    """After the welcome the peer is a worker, on channels any worker has: what it then
    sends is judged as a forked worker's is. Garbage on its balancer channel (once it
    serves) loses it that link; garbage on its master channel, the master's trust."""
    path = attach_dir / "probe.sock"
    master = baton(probe_config(port, f"""
        workers = 1
        attach = "unix:{path}"
        attach_allow = ["root"]
    """))
    (own,) = master.wait_workers(1)
    master.wait_log(f"app probe: workers may attach at {path}")
    balancer = master.balancer()
    baseline = (fds(master.pid), fds(balancer))
    rng = random.Random(7)
    for round_ in range(5):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
            peer.settimeout(20)
            peer.connect(str(path))
            peer.send(messages.encode(messages.Introduce(app="probe", pid=1, tag=f"garbage{round_}")))
            data, ancillary, _, _ = peer.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            received = [fd for level, kind, payload in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                        for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
            try:
                welcome = messages.decode(data)
                assert type(welcome) is messages.Welcome and len(received) == welcome.fd_count()
                with socket.socket(fileno=os.dup(received[-1])) as to_balancer:
                    peer.send(messages.encode(messages.Ready(pid=1)))
                    master.wait_log(f"worker attached probe tag garbage{round_} (pid ", count=1)
                    wait_for(lambda: f"tag garbage{round_} (pid {os.getpid()}, uid 0) ready, serving" in master.log(),
                             message=lambda: f"it serving; log:\n{master.log()[-3000:]}")
                    to_balancer.send(rng.randbytes(rng.randrange(1, 200)))
                    peer.send(rng.randbytes(rng.randrange(1, 200)))
                master.wait_log(f"tag garbage{round_} (pid {os.getpid()}, uid 0) left: its channel closed")
            finally:
                for fd in received:
                    os.close(fd)
        assert get_json(port)["pid"] == own
    wait_for(lambda: (fds(master.pid), fds(balancer)) == baseline, 15,
             message=lambda: f"fds back to {baseline} (now {(fds(master.pid), fds(balancer))})")
    assert master.proc.poll() is None and master.balancer() == balancer
    assert "Traceback" not in master.log() and "internal error" not in master.log()
