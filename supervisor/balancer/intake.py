"""The balancer's intake: accept on the `balance` listeners and find each connection's app.

A listener served by one app needs no look at the bytes: its connections go straight
to dispatch. A listener shared by several apps (or one that expects a PROXY protocol
header) peeks at the first bytes (MSG_PEEK, never consuming them: the worker reads
them all) for the request head's Host or the TLS ClientHello's SNI, and answers what
it cannot route itself: 400 for a head it cannot read, 421 for a host no app serves,
408 for a client that said too little within PEEK_TIMEOUT_S. A PROXY header that is not
one is closed without a word (the peer is a proxy, not a client), and so is a TLS
ClientHello that cannot be routed (plain HTTP would be garbage to it). A TLS connection
goes to its app's worker still encrypted: the worker holds the key and does the
handshake, the balancer never does.

Promises:

* **Accepting waits for the end of the wakeup.** A listener's readiness is noted while
  the loop dispatches events and acted on in `accept_ready`, which the balancer calls
  after them: the workers' reports of the same wakeup (a connection closed, a thread
  freed) count when the new connections pick a worker.
* **A peeking connection wakes the balancer only when more bytes arrive**: it is
  registered edge-triggered, since its bytes stay in the socket.
* **Running out of fds is weathered, not spun on.** An accept that fails for want of
  fds (EMFILE, ENFILE, ENOBUFS, ENOMEM) sheds the SHED_BATCH oldest connections still
  peeking (answered 503: a client that has not said which host it wants in all that
  time is the likeliest flooder) and takes that listener off the loop for
  ACCEPT_PAUSE_S, so its level-triggered readiness cannot spin the balancer; then it
  accepts again, by itself. Failed accepts are logged at most once per
  ACCEPT_LOG_INTERVAL_S, with how many there were.
* **While an app's connections wait in the queue, its listeners' new ones wait in the
  kernel's backlog** (a listener of that one app only: one shared by Host must be
  accepted to learn the app). Accepting them would only lengthen the queue, and
  waking for each one is most of a saturated balancer's cost. The listener is taken
  off the loop (`_defer`) and accepted again in the wakeup whose dispatching empties
  that queue (`resume_deferred`), or ACCEPT_DEFER_S later at the latest, when one
  batch is taken whatever the queue holds: so workers that make no progress still
  see `queue_limit` and `queue_timeout` apply, late by at most that.
* A peeking connection costs a registration and a timer only when its first look
  (right after accept) did not settle it; the timer refuses it after PEEK_TIMEOUT_S.
* **A parked connection** (an idle keep-alive connection a serving worker handed back,
  `park`) is watched edge-triggered with one timer. When its next request's bytes
  arrive it goes on like a new connection: straight to dispatch on a listener of one
  app (today's), peeked at again on one shared by Host, so each request of a
  keep-alive connection reaches the app its Host names (and a free worker of it). A
  client that closes it is closed without a word; one idle past the time the worker
  gave (what was left of its app's `keepalive`) is closed the same way. Out of fds,
  parked connections are shed after the peeking ones, oldest first, unanswered (an
  idle keep-alive connection may be closed between requests).
* Listeners are the master's: the balancer closes its copy when a routing table no
  longer names one, or names it with a fresh socket, or when it drains.
"""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping

from supervisor.balancer import routing
from supervisor.balancer.dispatch import Connection
from supervisor.balancer.untouched import FRESH
from supervisor.http import proxyproto
from supervisor.system.loop import EDGE, HANGUP, READ, Loop, Timer

ACCEPT_BATCH = 64
PEEK_BYTES = 8192
PEEK_TIMEOUT_S = 10.0
ACCEPT_PAUSE_S = 0.1          # a listener rests this long after accept ran out of fds
ACCEPT_DEFER_S = 0.01         # the longest a listener waits for its app's queue to empty
ACCEPT_LOG_INTERVAL_S = 10.0  # failed accepts are logged at most once per this
SHED_BATCH = 64               # peeking connections closed per accept that ran out of fds
_OUT_OF_FDS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

