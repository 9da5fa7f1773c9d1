"""The balancer process: accept, pick an app and a worker, pass the connection's fd.

An unprivileged child of the master. It owns the accepting side of every `balance`
listener; for each READY worker the master hands it one end of a SOCK_SEQPACKET
channel to that worker. A connection's fd travels to the worker with its peer address
and listener name; the balancer keeps its own copy until the worker acknowledges it,
so a worker that dies before taking a connection does not lose it: the balancer
re-dispatches every unacknowledged connection when the worker's channel closes.

Which app: a listener served by one app needs no look at the bytes; a listener shared
by several apps peeks (MSG_PEEK, never consuming) at the request head's Host, or at
the TLS ClientHello's SNI, bounded in size and time. Which worker: the app's
`balancing` policy over the load the workers report.
"""
from __future__ import annotations

import heapq
import select
import itertools
import os
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import setproctitle

from supervisor import balancing, channel, privileges, routing, spawn
from supervisor.channel import ChannelClosed
from supervisor.config import Config
from supervisor.log import Logs
from supervisor.messages import ACK, ATTACH, CLOSED, CONN, DETACH, Message, MessageError

ACCEPT_BATCH = 64
PEEK_BYTES = 8192
PEEK_TIMEOUT_S = 10.0
QUEUE_LIMIT = 1024
QUEUE_TIMEOUT_S = 30.0

