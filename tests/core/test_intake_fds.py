"""The balancer's intake out of fds, in this process on a fake clock: an accept that
fails for want of fds sheds the oldest peeking connections (503), rests the listener
for ACCEPT_PAUSE_S instead of spinning on it, says so once per interval, and accepts
again by itself."""
from __future__ import annotations

import os
import resource
import socket

from test_balancer_shell import errors

from supervisor.balancer import intake


class OutOfFds:
    """This process at its fd limit: every free fd number below it taken."""

    def __enter__(self):
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, self.limits[1]))
        self.fillers = []
        try:
            while True:
                self.fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        for fd in self.fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


def test_out_of_fds_the_oldest_peeking_connections_are_shed_and_the_listener_rests(harnesses, caplog):
    harness = harnesses(apps=("a", "b"), hosts={"a": ("a.test",), "b": ("b.test",)})
    take = harness.balancer.intake
    silent = [harness.connect() for _ in range(5)]
    harness.turn()
    assert len(take.peeking) == 5
    waiting = [socket.create_connection(("127.0.0.1", harness.port), timeout=5) for _ in range(2)]
    try:
        with OutOfFds():
            harness.turn()
            assert take.shed == 5 and not take.peeking
            assert not harness.balancer.loop.registered(harness.listener)   # resting: no spin
            for client in silent:
                assert client.recv(100).startswith(b"HTTP/1.1 503 ")
            harness.turn(max_wait_s=0.01)   # nothing happens while it rests
            assert take.accepted == 5
        harness.clock.now += intake.ACCEPT_PAUSE_S
        harness.turn(max_wait_s=0.01)   # the timer puts it back
        harness.turn()
        assert take.accepted == 7 and len(take.peeking) == 2
        # Once per interval: a second failure inside it adds no line.
        waiting.append(socket.create_connection(("127.0.0.1", harness.port), timeout=5))
        with OutOfFds():
            harness.turn()
            assert take.shed == 7
        lines = [line for line in errors(caplog) if "accept on web failed" in line]
        assert len(lines) == 1 and "5 connections shed" in lines[0]
    finally:
        for client in waiting:
            client.close()


# -- a connection as a bare fd -------------------------------------------------------


def test_a_bare_fd_connection_makes_its_socket_on_demand_and_closes_once():
    ours, theirs = socket.socketpair()
    try:
        fd = ours.detach()
        pending = intake.Pending(fd, ("127.0.0.1", 1), "web", "a", family=socket.AF_UNIX)
        assert pending.fd == fd
        assert pending.sock.fileno() == fd and pending.sock.family == socket.AF_UNIX
        pending.close()
        pending.close()   # again: nothing (the fd number may be someone else's by now)
        assert pending.fd == -1
        try:
            pending.sock
        except OSError:
            pass
        else:
            raise AssertionError("a closed connection made a socket")
        assert theirs.recv(1) == b""   # the peer saw the close
    finally:
        theirs.close()


def test_a_bare_fd_connection_detached_is_the_callers_and_never_closed_by_it():
    ours, theirs = socket.socketpair()
    try:
        pending = intake.Pending(ours.detach(), ("127.0.0.1", 1), "web", "a", family=socket.AF_UNIX)
        fd = pending.detach()
        pending.close()
        os.fstat(fd)   # still open: it is the caller's now
        os.close(fd)
    finally:
        theirs.close()
