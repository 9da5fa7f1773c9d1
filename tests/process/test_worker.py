"""The worker's end of its balancer channel: what it acknowledges and reports, and when."""
import logging
import os
import socket
from types import SimpleNamespace

import pytest
from conftest import REPO, answers, http_request, wait_for

from supervisor.ipc import channel, messages
from supervisor.ipc.messages import REPORT_MAX_IDS, Message, Report
from supervisor.system.loop import Loop
from supervisor.worker.process import BalancerLink


class RecordingServer:
    """Stands in for the worker's http.server.Server: notes which acknowledgements the
    balancer had received by the time each connection was added, and keeps its close
    callback. One of its two threads is busy."""

    def __init__(self, balancer_end: socket.socket):
        self.balancer_end = balancer_end
        self.settings = SimpleNamespace(threads=2)
        self.busy_threads = 1
        self.acked_before_added: dict[int, bool] = {}
        self.on_close: dict[int, object] = {}
        self.heard: list[Message] = []
        self.free_watchers = []
        self.serve_inline = True   # False: each stays claimed, waiting for its first request

    def watch_free(self, callback):
        self.free_watchers.append(callback)

    def add_connection(self, sock, peer, listener_name="", initial_bytes=b"", on_close=None,
                       proxy_protocol=False, on_park=None, on_started=None):
        self.heard.extend(drain(self.balancer_end))
        conn_id = int(sock.recv(16))  # the test wrote each connection's id into it
        self.acked_before_added[conn_id] = any(conn_id in m.acked for m in self.heard)
        self.on_close[conn_id] = on_close
        sock.close()
        if on_started is not None and self.serve_inline:
            on_started()   # as if its request ran inline

    def stop(self, graceful):
        self.stopped = graceful


def drain(sock: socket.socket) -> list[Message]:
    received = []
    while True:
        try:
            message, fds = channel.receive(sock)
        except BlockingIOError:
            return received
        assert not fds
        received.append(message)


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture
def pair():
    worker_end, balancer_end = channel.pair()
    balancer_end.setblocking(False)
    yield worker_end, balancer_end
    worker_end.close()
    balancer_end.close()


def send_connection(balancer_end: socket.socket, conn_id: int) -> None:
    ours, theirs = socket.socketpair()
    ours.sendall(str(conn_id).encode())
    channel.send_encoded(balancer_end, messages.encode_conn(conn_id, ("192.0.2.1", 1000 + conn_id), "web"),
                         [theirs.fileno()])
    ours.close()
    theirs.close()  # the channel holds its own reference until the worker takes it


@pytest.fixture
def three_taken(pair, loop):
    """A link that just read three connections (ids 1, 2, 3) in one wakeup."""
    worker_end, balancer_end = pair
    server = RecordingServer(balancer_end)
    link = BalancerLink(worker_end, server, logging.getLogger("test"), loop)
    for conn_id in (1, 2, 3):
        send_connection(balancer_end, conn_id)
    link.on_readable()
    return link, server, balancer_end


def test_connections_are_acknowledged_in_the_iterations_report_not_one_by_one(three_taken):
    link, server, balancer_end = three_taken
    # Served before any acknowledgement: the balancer keeps its copies meanwhile (and
    # reads back what a dead worker never read; see balancer/links.py).
    assert server.acked_before_added == {1: False, 2: False, 3: False}
    assert server.heard == [Report(busy=0, acked=(), closed=(), threads=2)]   # its thread count
    link.report()  # what the loop's after-events step calls
    assert drain(balancer_end) == [Report(busy=1, acked=(1, 2, 3), closed=(), threads=2)]


def test_closes_wait_for_the_end_of_the_loop_iteration_and_go_with_the_acknowledgements(three_taken):
    link, server, balancer_end = three_taken
    server.on_close[3]()
    server.on_close[1]()
    assert drain(balancer_end) == []
    link.report()
    assert drain(balancer_end) == [Report(busy=1, acked=(1, 2, 3), closed=(3, 1), threads=2)]
    link.report()
    assert drain(balancer_end) == []  # nothing new, nothing sent
    server.on_close[2]()
    link.report()
    assert drain(balancer_end) == [Report(busy=1, acked=(), closed=(2,), threads=2)]


def test_a_connection_handed_back_goes_before_the_news_that_it_ended(pair, loop):
    """The server ends a connection it hands back (on_close) just before the hand-back
    itself: a REPORT saying it ended must not go first, or the balancer drops its record
    and takes the hand-back for a connection it never gave."""
    worker_end, balancer_end = pair
    server = RecordingServer(balancer_end)
    server.serve_inline = False
    link = BalancerLink(worker_end, server, logging.getLogger("test"), loop)
    send_connection(balancer_end, 1)
    link.on_readable()
    link.report()   # not acknowledged while no request of it started: nothing to say
    assert drain(balancer_end) == []
    ours, theirs = socket.socketpair()
    server.on_close[1]()   # what the server's hand-back does first ...
    link.hand_back(theirs, b"", ("192.0.2.1", 1001), "web")   # ... then this
    ours.close()
    received = []
    while True:
        try:
            message, fds = channel.receive(balancer_end)
        except BlockingIOError:
            break
        for fd in fds:
            os.close(fd)
        received.append(type(message).__name__)
    link.report()
    assert received == ["HandBack"]
    assert drain(balancer_end) == [Report(busy=1, acked=(1,), closed=(1,), threads=2)]


