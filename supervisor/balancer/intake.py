"""The balancer's intake: accept on the `balance` listeners and find each connection's app.

A listener served by one app needs no look at the bytes: its connections go straight
to dispatch. A listener shared by several apps (or one that expects a PROXY protocol
header) peeks at the first bytes (MSG_PEEK, never consuming them: the worker reads
them all) for the request head's Host or the TLS ClientHello's SNI, and answers what
it cannot route itself: 400 for a head it cannot read, 421 for a host no app serves,
408 for a client that said too little within PEEK_TIMEOUT_S. A PROXY header that is not
one is closed without a word (the peer is a proxy, not a client).

Promises:

* **Accepting waits for the end of the wakeup.** A listener's readiness is noted while
  the loop dispatches events and acted on in `accept_ready`, which the balancer calls
  after them: the workers' reports of the same wakeup (a connection closed, a thread
  freed) count when the new connections pick a worker.
* **A peeking connection wakes the balancer only when more bytes arrive**: it is
  registered edge-triggered, since its bytes stay in the socket.
* Listeners are the master's: the balancer closes its copy when a routing table no
  longer names one, or names it with a fresh socket, or when it drains.
"""
from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from supervisor.balancer import routing
from supervisor.balancer.dispatch import Connection
from supervisor.http import proxyproto
from supervisor.system.loop import EDGE, HANGUP, READ, Loop, Timer

ACCEPT_BATCH = 64
PEEK_BYTES = 8192
PEEK_TIMEOUT_S = 10.0

