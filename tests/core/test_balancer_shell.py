"""The balancer's process shell in this process, on a fake clock: real sockets and
channels, the loop driven one iteration at a time. The master's messages (a malformed
one is logged and its fds closed), the accept-last rule, the health server's deadline."""
from __future__ import annotations

import logging
import os
import select
import socket

import pytest

from supervisor.balancer.process import Balancer
from supervisor.ipc import channel
from supervisor.ipc.messages import Attach, Conn, Heartbeat, Report, Routes, encode
from supervisor.system.log import Logs

LOGGER = "tests.balancer_shell"


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def payload(apps=("a",), hosts=None, balance="least-connections"):
    hosts = hosts or {}
    return {"listeners": {"web": tuple(apps)}, "proxy": (),
            "apps": {app: {"hosts": tuple(hosts.get(app, ())), "default": False, "balance": balance}
                     for app in apps}}


def listening():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Harness:
    """A Balancer with one TCP listener, the master's channel end, and workers' ends.
    Each worker has first reported `threads` threads (None: it has not reported, so the
    balancer counts one)."""

    def __init__(self, workers=(1,), health=False, threads=64, **routes):
        self.clock = FakeClock()
        self.listener = listening()
        self.port = self.listener.getsockname()[1]
        self.master, balancer_end = channel.pair()
        self.workers = {}
        links = {}
        for key in workers:
            ours, theirs = channel.pair()
            ours.settimeout(5)   # a CONN that never comes fails the test, never hangs it
            self.workers[key] = ours
            links[key] = ("a", theirs)
        self.health = listening() if health else None
        self.health_port = self.health.getsockname()[1] if health else None
        logs = Logs(logging.getLogger(LOGGER), None, ())
        self.balancer = Balancer(payload(**routes), {"web": self.listener}, balancer_end, links, logs,
                                 clock=self.clock, health_socket=self.health)
        self.balancer_end = balancer_end
        self.clients = []
        if threads is not None:
            for end in self.workers.values():
                channel.send(end, Report(busy=0, acked=(), closed=(), threads=threads))
            self.turn()

    def turn(self, max_wait_s=0.5):
        self.balancer.loop.run_once(max_wait_s=max_wait_s)

    def connect(self):
        client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.clients.append(client)
        return client

    def conn_at(self, key):
        """The CONN the worker `key` got (its fd closed: we only want the message)."""
        message, fds = channel.receive(self.workers[key])
        for fd in fds:
            os.close(fd)
        assert type(message) is Conn
        return message

    def conn_ids_at(self, key):
        """The ids of the CONNs worker `key` got and has not read (the balancer's
        sends are done by the time its iteration returns)."""
        ids = []
        self.workers[key].setblocking(False)
        try:
            while True:
                ids.append(self.conn_at(key).id)
        except BlockingIOError:
            return ids
        finally:
            self.workers[key].settimeout(5)

    def close(self):
        self.balancer.close()
        for sock in (self.master, self.balancer_end, *self.workers.values(), *self.clients):
            sock.close()


def errors(caplog):
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


# -- messages from the master ------------------------------------------------------


def test_routes_with_a_bad_host_pattern_are_logged_their_fds_closed_and_the_old_routes_kept(harnesses, caplog):
    harness = harnesses()
    extra = listening()
    before = open_fds()
    routes = Routes(routes=payload(apps=("a", "b"), hosts={"a": ["a.test"], "b": ["bad host!"]}), open=("web",))
    channel.send(harness.master, routes, [extra.fileno()])
    harness.turn()
    assert open_fds() == before   # the balancer's copy of `extra` is closed
    assert any("dropped a routes message" in line and "bad host!" in line for line in errors(caplog))
    harness.connect()
    harness.turn()
    assert harness.conn_at(1).listener == "web"   # still the one-app route, no peeking
    extra.close()


def test_routes_whose_fds_do_not_match_their_names_are_logged_and_the_fds_closed(harnesses, caplog):
    harness = harnesses()
    extras = [listening(), listening()]
    before = open_fds()
    data = encode(Routes(routes=payload(), open=("web",)))
    channel.send_encoded(harness.master, bytes((2,)) + data[1:], [sock.fileno() for sock in extras])
    harness.turn()
    assert open_fds() == before
    assert any("dropped a bad message" in line and "routes" in line for line in errors(caplog))
    for sock in extras:
        sock.close()


def test_an_attach_whose_fd_is_not_a_socket_is_logged_and_closed(harnesses, caplog):
    harness = harnesses()
    read_end, write_end = os.pipe()
    before = open_fds()
    channel.send(harness.master, Attach(key=7, app="a"), [read_end])
    harness.turn()
    assert open_fds() == before
    assert any("dropped a attach message" in line and "not a socket" in line for line in errors(caplog))
    harness.connect()
    harness.turn()
    harness.conn_at(1)   # still balancing
    os.close(read_end)
    os.close(write_end)


def test_an_attach_for_a_worker_attached_already_is_refused(harnesses, caplog):
    harness = harnesses()
    ours, theirs = channel.pair()
    before = open_fds()
    channel.send(harness.master, Attach(key=1, app="a"), [theirs.fileno()])
    harness.turn()
    assert open_fds() == before
    assert any("worker 1 is attached already" in line for line in errors(caplog))
    harness.connect()
    harness.turn()
    harness.conn_at(1)   # the first link is untouched
    ours.close()
    theirs.close()


def test_a_listener_fd_that_is_not_listening_is_refused(harnesses, caplog):
    harness = harnesses()
    unbound = socket.socket()
    before = open_fds()
    channel.send(harness.master, Routes(routes=payload(), open=("web",)), [unbound.fileno()])
    harness.turn()
    assert open_fds() == before
    assert any("not a listening stream socket" in line for line in errors(caplog))
    harness.connect()
    harness.turn()
    harness.conn_at(1)   # the old listener still serves
    unbound.close()


