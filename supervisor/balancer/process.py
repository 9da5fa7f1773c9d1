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
import itertools
import os
import select
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import setproctitle

from supervisor.balancer import health, routing
from supervisor.balancer import policies as balancing
from supervisor.config.model import Config
from supervisor.http import proxyproto
from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    ATTACH,
    DETACH,
    DRAIN,
    HANDBACK,
    METRICS,
    REOPEN,
    REPORT,
    ROUTES,
    UPSTREAM,
    Message,
    MessageError,
    encode_conn,
)
from supervisor.system import privileges, spawn
from supervisor.system.log import Logs

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


@dataclass(eq=False)
class Pending:
    """An accepted (or handed-back) connection not yet owned by a worker."""
    sock: socket.socket
    peer: object
    listener: str
    app: str | None = None
    deadline: float = 0.0
    data: str = ""          # base64 of bytes a previous worker read but did not parse
    proxy: bool = False     # a PROXY protocol header leads the stream; the worker reads it
    client: str | None = None  # the client's address, for ip-hash (the PROXY source if any)
    queued_at: float = 0.0  # when it started waiting for a free worker


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


def routing_payload(config: Config) -> dict:
    """What the balancer needs of a config, as plain data for a ROUTES message."""
    return {
        "listeners": {name: [app.name for app in config.apps.values() if name in app.listeners]
                      for name, listener in config.listeners.items() if listener.mode == "balance"},
        "proxy": [name for name, listener in config.listeners.items() if listener.proxy_protocol],
        "apps": {name: {"hosts": list(app.hosts), "default": app.default, "balance": app.balance}
                 for name, app in config.apps.items()},
    }


def build_routes(payload: dict) -> dict[str, ListenerRoute]:
    routes = {}
    apps = payload["apps"]
    for name, app_names in payload["listeners"].items():
        if len(app_names) == 1:
            routes[name] = ListenerRoute(app_names[0], None)
        else:
            routes[name] = ListenerRoute(None, routing.HostTable(
                [(app, tuple(apps[app]["hosts"]), apps[app]["default"]) for app in app_names]))
    return routes


