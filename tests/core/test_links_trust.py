"""What the balancer believes of a worker (links.py), in this process on real sockets:
a worker hands back only what it was given, to its own app, with the address the
balancer recorded; one that lies loses its link, and no connection is lost with it;
a connection a worker could not take (no fd reached it) goes to another worker."""
from __future__ import annotations

import os
import socket

from test_balancer_shell import Harness, errors, open_fds

from supervisor.ipc import channel
from supervisor.ipc.messages import Conn, HandBack, Heartbeat, Report, encode

FORGED = ("203.0.113.9", 4444)


def take(harness: Harness, key: int) -> tuple[Conn, socket.socket]:
    """The CONN worker `key` got, with its socket."""
    message, fds = channel.receive(harness.workers[key])
    assert type(message) is Conn
    return message, socket.socket(fileno=fds[0])


def given(harness: Harness) -> tuple[int, Conn, socket.socket, socket.socket]:
    """A client connects; (the worker that got it, its CONN, its socket, the client)."""
    client = harness.connect()
    harness.turn()
    for key, end in harness.workers.items():
        end.setblocking(False)
        try:
            message, fds = channel.receive(end)
        except BlockingIOError:
            continue
        finally:
            end.settimeout(5)
        assert type(message) is Conn
        return key, message, socket.socket(fileno=fds[0]), client
    raise AssertionError("no worker got the connection")


def dropped(harness: Harness, key: int) -> bool:
    """The balancer shut worker `key`'s link down (what the worker hears: end of channel)."""
    try:
        channel.receive(harness.workers[key])
    except channel.ChannelClosed:
        return True
    return False


def test_a_hand_back_of_a_given_connection_keeps_the_recorded_peer_and_goes_to_its_app(harnesses):
    harness = harnesses(workers=(1, 2))
    key, conn, sock, client = given(harness)
    assert conn.peer == client.getsockname()
    channel.send(harness.workers[key], Report(busy=0, acked=(conn.id,), closed=()))
    with sock:
        channel.send(harness.workers[key], HandBack(peer=FORGED, listener="other", data=b"GET"), [sock.fileno()])
    harness.turn()
    again, sock2 = take(harness, 3 - key)
    with sock2:
        assert (again.peer, again.listener, again.data) == (client.getsockname(), "web", b"GET")
        client.sendall(b"x")
        assert sock2.recv(1) == b"x"   # the very connection
    # The news that it ended at the first worker follows, and counts for nothing more.
    channel.send(harness.workers[key], Report(busy=0, acked=(), closed=(conn.id,)))
    harness.turn()
    assert harness.balancer.core.figures()["a"].connections == 1


def test_a_hand_back_of_a_connection_never_acknowledged_is_known_by_the_copy_the_balancer_holds(harnesses):
    harness = harnesses(workers=(1, 2))
    key, conn, sock, client = given(harness)
    with sock:   # no REPORT first: the balancer still holds its copy, and no record of its identity yet
        channel.send(harness.workers[key], HandBack(peer=FORGED, listener="other", data=b""), [sock.fileno()])
    harness.turn()
    again, sock2 = take(harness, 3 - key)
    with sock2:
        assert (again.peer, again.listener) == (client.getsockname(), "web")
        client.sendall(b"y")
        assert sock2.recv(1) == b"y"


def test_a_connection_acknowledged_and_closed_in_one_report_costs_no_fstat(harnesses, monkeypatch):
    """A connection per request never comes back, so its identity is never asked of
    the kernel; one acknowledged and kept is (it may be handed back later)."""
    asked = []
    monkeypatch.setattr(os, "fstat", lambda fd, real=os.fstat: asked.append(fd) or real(fd))
    harness = harnesses(workers=(1,))
    _, conn, sock, client = given(harness)
    with sock, client:
        channel.send(harness.workers[1], Report(busy=0, acked=(conn.id,), closed=(conn.id,)))
        harness.turn()
    assert asked == []
    _, conn, sock, client = given(harness)
    with sock, client:
        channel.send(harness.workers[1], Report(busy=1, acked=(conn.id,), closed=()))
        harness.turn()
        assert len(asked) == 1