def test_a_message_the_balancer_does_not_take_is_logged(harnesses, caplog):
    harness = harnesses()
    channel.send(harness.master, Heartbeat(requests=1, connections=0, busy=0, oldest_s=None))
    harness.turn()
    assert any("dropped a heartbeat message" in line for line in errors(caplog))


def test_the_master_going_away_ends_the_run(harnesses):
    harness = harnesses()
    harness.master.close()
    harness.balancer.run()   # returns: nothing else would stop it


# -- the loop's order ------------------------------------------------------------------


def test_reports_of_the_same_wakeup_count_before_a_new_connection_picks_a_worker(harnesses):
    harness = harnesses(workers=(1, 2))
    for _ in range(3):
        harness.connect()
    harness.turn()
    sent = {key: harness.conn_ids_at(key) for key in (1, 2)}
    busier = max(sent, key=lambda key: len(sent[key]))
    other = 3 - busier
    assert (len(sent[busier]), len(sent[other])) == (2, 1)
    # In one wakeup: a new connection arrives, then the busier worker reports both its
    # connections closed. Counted first although it came second, the report makes that
    # worker the idler one.
    ids = tuple(sent[busier])
    harness.connect()
    assert select.select([harness.listener], [], [], 5)[0]   # queued for accept before the report
    channel.send(harness.workers[busier], Report(busy=0, acked=ids, closed=ids))
    harness.turn()
    assert (len(harness.conn_ids_at(busier)), len(harness.conn_ids_at(other))) == (1, 0)


def saturate(harness, key=1):
    """Connect until the balancer queues one (its worker took all it may ahead); the
    ids the worker was sent."""
    sent = []
    while harness.balancer.core.queued == 0:
        harness.connect()
        assert select.select([harness.listener], [], [], 5)[0]
        harness.turn()
        sent.extend(harness.conn_ids_at(key))
        assert len(sent) <= 64, "the balancer never queued a connection"
    return sent


def backlog(harness, count):
    """`count` more clients whose connections wait in the listener's backlog."""
    for _ in range(count):
        harness.connect()
    assert select.select([harness.listener], [], [], 5)[0]


def test_while_an_app_has_queued_connections_new_ones_wait_in_the_backlog_until_the_queue_empties(harnesses):
    harness = harnesses(threads=1)
    sent = saturate(harness)
    accepted = harness.balancer.intake.accepted
    backlog(harness, 3)
    harness.turn()
    harness.turn(max_wait_s=0.05)
    assert harness.balancer.intake.accepted == accepted   # not woken for them: they wait in the kernel
    # The worker finishes everything it held: the queued one goes out, the queue is
    # empty, and the three are accepted in that same wakeup.
    ids = tuple(sent)
    channel.send(harness.workers[1], Report(busy=0, acked=ids, closed=ids))
    harness.turn()
    assert harness.balancer.intake.accepted == accepted + 3
    # One thread, and as many ahead as it just closed; the rest wait their turn.
    assert len(harness.conn_ids_at(1)) == 1 + len(ids)
    assert harness.balancer.core.queued == 4 - (1 + len(ids))


def test_a_listener_whose_app_queue_never_empties_is_still_accepted_every_defer_interval(harnesses):
    from supervisor.balancer.intake import ACCEPT_DEFER_S
    harness = harnesses(threads=1)
    saturate(harness)   # the worker makes no progress from here on
    queued, accepted = harness.balancer.core.queued, harness.balancer.intake.accepted
    backlog(harness, 3)
    harness.turn(max_wait_s=0.05)
    assert harness.balancer.intake.accepted == accepted
    harness.clock.now += ACCEPT_DEFER_S
    harness.turn()
    # Taken into the queue, where its limit and timeout apply.
    assert harness.balancer.intake.accepted == accepted + 3
    assert harness.balancer.core.queued == queued + 3


# -- the health server -------------------------------------------------------------------


def test_a_health_client_that_sends_no_whole_head_is_closed_at_its_deadline(harnesses):
    harness = harnesses(health=True)
    slow = socket.create_connection(("127.0.0.1", harness.health_port), timeout=5)
    harness.clients.append(slow)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    harness.turn()   # accepted
    harness.turn()   # the half head read
    harness.clock.now += 9.9
    harness.turn(max_wait_s=0)
    slow.setblocking(False)
    with pytest.raises(BlockingIOError):
        slow.recv(1)   # still open, no answer
    harness.clock.now += 0.1
    harness.turn(max_wait_s=0)
    slow.setblocking(True)
    assert slow.recv(1) == b""


def test_a_health_check_is_answered(harnesses):
    harness = harnesses(health=True)
    client = socket.create_connection(("127.0.0.1", harness.health_port), timeout=5)
    harness.clients.append(client)
    client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    response = b""
    while not response.endswith(b"\n") or b"baton_accepted_total" not in response:
        harness.turn()
        client.setblocking(False)
        try:
            response += client.recv(65536)
        except BlockingIOError:
            pass
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert b'baton_connections{app="a"} 0' in response


def test_health_clients_accepted_in_one_wakeup_are_each_answered_on_their_own_socket(harnesses):
    harness = harnesses(health=True)
    first, second = (socket.create_connection(("127.0.0.1", harness.health_port), timeout=5) for _ in range(2))
    harness.clients += [first, second]
    harness.turn()   # both accepted in one batch
    first.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    harness.turn()
    first.setblocking(False)
    assert first.recv(65536).startswith(b"HTTP/1.1 200 OK")
    second.setblocking(False)
    with pytest.raises(BlockingIOError):
        second.recv(1)   # it asked nothing yet