_MISDIRECTED = (b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 32\r\nConnection: close\r\n\r\nNo app is served for this host.\n")
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 12\r\nConnection: close\r\n\r\nBad request\n")
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
_UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 20\r\nConnection: close\r\n\r\nNo worker is free.\n\n")


@dataclass
class Pending:
    """An accepted connection not yet owned by a worker."""
    sock: socket.socket
    peer: object
    listener: str
    app: str | None = None
    deadline: float = 0.0


@dataclass
class WorkerLink:
    key: int
    app: str
    sock: socket.socket
    load: balancing.WorkerLoad
    accepting: bool = True
    unacked: dict[int, Pending] = field(default_factory=dict)


@dataclass(frozen=True)
class ListenerRoute:
    """How one balance listener picks an app: one app outright, or by Host/SNI."""
    only_app: str | None
    hosts: routing.HostTable | None


def build_routes(config: Config) -> dict[str, ListenerRoute]:
    routes = {}
    for name, listener in config.listeners.items():
        if listener.mode != "balance":
            continue
        apps = [app for app in config.apps.values() if name in app.listeners]
        if len(apps) == 1:
            routes[name] = ListenerRoute(apps[0].name, None)
        else:
            routes[name] = ListenerRoute(None, routing.HostTable(
                [(app.name, app.hosts, app.default) for app in apps]))
    return routes


class Balancer:
    """The balancer's state and loop; `run()` returns when the master goes away."""

    def __init__(self, config: Config, listeners: dict[str, socket.socket], master: socket.socket,
                 links: dict[int, tuple[str, socket.socket]], logs: Logs, clock=time.monotonic):
        self.log = logs.error
        self.clock = clock
        self.listeners = listeners
        self.master = master
        self.routes = build_routes(config)
        self.policies = {name: balancing.make_policy(app.balance) for name, app in config.apps.items()}
        self.links: dict[int, WorkerLink] = {}
        self.selector = selectors.DefaultSelector()
        # Peeked bytes stay in the socket, so a level-triggered wait would fire again
        # and again for a half-sent head; an edge-triggered epoll, nested in the main
        # selector, wakes us only when more bytes arrive.
        self.peek_poll = select.epoll()
        self.selector.register(self.peek_poll.fileno(), selectors.EVENT_READ, self._on_peek_ready)
        self.queue: deque[Pending] = deque()
        self.peeking: dict[int, Pending] = {}
        self.timers: list[tuple[float, int, Pending]] = []
        self.ids = itertools.count(1)
        self.stats = {"accepted": 0, "dispatched": 0, "redispatched": 0, "refused_host": 0,
                      "overflow_503": 0, "queue_timeout_503": 0}
        self.running = True
        master.setblocking(False)
        self.selector.register(master, selectors.EVENT_READ, self._on_master)
        for name, sock in listeners.items():
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, lambda s=sock, n=name: self._accept(s, n))
        for key, (app, sock) in links.items():
            self._attach(key, app, sock)

    def run(self) -> None:
        while self.running:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - self.clock())
            for key, _ in self.selector.select(timeout):
                key.data()
            self._expire(self.clock())

    # -- accepting and routing ---------------------------------------------

    def _accept(self, listening: socket.socket, listener: str) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the next pass retries
                self.log.warning("accept on %s failed: %s", listener, exc)
                return
            self.stats["accepted"] += 1
            pending = Pending(sock, peer, listener)
            route = self.routes[listener]
            if route.only_app is not None:
                pending.app = route.only_app
                self._dispatch(pending)
            else:
                sock.setblocking(False)
                pending.deadline = self.clock() + PEEK_TIMEOUT_S
                self.peeking[sock.fileno()] = pending
                self.peek_poll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
                self._add_timer(pending)
                self._peek(pending)  # the head often arrived with the handshake

    def _on_peek_ready(self) -> None:
        for fd, _ in self.peek_poll.poll(0):
            pending = self.peeking.get(fd)
            if pending is not None:
                self._peek(pending)

    def _peek(self, pending: Pending) -> None:
        try:
            data = pending.sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client left before saying which host
            self._stop_peeking(pending)
            pending.sock.close()
            return
        route = self.routes[pending.listener]
        peek = routing.peek_sni(data) if routing.looks_like_tls(data) else routing.peek_host(data, PEEK_BYTES)
        if peek.status == "need_more":
            if len(data) >= PEEK_BYTES:
                self._refuse(pending, _BAD_REQUEST, "refused_host")
            return
        self._stop_peeking(pending)
        if peek.status == "invalid":
            self._refuse(pending, _BAD_REQUEST, "refused_host")
            return
        app = route.hosts.match(peek.host)
        if app is None:
            self._refuse(pending, _MISDIRECTED, "refused_host")
            return
        pending.app = app
        self._dispatch(pending)

    def _stop_peeking(self, pending: Pending) -> None:
        if self.peeking.pop(pending.sock.fileno(), None) is not None:
            self.peek_poll.unregister(pending.sock.fileno())

    def _refuse(self, pending: Pending, response: bytes, counter: str) -> None:
        self._stop_peeking(pending)
        self.stats[counter] += 1
        try:
            pending.sock.setblocking(False)
            pending.sock.send(response)
            pending.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        pending.sock.close()

    # -- dispatching to workers ----------------------------------------------

    def _dispatch(self, pending: Pending) -> None:
        links = [link for link in self.links.values() if link.app == pending.app and link.accepting]
        client = pending.peer[0] if isinstance(pending.peer, tuple) else None
        policy = self.policies[pending.app]
        while links:
            load = policy.pick([link.load for link in links], client)
            link = self.links[load.key]
            conn_id = next(self.ids)
            try:
                channel.send(link.sock, Message(CONN, {"id": conn_id, "peer": _peer_fields(pending.peer),
                                                       "listener": pending.listener}), [pending.sock.fileno()])
            except OSError:  # channel full or broken: another worker gets it
                links.remove(link)
                continue
            link.unacked[conn_id] = pending
            link.load.connections += 1
            self.stats["dispatched"] += 1
            return
        self._enqueue(pending)

    def _enqueue(self, pending: Pending) -> None:
        if len(self.queue) >= QUEUE_LIMIT:
            self._refuse(self.queue.popleft(), _UNAVAILABLE, "overflow_503")
        pending.deadline = self.clock() + QUEUE_TIMEOUT_S
        self.queue.append(pending)
        self._add_timer(pending)

    def _drain_queue(self, app: str) -> None:
        waiting = [p for p in self.queue if p.app == app]
        if not waiting:
            return
        self.queue = deque(p for p in self.queue if p.app != app)
        for pending in waiting:
            self._dispatch(pending)

    def _add_timer(self, pending: Pending) -> None:
        heapq.heappush(self.timers, (pending.deadline, id(pending), pending))

    def _expire(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, _, pending = heapq.heappop(self.timers)
            if pending.sock.fileno() < 0 or pending.deadline > now:
                continue
            if pending.sock.fileno() in self.peeking:
                self._refuse(pending, _TIMEOUT, "refused_host")
            elif pending in self.queue:
                self.queue.remove(pending)
                self._refuse(pending, _UNAVAILABLE, "queue_timeout_503")

    # -- worker links ------------------------------------------------------

    def _attach(self, key: int, app: str, sock: socket.socket) -> None:
        sock.setblocking(False)
        link = WorkerLink(key, app, sock, balancing.WorkerLoad(key))
        self.links[key] = link
        self.selector.register(sock, selectors.EVENT_READ, lambda: self._on_worker(link))
        self._drain_queue(app)

    def _on_worker(self, link: WorkerLink) -> None:
        for _ in range(64):
            try:
                message, fds = channel.receive(link.sock)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError):
                self._worker_gone(link)
                return
            except MessageError as exc:
                self.log.warning("worker %d sent a bad message: %s", link.key, exc)
                continue
            for fd in fds:
                os.close(fd)
            if message.kind == ACK:
                pending = link.unacked.pop(message.fields.get("id"), None)
                if pending is not None:
                    pending.sock.close()
            elif message.kind == CLOSED:
                link.load.connections = max(0, link.load.connections - 1)
            if "busy" in message.fields:
                link.load.busy = int(message.fields["busy"])
            if self.queue:
                self._drain_queue(link.app)

    def _worker_gone(self, link: WorkerLink) -> None:
        self.selector.unregister(link.sock)
        link.sock.close()
        del self.links[link.key]
        for pending in link.unacked.values():
            self.stats["redispatched"] += 1
            self._dispatch(pending)

    def _on_master(self) -> None:
        while True:
            try:
                message, fds = channel.receive(self.master)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError):
                self.running = False
                return
            except MessageError as exc:
                self.log.warning("bad message from master: %s", exc)
                continue
            if message.kind == ATTACH and len(fds) == 1:
                self._attach(int(message["key"]), str(message["app"]), socket.socket(fileno=fds[0]))
                continue
            for fd in fds:
                os.close(fd)
            if message.kind == DETACH:
                link = self.links.get(int(message["key"]))
                if link:
                    link.accepting = False


def _peer_fields(peer) -> list:
    return list(peer[:2]) if isinstance(peer, tuple) else [str(peer or ""), 0]


def main(config: Config, identity: privileges.Identity, listeners: dict[str, socket.socket],
         master: socket.socket, links: dict[int, tuple[str, socket.socket]], logs: Logs,
         master_pid: int) -> int:
    privileges.drop(identity)
    spawn.die_with_parent(master_pid)
    setproctitle.setproctitle(f"baton: balancer ({identity.name})")
    Balancer(config, listeners, master, links, logs).run()
    return 0
