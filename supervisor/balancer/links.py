"""The balancer's worker links: one SOCK_SEQPACKET channel end per worker, on the loop.

Out goes a CONN per connection (the fd, its id, peer, listener, unparsed bytes); in
come the worker's REPORTs (connections it now owns, connections that ended, busy
threads) and HANDBACKs (an idle keep-alive connection from a retiring worker). Every
decision is the dispatch core's: a link only moves messages and fds between the
channel and `Dispatcher`, and tells it when the channel closed.

Promises:

* The balancer's copy of a connection is closed when the worker's REPORT acknowledges
  it, never before: a worker that dies first has its connections dispatched again.
* A worker that hands a connection back retires: it gets no more connections.
* After a master upgrade (`upstream` set) handed-back connections go to the new
  master's balancer, naming their app; if that fails they are dispatched here.
* At most READS_PER_WAKEUP messages are read from one link per wakeup, so a chatty
  worker cannot starve the others (the level-triggered loop comes back for the rest).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable

from supervisor.balancer.dispatch import Decision, Dispatcher, Send, Worker
from supervisor.balancer.intake import Pending
from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import HandBack, MessageError, Report, encode_conn
from supervisor.system.loop import Loop

READS_PER_WAKEUP = 64


class WorkerLink:
    """One worker's channel end (`key`: its pid; negative for the old master's
    balancer after an upgrade, which only hands connections over) and its core record."""

    __slots__ = ("key", "app", "sock", "worker")

    def __init__(self, key: int, app: str, sock: socket.socket, worker: Worker) -> None:
        self.key = key
        self.app = app
        self.sock = sock
        self.worker = worker


class Links:
    """Every worker link of the balancer. `perform` carries out a core decision (the
    balancer's; it calls `send_conn` for a Send)."""

    def __init__(self, loop: Loop, core: Dispatcher, perform: Callable[[Decision | None], None], log) -> None:
        self.loop = loop
        self.core = core
        self.perform = perform
        self.log = log
        self.by_key: dict[int, WorkerLink] = {}
        self.upstream: socket.socket | None = None   # a new master's balancer, after an upgrade
        # Counters, for /metrics.
        self.handed_back = 0
        self.handbacks: dict[str, int] = {}   # per app

    def attach(self, key: int, app: str, sock: socket.socket) -> None:
        """A new link; KeyError (nothing changed) if `key` has one already."""
        worker = self.core.attach(key, app)
        sock.setblocking(False)
        link = self.by_key[key] = WorkerLink(key, app, sock, worker)
        self.loop.register(sock, lambda: self._readable(link))

    def detach(self, key: int) -> None:
        """The worker retires: send it no more connections (it still reports)."""
        link = self.by_key.get(key)
        if link is not None:
            self.core.detach(link.worker)

    def set_upstream(self, sock: socket.socket) -> None:
        if self.upstream is not None:
            self.upstream.close()
        sock.setblocking(True)   # a hand-back is rare, and must not be lost to EAGAIN
        self.upstream = sock

    def send_conn(self, send: Send) -> bool:
        """Pass the connection to the worker; False if its channel is full or broken."""
        pending = send.conn
        peer = pending.peer
        if type(peer) is not tuple:   # a UNIX socket's peer: a path, or nothing
            peer = (str(peer or ""), 0)
        message = encode_conn(send.conn_id, peer, pending.listener, pending.data, pending.proxy)
        try:
            channel.send_encoded(self.by_key[send.worker.key].sock, message, [pending.sock.fileno()])
        except OSError:
            return False
        return True

    def _readable(self, link: WorkerLink) -> None:
        sock, worker, core = link.sock, link.worker, self.core
        for _ in range(READS_PER_WAKEUP):
            try:
                message, fds = channel.receive(sock)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError):
                self._gone(link)
                return
            except MessageError as exc:
                self.log.warning("worker %d sent a bad message: %s", link.key, exc)
                continue
            kind = type(message)
            if kind is Report:
                for conn in core.report(worker, message.acked, message.closed, message.busy):
                    conn.sock.close()   # the worker owns it now
            elif kind is HandBack:   # with its one fd
                self._handed_back(link, message, fds[0])
            else:
                for fd in fds:
                    os.close(fd)
                self.log.warning("worker %d sent a %s message, which only the master takes", link.key, message.KIND)

    def _handed_back(self, link: WorkerLink, message: HandBack, fd: int) -> None:
        self.core.detach(link.worker)   # only a retiring worker hands connections back
        app = message.app or link.app   # from the old master's balancer, the message names it
        self.handed_back += 1
        self.handbacks[app] = self.handbacks.get(app, 0) + 1
        if self.upstream is not None:
            try:
                channel.send(self.upstream, HandBack(message.peer, message.listener, message.data, app), [fd])
                os.close(fd)
                return
            except (OSError, ValueError) as exc:  # ValueError: with `app`, too big for one message
                self.log.warning("could not pass a connection to the new master: %s", exc)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # the fd a worker sent is not a socket
            os.close(fd)
            self.log.warning("worker %d handed back something that is not a connection: %s", link.key, exc)
            return
        self.perform(self.core.dispatch(
            Pending(sock, message.peer, message.listener, app, message.peer[0], data=message.data)))

    def _gone(self, link: WorkerLink) -> None:
        self.loop.unregister(link.sock)
        link.sock.close()
        del self.by_key[link.key]
        for decision in self.core.gone(link.worker):
            self.perform(decision)

    def close(self) -> None:
        """Close every link (the balancer is exiting)."""
        for link in self.by_key.values():
            self.loop.unregister(link.sock)
            link.sock.close()
        self.by_key.clear()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