def test_a_connection_is_acknowledged_only_once_its_first_request_starts(pair, loop):
    """Until then the balancer keeps its copy, so should we die it can pass the
    connection to another worker (its request is still whole in the socket: see
    balancer/untouched.py); the claim counts on the balancer's side meanwhile."""
    worker_end, balancer_end = pair
    server = RecordingServer(balancer_end)
    server.serve_inline = False
    link = BalancerLink(worker_end, server, logging.getLogger("test"), loop)
    send_connection(balancer_end, 1)
    link.on_readable()
    link.report()
    assert drain(balancer_end) == []
    link._unclaim(1)   # what the server's on_started does
    link.report()
    assert drain(balancer_end) == [Report(busy=1, acked=(1,), closed=(), threads=2)]


def test_a_freed_thread_is_reported_only_when_the_balancer_was_told_none_was_free(three_taken):
    link, server, balancer_end = three_taken
    link.report()                          # the three acknowledged
    drain(balancer_end)
    server.busy_threads = 0
    for watcher in server.free_watchers:   # a pool thread finished
        watcher()
    link.report()                          # the iteration's end
    assert drain(balancer_end) == []       # it was told we had one free already
    server.busy_threads = 2
    link.report(always=True)               # (a report that said both were busy)
    drain(balancer_end)
    server.busy_threads = 1
    for watcher in server.free_watchers:
        watcher()
    assert drain(balancer_end) == []       # said once, at the iteration's end
    link.report()
    assert drain(balancer_end) == [Report(busy=1, acked=(), closed=(), threads=2)]
    link.report()
    assert drain(balancer_end) == []


def test_more_ids_than_one_report_holds_go_in_several(pair, loop):
    worker_end, balancer_end = pair
    link = BalancerLink(worker_end, RecordingServer(balancer_end), logging.getLogger("test"), loop)
    drain(balancer_end)   # its thread count
    link.acked.extend(range(5))
    link.closed.extend(range(100, 100 + REPORT_MAX_IDS))
    link.report()
    first, second = drain(balancer_end)
    assert first.acked == tuple(range(5)) and len(first.acked) + len(first.closed) == REPORT_MAX_IDS
    assert first.closed + second.closed == tuple(range(100, 100 + REPORT_MAX_IDS))
    assert second.acked == ()
    assert not link.acked and not link.closed


def test_a_connection_sent_without_its_fd_is_neither_served_nor_acknowledged(pair, loop):
    worker_end, balancer_end = pair
    server = RecordingServer(balancer_end)
    link = BalancerLink(worker_end, server, logging.getLogger("test"), loop)
    drain(balancer_end)   # its thread count
    balancer_end.send(messages.encode_conn(9, ("192.0.2.1", 1), "web"))  # announces an fd it lacks
    link.on_readable()
    assert server.acked_before_added == {} and drain(balancer_end) == []


def test_a_closed_balancer_channel_leaves_the_loop_and_stops_the_worker(pair, loop):
    """The balancer's end closes only when it dropped this worker (the master keeps a
    copy for a restarted balancer): its channel is unregistered, so the loop does not
    spin on a hung-up fd, and the worker stops gracefully, to be replaced."""
    worker_end, balancer_end = pair
    server = RecordingServer(balancer_end)
    link = BalancerLink(worker_end, server, logging.getLogger("test"), loop)
    loop.register(worker_end, link.on_readable)
    balancer_end.close()
    loop.run_once(max_wait_s=5)
    assert not loop.registered(worker_end)
    assert server.stopped is True


def test_a_worker_logs_the_response_headers_and_environ_its_access_format_names(baton, port, tmp_path):
    """The worker hands its compiled access format to its server, which then keeps
    what the format shows: a real master, worker and request."""
    access = tmp_path / "access.log"
    baton(f"""
        [master]
        access_log = "{access}"
        access_log_format = '%(s)s %({{content-type}}o)s %({{PATH_INFO}}e)s %({{HTTP_X_TRACE}}e)s'

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.probe]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        workers = 1
        chdir = "{REPO}"
    """)
    wait_for(lambda: answers(port), message="the app answering")
    assert http_request(port, "/traced", headers={"X-Trace": "t-1"})[0] == 200
    wait_for(lambda: "/traced" in access.read_text(), message="the access line")
    lines = [line.split(": ", 1)[1] for line in access.read_text().splitlines() if "/traced" in line]
    assert lines == ["200 application/json /traced t-1"]   # after the master's "probe[pid]: " tag