def test_a_socket_the_worker_made_is_refused_its_link_dropped_and_nothing_it_held_is_lost(harnesses, caplog):
    harness = harnesses(workers=(1, 2))
    key, conn, sock, client = given(harness)   # sent, never acknowledged
    sock.close()
    before = open_fds()
    made = socket.create_connection(("127.0.0.1", harness.port))   # lands in the backlog, on "web"
    with made:
        channel.send(harness.workers[key], HandBack(peer=FORGED, listener="web", data=b""), [made.fileno()])
    harness.turn()
    assert dropped(harness, key)
    assert any(f"worker {key} handed back" in line and "dropping its link" in line for line in errors(caplog))
    # The connection it had not acknowledged went to the other worker; so does the one
    # it made (it was in the listener's backlog: a client like any other).
    other = 3 - key
    peers = set()
    for _ in range(2):
        message, taken = take(harness, other)
        taken.close()
        peers.add(message.peer)
    assert client.getsockname() in peers and FORGED not in peers
    assert open_fds() <= before + 1   # our copy of the new connection, until acknowledged


def test_a_hand_back_naming_another_app_goes_to_its_own_app_and_costs_its_link(harnesses, caplog):
    harness = harnesses(workers=(1, 2))
    key, conn, sock, client = given(harness)
    channel.send(harness.workers[key], Report(busy=0, acked=(conn.id,), closed=()))
    with sock:
        channel.send(harness.workers[key], HandBack(peer=FORGED, listener="web", data=b"", app="b"),
                     [sock.fileno()])
    harness.turn()
    assert dropped(harness, key)
    again, sock2 = take(harness, 3 - key)
    sock2.close()
    assert again.peer == client.getsockname()
    assert any("naming app 'b'" in line for line in errors(caplog))


def test_a_connection_the_worker_accepted_itself_goes_to_its_app_with_the_kernels_peer(harnesses):
    # As on a `share` listener, which the balancer never sees.
    harness = harnesses(workers=(1, 2))
    key, conn, sock, client = given(harness)
    sock.close()
    channel.send(harness.workers[key], Report(busy=0, acked=(conn.id,), closed=()))
    with socket.socket() as shared:
        shared.bind(("127.0.0.1", 0))
        shared.listen(1)
        with socket.create_connection(shared.getsockname()) as outside:
            accepted, _ = shared.accept()
            with accepted:
                channel.send(harness.workers[key], HandBack(peer=FORGED, listener="shared", data=b""),
                             [accepted.fileno()])
            harness.turn()
            again, sock2 = take(harness, 3 - key)
            sock2.close()
            assert (again.peer, again.listener) == (outside.getsockname(), "shared")
    harness.workers[key].setblocking(False)
    try:   # its link stands: nothing, not even an end of channel, came for it
        channel.receive(harness.workers[key])
        raise AssertionError("the worker heard from the balancer")
    except BlockingIOError:
        pass


def test_a_hand_back_of_a_pipe_or_a_listening_socket_costs_the_link_and_is_closed(harnesses):
    for make in ("pipe", "listening"):
        harness = harnesses(workers=(1,))
        before = open_fds()
        if make == "pipe":
            r, w = os.pipe()
            fd = r
        else:
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            fd = lsock.fileno()
        channel.send(harness.workers[1], HandBack(peer=FORGED, listener="x", data=b""), [fd])
        harness.turn()
        assert dropped(harness, 1)
        if make == "pipe":
            for each in (r, w):
                os.close(each)
        else:
            lsock.close()
        assert open_fds() == before - 1   # and our end of the dropped link is closed


def test_garbage_or_a_master_message_costs_the_link(harnesses):
    for data in (b"\x00report\x00{\"busy\":\"x\"}", encode(Heartbeat(1, 1, 1, None))):
        harness = harnesses(workers=(1,))
        harness.workers[1].send(data)
        harness.turn()
        assert dropped(harness, 1)
        assert harness.balancer.core.worker(1) is None


def test_a_connection_a_worker_refused_goes_to_another_worker(harnesses):
    harness = harnesses(workers=(1, 2))
    key, conn, sock, client = given(harness)
    sock.close()   # as if its fd never arrived
    channel.send(harness.workers[key], Report(busy=0, acked=(), closed=(), refused=(conn.id,)))
    harness.turn()
    again, sock2 = take(harness, 3 - key)
    with sock2:
        assert again.peer == client.getsockname()
        client.sendall(b"y")
        assert sock2.recv(1) == b"y"


def test_a_connection_the_only_worker_refused_is_answered_503(harnesses):
    harness = harnesses(workers=(1,))
    key, conn, sock, client = given(harness)
    sock.close()
    channel.send(harness.workers[1], Report(busy=0, acked=(), closed=(), refused=(conn.id, 999)))
    harness.turn()
    client.settimeout(5)
    assert client.recv(100).startswith(b"HTTP/1.1 503 ")
    assert harness.balancer.core.worker_refused_503 == 1