MISDIRECTED = (b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 32\r\nConnection: close\r\n\r\nNo app is served for this host.\n")
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 12\r\nConnection: close\r\n\r\nBad request\n")
TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
SHED = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n")


class Pending(Connection):
    """An accepted (or handed-back) connection that no worker owns yet: the core's
    `Connection`, with what travels to the worker (the socket, the peer address, the
    listener's name, bytes a previous worker read but did not parse, whether a PROXY
    header leads the stream) and, while peeking, its deadline's timer. Set later, and
    read only then: `origin`, the client address a PROXY header gave (None: it gave
    none), set before a `proxy` connection is dispatched; `ident`, the socket's
    (st_dev, st_ino), None or set once it is sent to a worker (see links.py). `passed`: the
    socket's counts (`untouched.counts`) as we pass it on, FRESH for one we accepted.

    A connection accepted on a listener of one app is a bare fd (`fd`, of `family`):
    most go to a worker and are closed without the balancer ever touching them, and a
    socket object costs a getsockname call (CPython checks the fd) and its own upkeep.
    `sock` makes one when something needs it; `close` and `detach` work either way."""

    __slots__ = ("fd", "family", "_sock", "peer", "listener", "data", "proxy", "peek_timer", "origin", "ident",
                 "passed")

    def __init__(self, sock: socket.socket | int, peer, listener: str, app: str | None = None,
                 client: str | None = None, data: bytes = b"", proxy: bool = False,
                 passed: tuple[int, int] | None = FRESH, family: int = socket.AF_INET) -> None:
        # Connection's fields set here rather than through super().__init__: one call
        # less per accepted connection.
        self.app = app
        self.client = client
        self.queued_at = 0.0
        self.deadline = 0.0
        self.refusals = 0
        if sock.__class__ is int:
            self.fd, self.family, self._sock = sock, family, None
        else:
            self.fd, self.family, self._sock = sock.fileno(), sock.family, sock
        self.peer = peer
        self.listener = listener
        self.data = data
        self.proxy = proxy
        self.peek_timer: Timer | None = None
        self.passed = passed

    @property
    def sock(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            if self.fd < 0:
                raise OSError(errno.EBADF, "the connection was closed or handed on")
            sock = self._sock = socket.socket(self.family, socket.SOCK_STREAM, 0, self.fd)
        return sock

    def close(self) -> None:
        """Close our copy (again: nothing)."""
        if self._sock is not None:
            self._sock.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd, self._sock = -1, None

    def detach(self) -> int:
        """The fd, now the caller's."""
        fd = self._sock.detach() if self._sock is not None else self.fd
        self.fd, self._sock = -1, None
        return fd


class _Listener:
    __slots__ = ("name", "sock", "open", "_ready", "pause_timer", "forced")

    def __init__(self, name: str, sock: socket.socket, ready: list) -> None:
        self.name = name
        self.sock = sock
        self.open = True
        self._ready = ready
        self.pause_timer: Timer | None = None   # set while off the loop (out of fds, or deferred)
        self.forced = False     # its next batch is accepted whatever the queue holds

    def readable(self) -> None:
        self._ready.append(self)


class Intake:
    """Accepts and peeks on the loop; hands each connection whose app is known to
    `dispatch`. Counts what it accepted and what it refused itself."""

    def __init__(self, loop: Loop, dispatch: Callable[[Pending], None], log,
                 waiting_for: Callable[[str], int] = lambda app: 0) -> None:
        self.loop = loop
        self.dispatch = dispatch
        self.waiting_for = waiting_for   # how many of an app's connections are queued
        self.log = log
        self.routes: dict[str, routing.ListenerRoute] = {}
        self.proxy_listeners: frozenset[str] = frozenset()
        self.listeners: dict[str, _Listener] = {}
        self._ready: list[_Listener] = []     # readable in this wakeup, accepted after it
        self._deferred: set[_Listener] = set()   # off the loop while their app's queue is not empty
        self.peeking: dict[int, Pending] = {}   # by fd
        self.parked: dict[int, Pending] = {}    # by fd, oldest first
        # Counters, for /metrics.
        self.accepted = 0
        self.refused_host = 0
        self.refused_proxy = 0
        self.shed = 0
        self.parked_expired = 0   # parked connections closed idle
        # Failed accepts since the last one logged, and when that was.
        self._accept_failures = 0
        self._accept_logged_at = float("-inf")

    def set_routes(self, routes: dict[str, routing.ListenerRoute], proxy: frozenset[str],
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
        """Close the listeners and every connection still peeked at or parked."""
        self.close_listeners()
        for pending in list(self.peeking.values()):
            self._stop_peeking(pending)
            pending.close()
        for pending in list(self.parked.values()):
            self._unpark(pending)
            pending.close()

    def _close_listener(self, listener: _Listener) -> None:
        listener.open = False   # it may be in this wakeup's `_ready` still
        self._deferred.discard(listener)
        if listener.pause_timer is not None:   # off the loop already
            listener.pause_timer.cancel()
            listener.pause_timer = None
        else:
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
        # socket.accept() without its per-call enum conversions, nor a socket object
        # (see Pending) where nothing needs to look at the connection.
        raw_accept, family, kind = listening._accept, int(listening.family), int(listening.type)
        make_socket = socket.socket if direct_app is None else None
        waiting_for = self.waiting_for if direct_app is not None and not listener.forced else None
        listener.forced = False
        for _ in range(ACCEPT_BATCH):
            if waiting_for is not None and waiting_for(direct_app):
                self._defer(listener)
                return
            try:
                fd, peer = raw_accept()
                sock = make_socket(family, kind, 0, fd) if make_socket is not None else fd
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(listener, exc)
                return
            self.accepted += 1
            pending = Pending(sock, peer, name, direct_app, peer[0] if type(peer) is tuple else None,
                              proxy=proxy, family=family)
            if direct_app is not None:
                dispatch(pending)
            else:
                self._start_peeking(pending)

    def _accept_failed(self, listener: _Listener, exc: OSError) -> None:
        """Out of fds: shed, rest, and say so once in a while (see the promises). Any
        other failure (a connection reset before we took it) is only counted and logged."""
        shed = 0
        if exc.errno in _OUT_OF_FDS:
            peeking = self.peeking
            while peeking and shed < SHED_BATCH:
                self._refuse(next(iter(peeking.values())), SHED)   # the oldest: dicts keep order
                shed += 1
            parked = self.parked
            while parked and shed < SHED_BATCH:
                pending = next(iter(parked.values()))
                self._unpark(pending)
                pending.close()
                shed += 1
            self.shed += shed
            if listener.pause_timer is None:
                self.loop.unregister(listener.sock)
                listener.pause_timer = self.loop.call_later(ACCEPT_PAUSE_S, lambda: self._resume(listener))
        self._accept_failures += 1
        now = self.loop.now
        if now - self._accept_logged_at >= ACCEPT_LOG_INTERVAL_S:
            self.log.warning("accept on %s failed: %s (%d failed accepts since the last such line);"
                             " %d connections shed in all", listener.name, exc, self._accept_failures, self.shed)
            self._accept_logged_at = now
            self._accept_failures = 0

    def _resume(self, listener: _Listener) -> None:
        listener.pause_timer = None
        if listener.open:
            self.loop.register(listener.sock, listener.readable)

    def _defer(self, listener: _Listener) -> None:
        """Leave the listener's connections in the backlog while its app's queue is not
        empty (see the promises)."""
        self.loop.unregister(listener.sock)
        listener.pause_timer = self.loop.call_later(ACCEPT_DEFER_S, lambda: self._deferred_too_long(listener))
        self._deferred.add(listener)

    def _deferred_too_long(self, listener: _Listener) -> None:
        self._deferred.discard(listener)
        listener.forced = True
        self._resume(listener)
        self._ready.append(listener)   # accepted in this wakeup, not the next

    def resume_deferred(self) -> None:
        """Take back on the loop, and accept in this wakeup, every deferred listener
        whose app's queue is empty now (call before `accept_ready`)."""
        if not self._deferred:   # (every wakeup comes here)
            return
        for listener in list(self._deferred):
            route = self.routes.get(listener.name)
            if route is not None and route.only_app is not None and self.waiting_for(route.only_app):
                continue
            self._deferred.discard(listener)
            listener.pause_timer.cancel()
            self._resume(listener)
            self._ready.append(listener)

    # -- peeking ---------------------------------------------------------------

    def _start_peeking(self, pending: Pending) -> None:
        sock = pending.sock
        sock.setblocking(False)
        # The head often arrived with the handshake: look before paying for a
        # registration and a timer. One added to epoll while readable reports it, so
        # bytes that arrive in between are not missed.
        if self._peek(pending):
            fd = sock.fileno()
            self.peeking[fd] = pending
            self.loop.register(fd, lambda: self._peek(pending), READ | HANGUP | EDGE)
            pending.peek_timer = self.loop.call_later(PEEK_TIMEOUT_S, lambda: self._refuse(pending, TIMEOUT))

    def _stop_peeking(self, pending: Pending) -> None:
        fd = pending.fd
        if self.peeking.get(fd) is pending:
            del self.peeking[fd]
            # Before the fd travels: its registration would outlive our close while the
            # worker holds the same file.
            self.loop.unregister(fd)
            pending.peek_timer.cancel()
            pending.peek_timer = None

    def _peek(self, pending: Pending) -> bool:
        """Look at what the client sent; True while it must say more."""
        try:
            data = pending.sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        route = self.routes.get(pending.listener)
        if not data or route is None:  # the client left before saying which host, or the listener went away
            self._stop_peeking(pending)
            pending.close()
            return False
        if pending.proxy:
            header = proxyproto.parse(data)
            if header.status != "ok":
                if header.status == "invalid" or len(data) >= PEEK_BYTES:
                    self._refuse(pending, b"")  # not a client: no HTTP answer
                    return False
                return True
            if header.use_peer:
                pending.origin = pending.peer
            else:
                pending.origin = header.source
                if header.source is not None:
                    pending.client = header.source[0]
            data = data[header.consumed:]
        if route.only_app is not None:
            self._stop_peeking(pending)
            pending.app = route.only_app
            self.dispatch(pending)
            return False
        if not data:
            return True
        tls = routing.looks_like_tls(data)
        peek = routing.peek_sni(data) if tls else routing.peek_host(data, PEEK_BYTES)
        if peek.status == "need_more":
            if len(data) >= PEEK_BYTES:
                self._refuse(pending, BAD_REQUEST, tls)
                return False
            return True
        if peek.status == "invalid":
            self._refuse(pending, BAD_REQUEST, tls)
            return False
        app = route.hosts.match(peek.host)
        if app is None:
            self._refuse(pending, MISDIRECTED, tls)
            return False
        self._stop_peeking(pending)
        pending.app = app
        self.dispatch(pending)
        return False

    # -- parked connections ------------------------------------------------------

    def park(self, pending: Pending, idle_s: float) -> None:
        """Watch an idle keep-alive connection (its app and client known) until its next
        request's bytes arrive, it closes, or `idle_s` passes (see the promises)."""
        sock = pending.sock
        sock.setblocking(False)
        fd = sock.fileno()
        self.parked[fd] = pending
        # Edge-triggered: bytes that came before the registration are reported too.
        self.loop.register(fd, lambda: self._parked_readable(pending), READ | HANGUP | EDGE)
        pending.peek_timer = self.loop.call_later(idle_s, lambda: self._parked_expire(pending))

    def _unpark(self, pending: Pending) -> None:
        fd = pending.fd
        if self.parked.get(fd) is pending:
            del self.parked[fd]
            self.loop.unregister(fd)
            pending.peek_timer.cancel()
            pending.peek_timer = None

    def unpark_all(self) -> list[Pending]:
        """Stop watching every parked connection and give them to the caller (a new
        master's balancer takes them over)."""
        parked = list(self.parked.values())
        for pending in parked:
            self._unpark(pending)
        return parked

    def _parked_expire(self, pending: Pending) -> None:
        self.parked_expired += 1
        self._unpark(pending)
        pending.close()

    def _parked_readable(self, pending: Pending) -> None:
        sock = pending.sock
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._unpark(pending)
        if not data:   # the client closed it
            sock.close()
            return
        route = self.routes.get(pending.listener)
        if route is None:   # not a `balance` listener (a `share` one's, handed back at a reload; or no
            self.dispatch(pending)   # longer routed): its own app, as if it had stayed at its worker
        elif route.only_app is not None:
            pending.app = route.only_app
            self.dispatch(pending)
        elif pending.data:   # bytes only the worker vouches for: its own app alone
            self.dispatch(pending)
        else:   # shared by Host: this request's Host says which app
            pending.app = None
            self._start_peeking(pending)

    def _refuse(self, pending: Pending, response: bytes, tls: bool = False) -> None:
        """Answer (when there is an answer: PROXY garbage gets none, nor does a TLS
        client, which would take plain HTTP for garbage) and close."""
        self._stop_peeking(pending)
        if response:
            self.refused_host += 1
        else:
            self.refused_proxy += 1
        answer_and_close(pending.sock, b"" if tls else response)


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