class Balancer:
    """The balancer's state and loop; `run()` returns when the master goes away."""

    def __init__(self, payload: dict, listeners: dict[str, socket.socket], master: socket.socket,
                 links: dict[int, tuple[str, socket.socket]], logs: Logs, clock=time.monotonic,
                 health_socket: socket.socket | None = None):
        self.log = logs.error
        self.logs = logs
        self.clock = clock
        self.listeners: dict[str, socket.socket] = {}
        self.listening_socks: set[socket.socket] = set()  # accepted on last in each wakeup
        self.master = master
        self.routes: dict[str, ListenerRoute] = {}
        self.policies: dict[str, tuple[str, balancing.Policy]] = {}
        self.links: dict[int, WorkerLink] = {}
        # Per app, the loads of its links that take connections, in `links` order: read
        # for every connection, rebuilt only when a link comes, goes or stops accepting.
        self.accepting: dict[str, list[balancing.WorkerLoad]] = {}
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
                      "overflow_503": 0, "queue_timeout_503": 0, "handed_back": 0, "refused_proxy": 0}
        self.running = True
        self.draining = False
        self.upstream: socket.socket | None = None  # a new master's balancer, after an upgrade
        self.master_figures: dict = {"apps": {}, "overall": {}}
        self.per_app: dict[str, dict[str, float]] = {}
        self.health_clients: dict[int, tuple[socket.socket, bytearray, float]] = {}
        if health_socket is not None:
            health_socket.setblocking(False)
            self.selector.register(health_socket, selectors.EVENT_READ, lambda: self._accept_health(health_socket))
        master.setblocking(False)
        self.selector.register(master, selectors.EVENT_READ, self._on_master)
        self._set_routes(payload, listeners)
        for key, (app, sock) in links.items():
            self._attach(key, app, sock)

    def _set_routes(self, payload: dict, new_listeners: dict[str, socket.socket]) -> None:
        """Adopt a routing table; listeners it no longer names are closed here (the
        master holds its own copy until their workers drained)."""
        self.routes = build_routes(payload)
        self.proxy_listeners = frozenset(payload.get("proxy", ()))
        self.policies = {name: self.policies[name] if self.policies.get(name, ("",))[0] == app["balance"]
                         else (app["balance"], balancing.make_policy(app["balance"]))
                         for name, app in payload["apps"].items()}
        for name in [n for n in self.listeners if n not in self.routes or n in new_listeners]:
            sock = self.listeners.pop(name)
            self.listening_socks.discard(sock)
            self.selector.unregister(sock)
            sock.close()
        for name, sock in new_listeners.items():
            sock.setblocking(False)
            self.listeners[name] = sock
            self.selector.register(sock, selectors.EVENT_READ, lambda s=sock, n=name: self._accept(s, n))
            self.listening_socks.add(sock)

    def run(self) -> None:
        while self.running:
            accepts = []
            registered = self.selector.get_map()
            for key, _ in self.selector.select(self._wait_timeout()):
                if registered.get(key.fd) is not key:
                    continue  # closed by an earlier handler in this wakeup
                if key.fileobj in self.listening_socks:
                    accepts.append(key.data)
                else:
                    key.data()
            # Accept last: the workers' reports that arrived in the same wakeup (a
            # connection closed, a worker freed) must count when choosing a worker.
            for accept in accepts:
                accept()  # a listener closed by a ROUTES or DRAIN just now fails its accept harmlessly
            if self.timers or self.health_clients:
                now = self.clock()
                self._expire(now)
                self._expire_health_clients(now)
            if self.draining and not any(key >= 0 for key in self.links) and not self.queue:
                # Every worker is gone and every hand-back it sent was passed on.
                self.running = False

    def _wait_timeout(self) -> float | None:
        """Seconds until the nearest deadline (a peek, a queued connection, a health
        client), or None: most of the time there is none, and nothing to compute."""
        if not self.timers and not self.health_clients:
            return None
        deadlines = [deadline for _, _, deadline in self.health_clients.values()]
        if self.timers:
            deadlines.append(self.timers[0][0])
        return max(0.0, min(deadlines) - self.clock())

    # -- accepting and routing ---------------------------------------------

    def _accept(self, listening: socket.socket, listener: str) -> None:
        route = self.routes[listener]
        proxy = listener in self.proxy_listeners
        direct_app = route.only_app if not proxy else None  # nothing to peek at before dispatching
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the next pass retries
                self.log.warning("accept on %s failed: %s", listener, exc)
                return
            self.stats["accepted"] += 1
            pending = Pending(sock, peer, listener, app=direct_app, proxy=proxy,
                              client=peer[0] if isinstance(peer, tuple) else None)
            if direct_app is not None:
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
        route = self.routes.get(pending.listener)
        if route is None:  # its listener went away with a reload
            self._stop_peeking(pending)
            pending.sock.close()
            return
        if pending.proxy:
            header = proxyproto.parse(data)
            if header.status != "ok":
                if header.status == "invalid" or len(data) >= PEEK_BYTES:
                    self._refuse(pending, b"", "refused_proxy")  # not a client: no HTTP answer
                return
            if header.source is not None and not header.use_peer:
                pending.client = header.source[0]
            data = data[header.consumed:]
        if route.only_app is not None:
            self._stop_peeking(pending)
            pending.app = route.only_app
            self._dispatch(pending)
            return
        if not data:
            return
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
            if response:
                pending.sock.setblocking(False)
                pending.sock.send(response)
                pending.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        pending.sock.close()

    # -- dispatching to workers ----------------------------------------------

    def _dispatch(self, pending: Pending) -> None:
        policy = self.policies.get(pending.app)
        if policy is None:  # the app went away with a reload
            pending.sock.close()
            return
        loads = self.accepting.get(pending.app, ())
        while loads:
            load = policy[1].pick(loads, pending.client)
            if self._send_conn(self.links[load.key], pending):
                return
            loads = [other for other in loads if other is not load]  # another worker gets it
        self._enqueue(pending)

    def _send_conn(self, link: WorkerLink, pending: Pending) -> bool:
        """Pass the connection to the worker; False if its channel is full or broken."""
        conn_id = next(self.ids)
        message = encode_conn(conn_id, _peer_fields(pending.peer), pending.listener, pending.data, pending.proxy)
        try:
            channel.send_encoded(link.sock, message, [pending.sock.fileno()])
        except OSError:
            return False
        link.unacked[conn_id] = pending
        link.load.connections += 1
        self.stats["dispatched"] += 1
        self._count(pending.app, "baton_handoffs_total")
        if pending.queued_at:
            self._count(pending.app, "baton_queue_wait_seconds_total", self.clock() - pending.queued_at)
        return True

    def _enqueue(self, pending: Pending) -> None:
        if len(self.queue) >= QUEUE_LIMIT:
            self._refuse(self.queue.popleft(), _UNAVAILABLE, "overflow_503")
        pending.deadline = self.clock() + QUEUE_TIMEOUT_S
        pending.queued_at = pending.queued_at or self.clock()
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
        # A negative key is the old master's balancer after an upgrade: it only hands
        # connections to us, it never takes any.
        link.accepting = key >= 0
        self.links[key] = link
        self._refresh_accepting(app)
        self.selector.register(sock, selectors.EVENT_READ, lambda: self._on_worker(link))
        self._drain_queue(app)

    def _stop_sending(self, link: WorkerLink) -> None:
        link.accepting = False
        self._refresh_accepting(link.app)

    def _refresh_accepting(self, app: str) -> None:
        self.accepting[app] = [link.load for link in self.links.values() if link.app == app and link.accepting]

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
            if message.kind == HANDBACK and len(fds) == 1:
                self._handed_back(link, message, fds[0])
                continue
            for fd in fds:
                os.close(fd)
            if message.kind == REPORT:
                self._on_report(link, message.fields)
                if self.queue:
                    self._drain_queue(link.app)

    def _on_report(self, link: WorkerLink, fields: dict) -> None:
        """Drop our copies of the connections the worker took; uncount those that ended."""
        unacked = link.unacked
        for conn_id in fields.get("acked", ()):
            pending = unacked.pop(conn_id, None)
            if pending is not None:
                pending.sock.close()  # the worker owns it now
        closed = len(fields.get("closed", ()))
        if closed:
            link.load.connections = max(0, link.load.connections - closed)
        link.load.busy = int(fields.get("busy", 0))

    def _handed_back(self, link: WorkerLink, message: Message, fd: int) -> None:
        # Only a retiring worker hands connections back: send it no more.
        if link.accepting:
            self._stop_sending(link)
        app = str(message.fields.get("app") or link.app)  # from upstream, the message names it
        self.stats["handed_back"] += 1
        self._count(app, "baton_handbacks_total")
        if self.upstream is not None:
            try:
                channel.send(self.upstream, Message(HANDBACK, dict(message.fields, app=app)), [fd])
                os.close(fd)
                return
            except OSError as exc:
                self.log.warning("could not pass a connection to the new master: %s", exc)
        peer = message.fields.get("peer") or ["", 0]
        pending = Pending(socket.socket(fileno=fd), tuple(peer), str(message.fields.get("listener", "")),
                          app=app, data=str(message.fields.get("data", "")), client=str(peer[0]))
        self._dispatch(pending)

    def _worker_gone(self, link: WorkerLink) -> None:
        self.selector.unregister(link.sock)
        link.sock.close()
        del self.links[link.key]
        self._refresh_accepting(link.app)
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
            if message.kind == REOPEN:
                try:
                    self.logs.adopt(message.fields.get("numbers", []), fds)
                except ValueError as exc:
                    self.log.error("could not adopt reopened logs: %s", exc)
                continue
            if message.kind == UPSTREAM and len(fds) == 1:
                self.upstream = socket.socket(fileno=fds[0])
                self.upstream.setblocking(True)
                continue
            if message.kind == ROUTES:
                names = list(message.fields.get("open", ()))
                if len(names) == len(fds):
                    self._set_routes(message["routes"], {n: socket.socket(fileno=fd) for n, fd in zip(names, fds)})
                    for app in {p.app for p in self.queue}:
                        self._drain_queue(app)
                    continue
            for fd in fds:
                os.close(fd)
            if message.kind == DETACH:
                link = self.links.get(int(message["key"]))
                if link:
                    self._stop_sending(link)
            elif message.kind == METRICS:
                self.master_figures = message.fields
            elif message.kind == DRAIN:
                self._drain()


    # -- health and metrics ------------------------------------------------

    def _count(self, app: str | None, name: str, amount: float = 1) -> None:
        figures = self.per_app.setdefault(app or "", {})
        figures[name] = figures.get(name, 0) + amount

    def _drain(self) -> None:
        """A graceful stop began: accept no more, and tell health checks so."""
        self.draining = True
        for sock in self.listeners.values():
            self.selector.unregister(sock)
            sock.close()  # the master keeps its copy: queued connections wait, not reset
        self.listeners.clear()
        self.listening_socks.clear()

    def metrics_text(self) -> str:
        per_app: dict[str, dict[str, float]] = {}
        for app, figures in self.master_figures.get("apps", {}).items():
            per_app[app] = dict(figures)
        for app, figures in self.per_app.items():
            per_app.setdefault(app, {}).update(figures)
        for app in per_app:
            links = [link for link in self.links.values() if link.app == app]
            per_app[app]["baton_connections"] = sum(link.load.connections for link in links)
            per_app[app]["baton_queue_depth"] = sum(1 for p in self.queue if p.app == app)
        overall = dict(self.master_figures.get("overall", {}))
        overall["baton_accepted_total"] = self.stats["accepted"]
        overall["baton_refused_total"] = (self.stats["refused_host"] + self.stats["overflow_503"]
                                          + self.stats["queue_timeout_503"] + self.stats["refused_proxy"])
        return health.render(per_app, overall)

    def _accept_health(self, listening: socket.socket) -> None:
        for _ in range(16):
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            self.health_clients[sock.fileno()] = (sock, bytearray(), self.clock() + PEEK_TIMEOUT_S)
            self.selector.register(sock, selectors.EVENT_READ, lambda s=sock: self._on_health_client(s))

    def _on_health_client(self, sock: socket.socket) -> None:
        client = self.health_clients.get(sock.fileno())
        if client is None or client[0] is not sock:
            return  # closed earlier in this wakeup
        buffer = client[1]
        try:
            data = sock.recv(health.MAX_HEAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer += data
        response = health.answer(bytes(buffer), draining=self.draining, metrics=self.metrics_text()) if data else b""
        if response is None:
            return
        try:
            sock.send(response)  # small: one send fits the socket buffer
        except OSError:
            pass
        self._close_health_client(sock)

    def _expire_health_clients(self, now: float) -> None:
        for sock, _, deadline in list(self.health_clients.values()):
            if now >= deadline:
                self._close_health_client(sock)

    def _close_health_client(self, sock: socket.socket) -> None:
        self.health_clients.pop(sock.fileno(), None)
        self.selector.unregister(sock)
        sock.close()


def _peer_fields(peer) -> list:
    return list(peer[:2]) if isinstance(peer, (tuple, list)) and peer else [str(peer or ""), 0]


def main(payload: dict, identity: privileges.Identity, listeners: dict[str, socket.socket],
         master: socket.socket, links: dict[int, tuple[str, socket.socket]], logs: Logs,
         master_pid: int, health_socket: socket.socket | None = None) -> int:
    privileges.drop(identity)
    spawn.die_with_parent(master_pid)
    setproctitle.setproctitle(f"baton: balancer ({identity.name})")
    Balancer(payload, listeners, master, links, logs, health_socket=health_socket).run()
    return 0