MISDIRECTED = (b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 32\r\nConnection: close\r\n\r\nNo app is served for this host.\n")
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 12\r\nConnection: close\r\n\r\nBad request\n")
TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Pending(Connection):
    """An accepted (or handed-back) connection that no worker owns yet: the core's
    `Connection`, with what travels to the worker (the socket, the peer address, the
    listener's name, bytes a previous worker read but did not parse, whether a PROXY
    header leads the stream) and, while peeking, its deadline's timer."""

    __slots__ = ("sock", "peer", "listener", "data", "proxy", "peek_timer")

    def __init__(self, sock: socket.socket, peer, listener: str, app: str | None = None,
                 client: str | None = None, data: bytes = b"", proxy: bool = False) -> None:
        # Connection's fields set here rather than through super().__init__: one call
        # less per accepted connection.
        self.app = app
        self.client = client
        self.queued_at = 0.0
        self.deadline = 0.0
        self.sock = sock
        self.peer = peer
        self.listener = listener
        self.data = data
        self.proxy = proxy
        self.peek_timer: Timer | None = None


@dataclass(frozen=True)
class ListenerRoute:
    """How one balance listener picks an app: one app outright, or by Host/SNI."""
    only_app: str | None
    hosts: routing.HostTable | None


def build_routes(payload: Mapping) -> dict[str, ListenerRoute]:
    """Each listener's route from a routing table (see `process.routing_payload`).
    ValueError on a host pattern `routing.HostTable` refuses."""
    routes = {}
    apps = payload["apps"]
    for name, app_names in payload["listeners"].items():
        if len(app_names) == 1:
            routes[name] = ListenerRoute(app_names[0], None)
        else:
            routes[name] = ListenerRoute(None, routing.HostTable(
                [(app, tuple(apps[app]["hosts"]), apps[app]["default"]) for app in app_names]))
    return routes


class _Listener:
    __slots__ = ("name", "sock", "open", "_ready")

    def __init__(self, name: str, sock: socket.socket, ready: list) -> None:
        self.name = name
        self.sock = sock
        self.open = True
        self._ready = ready

    def readable(self) -> None:
        self._ready.append(self)


class Intake:
    """Accepts and peeks on the loop; hands each connection whose app is known to
    `dispatch`. Counts what it accepted and what it refused itself."""

    def __init__(self, loop: Loop, dispatch: Callable[[Pending], None], log) -> None:
        self.loop = loop
        self.dispatch = dispatch
        self.log = log
        self.routes: dict[str, ListenerRoute] = {}
        self.proxy_listeners: frozenset[str] = frozenset()
        self.listeners: dict[str, _Listener] = {}
        self._ready: list[_Listener] = []     # readable in this wakeup, accepted after it
        self.peeking: dict[int, Pending] = {}   # by fd
        # Counters, for /metrics.
        self.accepted = 0
        self.refused_host = 0
        self.refused_proxy = 0

    def set_routes(self, routes: dict[str, ListenerRoute], proxy: frozenset[str],
                   opened: Mapping[str, socket.socket]) -> None:
        """Adopt each listener's route, and the listeners newly served (`opened`, which
        may replace one by name). Our copies of listeners no longer routed are closed."""
        self.routes = routes
        self.proxy_listeners = proxy
        for name in [name for name in self.listeners if name not in routes or name in opened]:
            self._close_listener(self.listeners.pop(name))
        for name, sock in opened.items():
            sock.setblocking(False)
            listener = self.listeners[name] = _Listener(name, sock, self._ready)
            self.loop.register(sock, listener.readable)

    def close_listeners(self) -> None:
        """Accept no more (a drain): close our copies; the master keeps its own, so the
        connections in their backlogs are not reset."""
        for listener in self.listeners.values():
            self._close_listener(listener)
        self.listeners.clear()

    def close(self) -> None:
        """Close the listeners and every connection still peeked at."""
        self.close_listeners()
        for pending in list(self.peeking.values()):
            self._stop_peeking(pending)
            pending.sock.close()

    def _close_listener(self, listener: _Listener) -> None:
        listener.open = False   # it may be in this wakeup's `_ready` still
        self.loop.unregister(listener.sock)
        listener.sock.close()

    # -- accepting -------------------------------------------------------------

    def accept_ready(self) -> None:
        """Accept on every listener that was readable in this wakeup."""
        ready = self._ready
        if ready:
            for listener in ready:
                if listener.open:
                    self._accept(listener)
            ready.clear()

    def _accept(self, listener: _Listener) -> None:
        name, listening = listener.name, listener.sock
        route = self.routes[name]
        proxy = name in self.proxy_listeners
        direct_app = route.only_app if not proxy else None  # nothing to peek at before dispatching
        dispatch = self.dispatch
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the next wakeup retries
                self.log.warning("accept on %s failed: %s", name, exc)
                return
            self.accepted += 1
            pending = Pending(sock, peer, name, direct_app, peer[0] if type(peer) is tuple else None,
                              proxy=proxy)
            if direct_app is not None:
                dispatch(pending)
            else:
                self._start_peeking(pending)

    # -- peeking ---------------------------------------------------------------

    def _start_peeking(self, pending: Pending) -> None:
        sock = pending.sock
        sock.setblocking(False)
        self.peeking[sock.fileno()] = pending
        self.loop.register(sock, lambda: self._peek(pending), READ | HANGUP | EDGE)
        pending.peek_timer = self.loop.call_later(PEEK_TIMEOUT_S, lambda: self._refuse(pending, TIMEOUT))
        self._peek(pending)  # the head often arrived with the handshake

    def _stop_peeking(self, pending: Pending) -> None:
        fd = pending.sock.fileno()
        if self.peeking.get(fd) is pending:
            del self.peeking[fd]
            # Before the fd travels: its registration would outlive our close while the
            # worker holds the same file.
            self.loop.unregister(fd)
            pending.peek_timer.cancel()
            pending.peek_timer = None

    def _peek(self, pending: Pending) -> None:
        try:
            data = pending.sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        route = self.routes.get(pending.listener)
        if not data or route is None:  # the client left before saying which host, or the listener went away
            self._stop_peeking(pending)
            pending.sock.close()
            return
        if pending.proxy:
            header = proxyproto.parse(data)
            if header.status != "ok":
                if header.status == "invalid" or len(data) >= PEEK_BYTES:
                    self._refuse(pending, b"")  # not a client: no HTTP answer
                return
            if header.source is not None and not header.use_peer:
                pending.client = header.source[0]
            data = data[header.consumed:]
        if route.only_app is not None:
            self._stop_peeking(pending)
            pending.app = route.only_app
            self.dispatch(pending)
            return
        if not data:
            return
        peek = routing.peek_sni(data) if routing.looks_like_tls(data) else routing.peek_host(data, PEEK_BYTES)
        if peek.status == "need_more":
            if len(data) >= PEEK_BYTES:
                self._refuse(pending, BAD_REQUEST)
            return
        if peek.status == "invalid":
            self._refuse(pending, BAD_REQUEST)
            return
        app = route.hosts.match(peek.host)
        if app is None:
            self._refuse(pending, MISDIRECTED)
            return
        self._stop_peeking(pending)
        pending.app = app
        self.dispatch(pending)

    def _refuse(self, pending: Pending, response: bytes) -> None:
        """Answer (when there is an answer: PROXY garbage gets none) and close."""
        self._stop_peeking(pending)
        if response:
            self.refused_host += 1
        else:
            self.refused_proxy += 1
        answer_and_close(pending.sock, response)


def answer_and_close(sock: socket.socket, response: bytes) -> None:
    """Send a short response the balancer gives itself (it fits the socket buffer; a
    client that cannot take it loses it), then close."""
    try:
        if response:
            sock.setblocking(False)
            sock.send(response)
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
