"""The worker's HTTP server: connections, their requests and the app, on the shared loop.

This is the I/O shell around :mod:`supervisor.http.protocol` (HTTP/1.1 state),
:mod:`supervisor.http.connection` (a connection's socket and state table),
:mod:`supervisor.http.pool` (threads) and :mod:`supervisor.http.wsgi` (calling the app).
It runs on a :class:`supervisor.system.loop.Loop` that the worker shares with its
channels, signals and heartbeat. Promises:

* The loop never blocks on one client while reading a head, nor a body of at most
  ``buffer_body`` bytes (a chunked one: until it passes that), read before the app
  runs, so a slow client holds nothing but its own buffers. A larger body, or one
  after ``Expect: 100-continue``, is streamed: the app runs once the head is in, and
  ``wsgi.input`` reads the socket as the app reads, on the thread running the app
  (pooled, the loop does not watch that socket meanwhile); its 100 Continue goes out
  at the first read. ``max_body_size`` is checked on the head (413 before any body
  byte is read) and as a chunked body arrives.
* A body the app leaves unread is not taken in: the response keeps the connection only
  when at most ``DISCARD_BYTES`` of it are still to come (they are read and dropped as
  the next request's bytes would be; the connection is not IDLE, so never parked or
  handed back, until they are); otherwise it says ``Connection: close``. A connection
  closed while its client may still be sending (that, or an error answer) lingers:
  our side shut, what arrives dropped, for ``LINGER_S`` and ``LINGER_BYTES`` at most,
  so that the close does not reset the response before the client read it.
* Nor while writing: a response goes out as the socket takes it. The app's iterable
  is iterated only while the socket takes every byte; when some must wait, the
  iterable (or the ``wsgi.file_wrapper`` file, sent with non-blocking ``sendfile``
  from its offset) is kept on the connection (WRITING), which waits for writability
  while the loop serves the others, and goes on from there. A client that takes
  nothing for ``write_timeout_s`` (from its last progress, not the response's start)
  is closed, and the iterable with it (``close()``, PEP 3333). A response that fits
  the socket costs what it always did: one ``send``, no registration.
  With ``threads > 1`` the same holds: a pool thread runs the app until its response
  would wait, the loop waits for the socket, and the rest is iterated on a pool
  thread again (the iterable may block, as threaded apps do). So a slow reader holds
  no thread, unlike gunicorn's gthread, whose threads write blocking; and a response
  waiting on its client is not a running app call to the hung-request timeout
  (``oldest_request_age`` counts BUSY connections only).
  Exceptions: a streamed body is read when the app reads it, and an app calling
  ``write()`` (the legacy callable) waits for its client past
  ``connection.OUTBUF_CAP`` unsent bytes; in ``threads == 1`` mode both block the
  loop (bounded by the timeouts).
* Every connection has at most one deadline (``ClientConnection.deadline``) and at
  most one loop timer armed for it: a deadline that moves later keeps the armed
  timer, which re-arms itself when it fires early; one that moves earlier replaces
  it. A connection that leaves the server cancels its timer, so the loop's heap keeps
  nothing of it.
* A connection from a PROXY protocol listener (``proxy_protocol_fds``) or given with
  ``add_connection(proxy_protocol=True)`` must open with a valid PROXY header (see
  :mod:`supervisor.http.proxyproto`) within ``header_timeout_s``; its source address
  becomes the peer. A bad header closes it without a response: that peer is no HTTP
  client. So does any byte from a direct peer (the accepted socket's, or the one a
  balancer's CONN names) that its listener's ``proxy_allow_ips`` does not list.
* A connection of a ``tls_listeners`` listener speaks TLS through a `tls.TLSStream`
  (after its PROXY header, if any): its handshake runs on the loop (HANDSHAKE, under
  the connect's ``header_timeout_s``), so a slow one holds up no one; a file response
  is read and encrypted instead of sendfile'd. It is never parked or handed back (its
  state is in our OpenSSL): a drain answers its next request with Connection: close
  and closes it idle at its keep-alive deadline. A ``redirect_https`` listener's
  requests are answered 308 to https://, never by the app.
* Every socket the server opened or was given is closed by it, except listeners
  (owned by the caller) and connections given to the ``hand_back_with`` callback.
  Every fd it registered on the loop is unregistered when ``run`` returns; the loop
  stays the caller's.
* On a listener that several apps share by Host (``host_tables``), every request is
  checked against the listener's routing, not just the one the balancer routed the
  connection by (see :mod:`supervisor.http.hostcheck`): one for another app, or for
  none, is answered ``421 Misdirected Request`` with ``Connection: close``, and the
  connection is closed; the app never sees it. A connection that was parked (below)
  never gets there: the balancer reads the Host of its next request and passes it to
  that app, so the 421 is left for a connection that stayed here between requests.
* **Parking**: a connection given with ``add_connection(on_park=...)`` (a balancer's)
  that sits IDLE, nothing unparsed and nothing to write, for ``park_after_s`` is given
  to ``on_park(sock, keepalive_left_s)`` (HANDED_BACK), so the balancer can pass its
  next request to whichever worker is free. One that is busy again within that time
  (a hot connection) stays, and costs nothing for it: going IDLE notes the time and
  moves the connection to the end of an insertion-ordered dict (no timer per request);
  one server timer, armed only while some connection is noted idle, parks the oldest
  ones when it fires. A connection is parked only if it was IDLE when the loop last
  polled, with its socket not readable, so its next request's bytes were not already
  waiting for us. 0 turns parking off.
* The access log gets what its format names: a request's response headers and environ
  are kept only when ``access_format`` (the compiled format) says it needs them.
* Methods other than ``stop`` must be called from the loop's thread (from a loop
  handler, or before ``run``); ``stop`` may be called from anywhere.
"""

from __future__ import annotations

import errno
import io
import logging
import select
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

from supervisor.http import protocol as http11
from supervisor.http import proxyproto
from supervisor.http.accesslog import AccessRecord
from supervisor.http.connection import (
    BUSY,
    CLOSED,
    CLOSING,
    HANDED_BACK,
    HANDSHAKE,
    IDLE,
    PROXY,
    READING,
    WRITING,
    ClientConnection,
    wait_fd,
)
from supervisor.http.forwarded import DEFAULT_SECURE_SCHEME_HEADERS
from supervisor.http.hostcheck import HostGate
from supervisor.http.pool import Pool
from supervisor.http.redirect import https_location
from supervisor.http.stats import RequestStats
from supervisor.http.tls import TLSConnection, TLSStream, tls_environ
from supervisor.http.wsgi import (
    BadRequestBody,
    EnvironBuilder,
    Input,
    Outcome,
    RecordingOutcome,
    run_app,
)
from supervisor.system.log import log_access
from supervisor.system.loop import READ, WRITE, Loop

__all__ = ["ServerSettings", "Server"]

DISCARD_BYTES = http11.DISCARD_LIMIT   # unread body a keep-alive response may leave, dropped after it
LINGER_S = 2.0                # a closing connection whose client may still send: how long it is drained
LINGER_BYTES = 1 << 20        # ... and how much of what it sends is dropped, at most
RECV_BYTES = 65536
# Before a one-thread worker's loop runs an app call, a connection idle this long (or
# park_after, if shorter) is parked: its client is not sending back to back.
INLINE_PARK_AFTER_S = 0.0005
ACCEPT_BATCH = 64             # connections accepted per listener per loop iteration
PROXY_REFUSAL_LOG_S = 60.0    # PROXY headers from peers not allowed: one log line per this
_RESUME = None                # a pool item's mode: go on with a response that waited

_SocketType = socket.SocketType   # the C socket type, under socket.socket
_Request, _Data, _EndOfMessage = http11.Request, http11.Data, http11.EndOfMessage
_NEED_DATA, _CONNECTION_CLOSED = http11.NEED_DATA, http11.CONNECTION_CLOSED


@dataclass(frozen=True)
class ServerSettings:
    threads: int = 1
    keepalive_s: float = 5.0
    header_timeout_s: float = 10.0
    limit_request_line: int = 8190
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    max_body_size: int | None = None   # None: no limit
    buffer_body: int = 65536        # bodies up to this size are read by the loop before the app runs
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    forwarded_header: str = "x-forwarded-for"
    secure_scheme_headers: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SECURE_SCHEME_HEADERS))
    write_timeout_s: float = 30.0   # a client that stops reading our response is cut off
    park_after_s: float = 0.0       # a balancer's connection idle this long is parked there (0: never)


def _tcp_option(listener: socket.socket, option: int) -> int | None:
    """A TCP listener's IPPROTO_TCP ``option``; None for a socket that is not TCP (or
    will not say). TCP_NODELAY on the listener is copied to every accepted socket;
    TCP_DEFER_ACCEPT means its connections come with their first bytes."""
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return listener.getsockopt(socket.IPPROTO_TCP, option)
    except OSError:
        return None


def _wake_only() -> None:
    """The waker callback of `Server.stop`: waking the loop is all it takes."""


def _abandon(item) -> None:
    """After shutdown, a pool thread closes the connection it finished."""
    conn = item[0]
    outcome = conn.outcome
    if outcome is not None and outcome.stream is not None:
        outcome.stream.close()
    conn.move(CLOSED)
    conn.sock.close()


class Server:
    """Serve ``app`` on ``listeners`` (non-blocking, possibly shared with other
    processes) and on connections given with ``add_connection``, until stopped.

    Everything runs on ``loop`` (the caller's: it may watch other fds on it, and closes
    it). ``run()`` iterates the loop until the server has stopped: at once for a quick
    stop; for a graceful one, once every connection finished its request and was closed
    or handed back."""

    def __init__(self, app, listeners: list[socket.socket], settings: ServerSettings,
                 error_log: logging.Logger, access_log: logging.Logger | None = None,
                 listener_names: list[str] | None = None,
                 proxy_protocol_fds: frozenset[int] = frozenset(), *, loop: Loop,
                 access_format: Callable | None = None,
                 proxy_allow_ips: Mapping[str, Iterable[str]] | None = None,
                 app_name: str = "", host_tables: Mapping | None = None,
                 tls_context=None, tls_listeners: Iterable[str] = (),
                 redirect_https: Mapping[str, int] | None = None) -> None:
        """``host_tables``: listener name -> `routing.HostTable`, for the listeners
        shared with other apps by Host, on which this is the app named ``app_name``.
        ``tls_listeners``: the listeners (by name) whose connections speak TLS, with
        ``tls_context`` (see `http.tls`: never parked or handed back; a drain answers
        their next request with Connection: close and closes them when idle past
        keep-alive). ``redirect_https``: listener name -> the port every request on it
        is sent to with a 308 to https://."""
        self.app = app
        self._tls_context = tls_context
        self._tls_listeners = frozenset(tls_listeners)
        if self._tls_listeners and tls_context is None:
            raise ValueError("TLS listeners need a TLS context")   # never serve them in the clear
        self._redirects = dict(redirect_https or {})
        self._app_name = app_name
        self._host_tables = dict(host_tables or {})
        # Whose PROXY headers each listener believes (by name; unnamed: the default).
        self._proxy_allow = {name: proxyproto.AllowList(ips) for name, ips in (proxy_allow_ips or {}).items()}
        self._proxy_allow_default = proxyproto.AllowList()
        self._proxy_refusals = proxyproto.RefusalLog(PROXY_REFUSAL_LOG_S)
        self.settings = settings
        self._header_timeout_s = settings.header_timeout_s
        self._keepalive_s = settings.keepalive_s
        self._write_timeout_s = settings.write_timeout_s
        self._park_after_s = settings.park_after_s
        # Parking (see the promises): connections noted idle, oldest first, and the one
        # timer that parks them; what to tell when a pool thread frees.
        self._idle: dict[int, ClientConnection] = {}
        self._park_timer = None
        self._free_watchers: list[Callable[[], None]] = []
        self.error_log = error_log
        self.access_log = access_log
        # What the access format shows beyond the status line and sizes (see accesslog).
        wants = access_log is not None and access_format is not None
        self._keep_environ = wants and bool(getattr(access_format, "needs_environ", False))
        keep_headers = wants and bool(getattr(access_format, "needs_response_headers", False))
        self._outcome_type = RecordingOutcome if keep_headers or self._keep_environ else Outcome
        self._loop = loop
        self._clock = loop.clock
        self._date = http11.DateCache()
        self._conns: dict[int, ClientConnection] = {}
        self._requests_served = 0
        self.stats = RequestStats()   # what the worker's STATS messages say
        self._stopping = False
        self._graceful = True
        self._listening = False
        self._handback: Callable | None = None
        self._builders: dict[str, EnvironBuilder] = {}
        # Per listener whose connections another process accepts: whether they still
        # need TCP_NODELAY set. Its first connection says (a listener with it set gives
        # it to every connection it accepts): one getsockopt per listener instead of a
        # setsockopt per connection.
        self._needs_nodelay: dict[str, bool] = {}
        names = dict(zip((s.fileno() for s in listeners), listener_names or ()))
        # Each listener's accept handler, with what accepting needs to know of it.
        self._accept_handlers: list[tuple[int, Callable[[], None]]] = []
        for sock in listeners:
            sock.setblocking(False)
            fd = sock.fileno()
            self._accept_handlers.append((fd, partial(
                self._accept, sock, self._builder_for(sock), fd in proxy_protocol_fds,
                names.get(fd, ""), _tcp_option(sock, socket.TCP_NODELAY) == 0,
                (int(sock.family), int(sock.type), sock.proto),
                bool(_tcp_option(sock, socket.TCP_DEFER_ACCEPT)), names.get(fd, "") in self._tls_listeners)))
        self._wake = loop.threadsafe_waker(_wake_only)
        self._pool = None
        if settings.threads > 1:
            self._pool = Pool(settings.threads, self._run_pooled, self._pooled_done, _abandon,
                              loop, error_log)
        self._set_listening(True)

    # ---------------------------------------------------------------- public API

    @property
    def requests_served(self) -> int:
        return self._requests_served

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def busy_threads(self) -> int:
        return self._pool.busy if self._pool is not None else 0

    def oldest_request_age(self) -> float | None:
        """Seconds the longest-running app call has run (pool threads only: an inline
        call blocks the loop, and the silence says it). A response waiting for its
        client is not an app call: its connection is WRITING, not BUSY."""
        busy = [conn.busy_since for conn in self._conns.values()
                if conn.state is BUSY and conn.busy_since]
        return round(self._clock() - min(busy), 3) if busy else None

    def running_connections(self) -> list[ClientConnection]:
        """The connections whose request is running (BUSY) now. Any thread may call
        it (the worker's timeout answer does, while the loop may be stuck in the app):
        a snapshot, whose states may move on meanwhile."""
        return [conn for conn in list(self._conns.values()) if conn.state is BUSY]

    def add_connection(self, sock: socket.socket, peer, listener_name: str = "",
                       initial_bytes: bytes = b"", on_close: Callable[[], None] | None = None,
                       proxy_protocol: bool = False,
                       on_park: Callable[[socket.socket, float], None] | None = None,
                       on_started: Callable[[], None] | None = None) -> None:
        """Serve a connection another process accepted. What it sent so far is read at
        once (it usually came with it). ``on_park``: see the promises. ``on_started`` is
        called once, when the connection stops counting as a request about to run: its
        first request holds a pool thread (pooled) or ran (inline), or that first read
        left a request partly here (a slow client holds no thread), or found nothing and
        the connection cannot be parked; else (nothing yet, parkable) when a request
        comes. (A connection that leaves the server first tells ``on_close`` only.)"""
        builder = self._builders.get(listener_name) or self._builder_for(sock, listener_name)
        tls = listener_name in self._tls_listeners
        nodelay = self._needs_nodelay.get(listener_name)
        if nodelay is None:
            nodelay = self._needs_nodelay[listener_name] = _tcp_option(sock, socket.TCP_NODELAY) == 0
        conn = self._new_conn(sock, peer, builder, proxy_protocol, nodelay, tls=tls)
        conn.on_close = on_close
        conn.listener = listener_name
        if on_park is not None and self._park_after_s > 0 and not tls:
            conn.on_park = on_park
        conn.on_started = on_started
        if self._host_tables:
            table = self._host_tables.get(listener_name)
            if table is not None:
                conn.host_gate = HostGate(table, self._app_name)
        if initial_bytes and proxy_protocol:
            self._on_proxy_bytes(conn, initial_bytes)
        elif tls and not proxy_protocol:
            conn.sock.feed(initial_bytes)
            self._on_handshake(conn)
        elif initial_bytes:
            conn.request_started = self._loop.now
            conn.proto.receive_data(initial_bytes)
            self._process(conn)
            self._await_bytes(conn)
        elif not proxy_protocol:
            self._on_readable(conn)
            self._await_bytes(conn)
        self._arm_connect_deadline(conn)
        state = conn.state
        if conn.on_started is not None and (state is READING or state is HANDSHAKE
                                            or (state is IDLE and conn.on_park is None)):
            self._started(conn)
        if conn.on_park is not None and state is IDLE:
            self._note_idle(conn, self._loop.now)

    def watch_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop's thread) each time a pool thread frees."""
        self._free_watchers.append(callback)

    def set_host_tables(self, host_tables: Mapping) -> None:
        """New routing for the listeners shared by Host (a reload changed it without
        restarting this app): it applies to the next request of every connection."""
        self._host_tables = dict(host_tables)
        for conn in self._conns.values():
            table = self._host_tables.get(conn.listener)
            conn.host_gate = None if table is None else HostGate(table, self._app_name)

    def stop(self, graceful: bool) -> None:
        self._stopping = True
        self._graceful = self._graceful and graceful
        self._wake()   # `run` checks between iterations: end the current wait

    def set_park_after(self, seconds: float) -> None:
        """Park idle connections after `seconds` from now on, the ones idle now
        included (connections added while it was 0 stay unparkable)."""
        self._park_after_s = seconds
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        if self._idle and seconds > 0:
            self._park_timer = self._loop.call_at(self._loop.now, self._park_idle)

    def hand_back_with(self, handback: Callable[[socket.socket, bytes, object, str], None]) -> None:
        """On a graceful stop, give idle keep-alive connections to `handback(sock,
        unparsed_bytes, peer, listener_name)` instead of closing them, so a client
        never sees a reload. The callback owns the socket afterwards."""
        self._handback = handback

    def run(self) -> None:
        """Iterate the loop until stopped (and, for a graceful stop, drained); then
        close every connection left and unregister what the server registered."""
        run_once = self._loop.run_once
        try:
            while not (self._stopping and self._drained()):
                run_once()
        finally:
            if self._stopping:
                self._shutdown()

    # ---------------------------------------------------------------- plumbing

    def _builder_for(self, sock: socket.socket, name: str = "") -> EnvironBuilder:
        try:
            addr = sock.getsockname()
        except OSError:
            addr = ""
        if isinstance(addr, tuple):
            host, port = str(addr[0]), str(addr[1])
        else:
            host, port = "localhost", "0"
        builder = EnvironBuilder(server_name=host, server_port=port,
                                 multithread=self.settings.threads > 1,
                                 forwarded_allow_ips=self.settings.forwarded_allow_ips,
                                 forwarded_header=self.settings.forwarded_header,
                                 secure_scheme_headers=self.settings.secure_scheme_headers)
        if name:
            self._builders[name] = builder
        return builder

    def _set_listening(self, on: bool) -> None:
        if on == self._listening or (on and self._stopping):
            return
        loop = self._loop
        for fd, accept in self._accept_handlers:
            if on:
                loop.register(fd, accept)
            else:
                loop.unregister(fd)
        self._listening = on

    def _new_conn(self, sock: socket.socket, peer, builder, proxy: bool = False,
                  nodelay: bool | None = None, tls: bool = False) -> ClientConnection:
        """``nodelay``: whether TCP_NODELAY must be set (None: find out). ``tls``: a
        `TLSConnection`, whose handshake starts now (after its PROXY header, if any)."""
        s = self.settings
        sock.setblocking(False)
        if nodelay is None:
            nodelay = sock.family in (socket.AF_INET, socket.AF_INET6)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = http11.Connection(
            limit_request_line=s.limit_request_line, limit_request_fields=s.limit_request_fields,
            limit_request_field_size=s.limit_request_field_size,
            max_body_size=s.max_body_size, date_cache=self._date, discard_limit=DISCARD_BYTES)
        if tls:
            conn = TLSConnection(sock, peer, builder, proto, s.write_timeout_s, PROXY if proxy else HANDSHAKE,
                                 self._on_deadline)
        else:
            conn = ClientConnection(sock, peer, builder, proto, s.write_timeout_s, PROXY if proxy else IDLE,
                                    self._on_deadline)
        self._conns[conn.fd] = conn
        if tls and not proxy:
            conn.sock = TLSStream(sock, self._tls_context)
            conn.events = READ
            self._loop.register(conn.fd, partial(self._on_handshake, conn))
        elif proxy:
            # Until its header is complete the connection has a handler of its own, so
            # the HTTP read path carries no PROXY test.
            conn.proxy_buf = bytearray()
            conn.events = READ
            self._loop.register(conn.fd, partial(self._on_proxy_readable, conn))
        # else not on the loop yet: its first read is tried at once, and a connection
        # that brought its request and closes after the response never joins the loop
        # (see _await_bytes).
        return conn   # the caller arms its deadline: see _arm_connect_deadline

    def _await_bytes(self, conn: ClientConnection) -> None:
        """After a new plain connection's first read: put it on the loop if it now waits
        for bytes (if it was served and closed, or went to a thread, or waits to write,
        that step saw to it)."""
        if conn.events == 0 and (conn.state is IDLE or conn.state is READING) and self._conns.get(conn.fd) is conn:
            conn.events = READ
            self._loop.register(conn.fd, partial(self._on_readable, conn))

    def _arm_connect_deadline(self, conn: ClientConnection) -> None:
        """Give a new connection its header_timeout_s deadline from the connect, unless
        what it already sent armed one or finished with it. Armed after the bytes that
        came with the connection were served, so a one-request connection that brought
        its request (deferred accept, a balancer's hand-over) never needs a timer."""
        if conn.timer is None and (conn.state is IDLE or conn.state is PROXY or conn.state is HANDSHAKE):
            self._set_deadline(conn, self._loop.now + self._header_timeout_s)

    def _accept(self, lsock: socket.socket, builder, proxy: bool, name: str,
                nodelay: bool, kind: tuple[int, int, int], read_at_once: bool, tls: bool) -> None:
        # A bounded batch: the connections already accepted get read before more come
        # in (the listener stays readable, so the rest wait one iteration).
        loop, header_timeout_s = self._loop, self._header_timeout_s
        for _ in range(ACCEPT_BATCH):
            try:
                # socket.accept() wraps each connection in a socket.socket, converting
                # the listener's family and type to enums on the way: a plain
                # SocketType of the same kind does the same job for a fraction.
                fd, peer = lsock._accept()
                sock = _SocketType(*kind, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds or a connection reset before accept: keep serving.
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    self.error_log.warning("accept failed: %s", exc)
                return
            conn = self._new_conn(sock, peer, builder, proxy, nodelay, tls)
            conn.listener = name
            conn.sole_copy = True   # accepted here: no other process holds the socket
            if read_at_once and not proxy:
                # TCP_DEFER_ACCEPT: the kernel handed it over once its first bytes came,
                # so they are read now rather than after another wait.
                if tls:
                    self._on_handshake(conn)
                else:
                    self._on_readable(conn)
                    self._await_bytes(conn)
                self._arm_connect_deadline(conn)
            else:   # _arm_connect_deadline, inlined: nothing was read, nothing armed
                self._await_bytes(conn)
                deadline = conn.deadline = loop.now + header_timeout_s
                conn.timer = loop.call_at(deadline, conn.deadline_passed)

    # ---------------------------------------------------------------- deadlines

    def _set_deadline(self, conn: ClientConnection, deadline: float) -> None:
        """Move conn's deadline (a time on the loop's clock). Arms a loop timer only
        when the new deadline is earlier than the one armed; a later one is found when
        that fires."""
        conn.deadline = deadline
        timer = conn.timer
        if timer is None or deadline < timer.when:
            if timer is not None:
                timer.cancel()
            conn.timer = self._loop.call_at(deadline, conn.deadline_passed)

    def _on_deadline(self, conn: ClientConnection) -> None:
        conn.timer = None
        if conn.state is BUSY:
            return   # no timeout while the app runs; the deadline set after it arms a timer
        deadline = conn.deadline
        if deadline > self._loop.now:   # moved later since this timer was armed: re-arm
            conn.timer = self._loop.call_at(deadline, conn.deadline_passed)
            return
        if conn.state is READING:
            self._fail(conn, 408, "Request Timeout")
            return
        if conn.state is WRITING:
            self.error_log.info("closing the connection from %s: it took nothing of its response"
                                " for %ss", conn.peer, self._write_timeout_s)
        self._close(conn)   # IDLE, WRITING, CLOSING, PROXY: idle too long, stopped reading, or never spoke

    # ---------------------------------------------------------------- connections leaving

    def _set_events(self, conn: ClientConnection, events: int) -> None:
        if conn.events != events:
            handler = self._on_readable if events == READ else self._on_writable
            if conn.events:
                self._loop.modify(conn.fd, events, partial(handler, conn))
            else:   # a new connection not on the loop yet (see _await_bytes)
                self._loop.register(conn.fd, partial(handler, conn), events)
            conn.events = events

    def _forget(self, conn: ClientConnection, closing: bool) -> None:
        """Take ``conn`` out of the server (and off the loop); it is about to be
        closed (``closing``) or given away."""
        del self._conns[conn.fd]
        if conn.events:
            conn.events = 0
            if closing and conn.sole_copy:
                # Closing the socket's only descriptor drops its epoll registration:
                # an epoll_ctl of our own would be a syscall for nothing.
                self._loop.forget_closed(conn.fd)
            else:
                self._loop.unregister(conn.fd)
        timer = conn.timer
        if timer is not None:
            conn.timer = None
            timer.cancel()
        conn.deadline = 0.0
        if conn.on_park is not None and self._idle.get(conn.fd) is conn:
            del self._idle[conn.fd]   # (its fd number may soon be another connection's)
        if conn.on_close is not None:
            conn.on_close()

    def _close(self, conn: ClientConnection) -> None:
        outcome = conn.outcome
        if outcome is not None and outcome.stream is not None:
            self._cut_short(conn, outcome)
        conn.move(CLOSED)
        self._forget(conn, closing=True)
        if not conn.sole_copy:
            # The balancer may still hold a copy (until our REPORT acknowledges it): the
            # connection ends now, for the client, and its teardown is done here rather
            # than by whichever process closes the last copy.
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):   # (AttributeError: a stream with no shutdown)
                pass
        conn.sock.close()
        conn.proto.close()   # frees the parser now, not at the next cycle collection

    def _end(self, conn: ClientConnection) -> None:
        """A CLOSING connection sent its last bytes: close it, or, if ``conn.linger``
        says its client may still be sending, linger first. Closing a socket with
        unread bytes resets the connection, and the reset can destroy the response
        before the client read it; so we stop writing (the client sees our end) and
        drop what it sends until it closes, for at most LINGER_S and LINGER_BYTES."""
        # A stream that cannot half-close (TLS: its close says close_notify) is closed.
        shutdown = getattr(conn.sock, "shutdown", None) if conn.linger else None
        if shutdown is None:
            self._close(conn)
            return
        try:
            shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        if conn.state is not CLOSING:
            conn.move(CLOSING)   # from BUSY: a response that closes, sent whole
        if conn.events:
            self._loop.modify(conn.fd, READ, partial(self._on_linger, conn))
        else:
            self._loop.register(conn.fd, partial(self._on_linger, conn))
        conn.events = READ
        if conn.on_started is not None:
            self._started(conn)   # it will run no request: a balancer need not wait for it
        self._set_deadline(conn, self._loop.now + LINGER_S)   # CLOSING: closed when it passes

    def _on_linger(self, conn: ClientConnection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if len(data) >= conn.linger or not data:
            self._close(conn)
            return
        conn.linger -= len(data)

    def _drained(self) -> bool:
        """One step of a stop, between loop iterations: True when `run` may end."""
        if self._listening:
            self._set_listening(False)
        if not self._graceful:
            return True
        if self._handback is not None:
            self._hand_back_idle()
        else:
            self._close_idle()
        return not self._conns and not self.busy_threads

    def _hand_back_idle(self) -> None:
        for conn in list(self._conns.values()):
            if (conn.state is IDLE or conn.state is READING) and conn.proto.idle \
                    and conn.__class__ is not TLSConnection:   # (see _close_idle)
                unparsed = conn.proto.unparsed_bytes()
                conn.move(HANDED_BACK)
                self._forget(conn, closing=False)
                conn.proto.close()
                try:
                    self._handback(conn.sock, unparsed, conn.peer, conn.listener)
                except Exception:  # noqa: BLE001 - a failed hand-back must not stop the drain
                    self.error_log.exception("could not hand back a connection")
                    conn.sock.close()

    def _close_idle(self) -> None:
        # An idle TLS connection is left to its keep-alive deadline: its client may be
        # sending a request right now, which is answered (with Connection: close).
        for conn in list(self._conns.values()):
            if conn.state is IDLE and conn.__class__ is not TLSConnection:
                self._close(conn)

    def _shutdown(self) -> None:
        # A connection BUSY on a pool thread is that thread's to close (see Pool).
        pooled = self._pool is not None
        for conn in list(self._conns.values()):
            if conn.state is not BUSY or not pooled:
                self._close(conn)
        if pooled:
            self._pool.shutdown()
        self._set_listening(False)
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        self._idle.clear()

    # ---------------------------------------------------------------- reading

    def _on_readable(self, conn: ClientConnection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            if conn.state is IDLE:
                self._close(conn)
                return
        elif conn.state is IDLE:
            conn.request_started = self._loop.now   # the first bytes of a request
        conn.proto.receive_data(data)
        self._process(conn)

    def _on_proxy_readable(self, conn: ClientConnection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:   # (EINTR is retried by Python itself, PEP 475)
            return
        except OSError:
            data = b""   # a reset: the same as a close, since no response is owed yet
        if not data:
            self._close(conn)
            return
        self._on_proxy_bytes(conn, data)

    def _on_proxy_bytes(self, conn: ClientConnection, data: bytes) -> None:
        """Buffer until the PROXY header is decided; then serve HTTP with its source
        address as the peer (the header_timeout_s deadline set at connect still runs)."""
        buf = conn.proxy_buf
        if not buf and not self._proxy_allowed(conn):
            return
        buf += data
        result = proxyproto.parse(bytes(buf))
        if result.status == "need_more":
            return   # bounded: parse refuses a header longer than proxyproto allows
        if result.status == "invalid":
            self.error_log.warning("closing a connection from %s: bad PROXY header: %s",
                                   conn.peer, result.reason)
            self._close(conn)
            return
        if not result.use_peer:
            conn.peer = result.source
            conn.environ_base = conn.builder.connection_base(conn.peer)
        rest = bytes(buf[result.consumed:])
        conn.proxy_buf = None
        if conn.__class__ is TLSConnection:
            conn.move(HANDSHAKE)
            conn.sock = TLSStream(conn.sock, self._tls_context)
            conn.sock.feed(rest)
            self._loop.modify(conn.fd, READ, partial(self._on_handshake, conn))
            self._on_handshake(conn)
            return
        conn.move(IDLE)
        self._loop.modify(conn.fd, READ, partial(self._on_readable, conn))
        if rest:
            conn.request_started = self._loop.now
            conn.proto.receive_data(rest)
            self._process(conn)

    def _proxy_allowed(self, conn: ClientConnection) -> bool:
        """Is conn's direct peer one whose PROXY header its listener believes? If not,
        close it (nothing it sent reaches the app) and log that, now and then."""
        allow = self._proxy_allow.get(conn.listener, self._proxy_allow_default)
        if allow.allows(conn.peer):
            return True
        unsaid = self._proxy_refusals.note(self._loop.now)
        if unsaid is not None:
            self.error_log.warning(
                "closing a connection from %s: listener %r takes PROXY headers only from its "
                "proxy_allow_ips%s (logged once per %gs)", conn.peer, conn.listener,
                f"; {unsaid} more refused since the last message" if unsaid else "", PROXY_REFUSAL_LOG_S)
        self._close(conn)
        return False

    def _process(self, conn: ClientConnection) -> None:
        """Pull events until a request is complete (then run it) or data runs out."""
        proto = conn.proto
        while True:
            try:
                event = proto.next_event()
            except http11.RemoteProtocolError as exc:
                self._fail(conn, exc.status, exc.reason)
                return
            cls = event.__class__
            if cls is _Request:
                if self._redirects and conn.listener in self._redirects:
                    self._redirect(conn, event)
                    return
                if self._stopping and conn.__class__ is TLSConnection:
                    event.keep_alive = False   # a retiring worker's TLS connection ends after this
                gate = conn.host_gate
                if gate is not None:
                    misdirected = gate.misdirected(event)
                    if misdirected is not None:
                        self.error_log.info("421 to %s on %s: its request is for %s, not this app",
                                            conn.peer, conn.listener, misdirected)
                        self._fail(conn, 421, "Misdirected Request")
                        return
                conn.request = event
                conn.head_at = self._loop.now
                if event.ends_message:   # no body: the request is whole
                    if not self._dispatch(conn, False):
                        return
                elif not self._buffers(event):   # the app reads the body as it arrives
                    if not self._dispatch(conn, True):
                        return
            elif cls is _EndOfMessage:
                if conn.request is None:
                    proto.start_next_cycle()
                    continue
                if not self._dispatch(conn, False):
                    return
            elif cls is _Data:
                if conn.request is None:
                    continue          # the rest of a body the app left unread: dropped
                conn.body.append(event.data)
                conn.body_len += len(event.data)
                if conn.body_len > self.settings.buffer_body:
                    # A chunked body longer than the loop buffers: the app reads the
                    # rest of it, after what is here.
                    if not self._dispatch(conn, True):
                        return
            elif event is _NEED_DATA:
                # The head must be complete header_timeout_s after its first byte; a
                # body's timeout is about inactivity, so progress re-arms it.
                if conn.state is IDLE:
                    conn.move(READING)
                    self._set_deadline(conn, self._loop.now + self._header_timeout_s)
                elif conn.body_len and conn.request is not None:
                    self._set_deadline(conn, self._loop.now + self._header_timeout_s)
                return
            elif event is _CONNECTION_CLOSED:
                self._close(conn)   # IDLE or READING: nothing of ours waits to go out
                return
            else:   # PAUSED: a response is still going out
                return

    def _buffers(self, request: http11.Request) -> bool:
        """Does the loop read ``request``'s body before the app runs? Only up to
        ``buffer_body`` bytes (a chunked one: until it passes that), and never one
        whose client awaits a 100 Continue, which the app's first read sends."""
        limit = self.settings.buffer_body
        if not limit or request.expects_continue:
            return False
        return request.chunked or request.content_length <= limit

    def _fail(self, conn: ClientConnection, status: int, reason: str) -> None:
        """Answer a protocol error with Connection: close, then close (lingering: the
        client may be sending what we will not read, a body say)."""
        response, size = self._error_response(status, reason)
        conn.linger = LINGER_BYTES
        self.stats.answered(str(status), self._loop.now - conn.head_at if conn.request is not None else 0.0)
        conn.move(CLOSING)
        conn.request = None
        if self.access_log is not None:
            self._log_access(conn, None, str(status), size, None)
        self._queue_out(conn, response)

    def _on_handshake(self, conn: ClientConnection) -> None:
        """Drive ``conn``'s TLS handshake (HANDSHAKE) as far as its socket lets it;
        once done, its environs say https (and who the client is), and it is read."""
        try:
            wants = conn.sock.handshake()
        except (OSError, ValueError) as exc:   # ssl.SSLError is an OSError
            self.error_log.debug("TLS handshake with %s failed: %s", conn.peer, exc)
            self._close(conn)
            return
        if wants:
            if conn.events != wants:
                conn.events = wants
                self._loop.modify(conn.fd, wants, partial(self._on_handshake, conn))
            return
        conn.move(IDLE)
        conn.environ_base.update(tls_environ(conn.sock.obj))
        conn.events = READ
        self._loop.modify(conn.fd, READ, partial(self._on_readable, conn))
        self._on_readable(conn)   # a request that came with the client's Finished

    def _redirect(self, conn: ClientConnection, request: http11.Request) -> None:
        """A request on a `redirect_https` listener: 308 to the same URL in https,
        never the app; the connection closes after it."""
        host = next((value.decode("latin-1") for name, value in request.headers if name.lower() == b"host"), None)
        location = https_location(host, request.target.decode("latin-1"), self._redirects[conn.listener],
                                  conn.environ_base.get("SERVER_NAME", "localhost"))
        body = f"308 Permanent Redirect: {location}\n".encode("latin-1")
        head = (f"HTTP/1.1 308 Permanent Redirect\r\nServer: baton\r\nDate: {self._date.get()}\r\n"
                f"Location: {location}\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        conn.move(CLOSING)
        conn.request = None
        if self.access_log is not None:
            self._log_access(conn, request, "308", len(body), None)
        self._queue_out(conn, head.encode("latin-1") + body)

    def _error_response(self, status: int, reason: str) -> tuple[bytes, int]:
        """A whole error response that closes the connection, and its body's size."""
        body = f"{status} {reason}\n".encode("latin-1", "replace")
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
                f"Server: baton\r\nDate: {self._date.get()}\r\nConnection: close\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode("latin-1") + body, len(body)

    def _queue_out(self, conn: ClientConnection, data: bytes) -> None:
        """Send a CLOSING connection's last bytes: what the socket takes now, the rest
        on writability; then close (see _end)."""
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent == len(data):
            self._end(conn)
            return
        conn.outbuf += data[sent:]
        self._set_events(conn, WRITE)
        self._set_deadline(conn, self._loop.now + self._write_timeout_s)

    def _on_writable(self, conn: ClientConnection) -> None:
        outbuf = conn.outbuf
        if outbuf:   # (empty when a sendfile waited for room)
            try:
                sent = conn.sock.send(outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            del outbuf[:sent]
            if outbuf:
                self._set_deadline(conn, self._loop.now + self._write_timeout_s)
                return
        if conn.state is CLOSING:
            self._end(conn)
            return
        if conn.outcome is not None:   # the app's response has more to come
            self._resume(conn)
            return
        proto = conn.proto
        if self._next_request(conn, proto.has_unparsed or proto.body_pending, self._loop.now):   # WRITING
            self._process(conn)

    # ---------------------------------------------------------------- running the app

    def _dispatch(self, conn: ClientConnection, stream: bool) -> bool:
        """Run the request (``stream``: the app reads its body as it arrives, after
        what ``conn.body`` holds); True when bytes of ``conn``'s next request wait to be
        parsed (inline mode; a loop instead of recursion keeps deep pipelines safe)."""
        conn.move(BUSY)
        self.stats.started()
        pool = self._pool
        if pool is None:
            if self._park_timer is not None:
                self._park_before_inline()
            self._handle(conn, stream)
            # The clock read again: the app may have taken long, and the deadlines set
            # next count from the end of its response.
            more = self._finish(conn, self._clock())
            if conn.on_started is not None:
                self._started(conn)
            return more
        # The connection leaves the loop while a thread owns it.
        if conn.events:
            self._loop.unregister(conn.fd)
            conn.events = 0
        conn.busy_since = self._loop.now
        pool.submit((conn, stream))
        if pool.busy >= pool.size:
            self._set_listening(False)   # don't accept what no thread can serve
        if conn.on_started is not None:
            self._started(conn)
        return False

    @staticmethod
    def _started(conn: ClientConnection) -> None:
        started, conn.on_started = conn.on_started, None
        started()

    def _run_pooled(self, item) -> None:
        """On a pool thread."""
        conn, stream = item
        if stream is _RESUME:
            outcome = conn.outcome
            if outcome.stream.advance():
                outcome.stream = None
            return
        self._handle(conn, stream)

    def _pooled_done(self, item) -> None:
        """Back on the loop's thread: the app call of a pooled request finished."""
        conn = item[0]
        conn.events = READ
        self._loop.register(conn.fd, partial(self._on_readable, conn))
        if self._finish(conn, self._loop.now):
            self._process(conn)
        if not self._listening:
            self._set_listening(True)   # (not while stopping: _set_listening checks)
        for watcher in self._free_watchers:
            watcher()

    def _handle(self, conn: ClientConnection, stream: bool) -> None:
        """Run the app for conn.request (in the loop thread or a pool thread), as far
        as the socket takes its response (the rest: conn.outcome.stream)."""
        request = conn.request
        proto = conn.proto
        body = conn.body
        if stream:
            wsgi_input = Input(self._make_pull(conn), b"".join(body))
            conn.body = []   # the input holds it now
        elif conn.body_len:
            wsgi_input = io.BytesIO(body[0] if len(body) == 1 else b"".join(body))
        else:
            wsgi_input = io.BytesIO()
        environ = conn.builder.build_from(conn.environ_base, request, wsgi_input)
        outcome = conn.outcome = run_app(self.app, environ, proto, request, conn.send_inline,
                                         self.error_log, conn.sendfile, self._outcome_type)
        if conn.body_error is not None:
            self._answer_bad_body(conn, outcome)
        if self._keep_environ:
            outcome.environ = environ

    def _answer_bad_body(self, conn: ClientConnection, outcome: Outcome) -> None:
        """The app read a body that broke the protocol (or passed max_body_size, or
        stopped coming for header_timeout_s): the client is told so (400, 413, 408),
        as for any bad request, unless the app answered already, having caught the
        error; and the connection closes."""
        outcome.must_close = True
        if outcome.head_sent:
            return
        error = conn.body_error
        response, size = self._error_response(error.status, error.reason)
        outcome.head_sent = True
        outcome.status = str(error.status)
        try:
            conn.send_blocking(response)
            outcome.sent = size
        except OSError:
            pass

    def _make_pull(self, conn: ClientConnection):
        """The body source of a streamed ``wsgi.input``: read from the socket as the
        app reads, on the thread running the app (the loop does not watch the socket
        meanwhile: inline, it is the same thread; pooled, the fd is unregistered).

        Its first call sends the 100 Continue a client may await. A body that breaks
        the protocol or passes max_body_size raises BadRequestBody; one whose client
        sends nothing for header_timeout_s raises TimeoutError; both are kept in
        ``conn.body_error`` (see _answer_bad_body). A client that closes raises
        ConnectionResetError. Each piece that arrives restarts the request's clock for
        the hung-request timeout (``busy_since``): a client uploading is not a stuck app."""
        proto = conn.proto
        timeout_s = self.settings.header_timeout_s
        clock = self._clock
        must_continue = [conn.request.expects_continue]

        def pull() -> bytes:
            if conn.body_error is not None:
                raise BadRequestBody(f"bad request body: {conn.body_error.reason}")
            if must_continue[0]:
                must_continue[0] = False
                if proto.body_pending:   # (a client that sent its body anyway needs no 100)
                    conn.send_blocking(proto.interim_continue())
            while True:
                try:
                    event = proto.next_event()
                except http11.RemoteProtocolError as exc:
                    conn.body_error = exc
                    raise BadRequestBody(f"bad request body: {exc.reason}") from None
                if event.__class__ is http11.Data:
                    return event.data
                if event is not http11.NEED_DATA:
                    return b""   # EndOfMessage (then PAUSED): the body's end
                try:
                    wait_fd(conn.fd, select.POLLIN, timeout_s)
                except TimeoutError:
                    conn.body_error = http11.RemoteProtocolError(408, "request body timed out")
                    raise TimeoutError(f"no byte of the request body for {timeout_s}s") from None
                try:
                    data = conn.sock.recv(RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                proto.receive_data(data)
                if not data:
                    raise ConnectionResetError("client closed during the request body")
                conn.busy_since = clock()
        return pull

    def _finish(self, conn: ClientConnection, now: float) -> bool:
        """Back in the loop thread after the app ran (at ``now``): log, then next
        request or close.

        True when bytes of ``conn``'s next request wait to be parsed."""
        outcome = conn.outcome
        if outcome is not None and outcome.stream is not None:
            # The response waits for the socket: the request is not over yet.
            conn.move(WRITING)
            self._set_events(conn, WRITE)
            self._set_deadline(conn, now + self._write_timeout_s)
            return False
        request = conn.request
        self._requests_served += 1
        self.stats.finished(outcome.status if outcome is not None else "500", now - conn.head_at)
        if self.access_log is not None and outcome is not None:
            self._log_access(conn, request, outcome.status, outcome.sent, outcome)
        conn.request = None
        if conn.body_len or conn.body:
            conn.body = []
            conn.body_len = 0
        conn.outcome = None
        proto = conn.proto
        if outcome is None or outcome.must_close or not proto.response_keep_alive:
            if proto.body_pending:
                conn.linger = LINGER_BYTES   # the client may still be sending that body
            if conn.outbuf:
                conn.move(CLOSING)
                self._set_events(conn, WRITE)
                self._set_deadline(conn, now + self._write_timeout_s)
            else:
                self._end(conn)
            return False
        # A body the app left unread (at most discard_limit more bytes, as the response
        # said keep-alive) is read and dropped as the next request's bytes would be.
        pending = proto.start_next_cycle() or proto.body_pending
        if conn.outbuf:
            conn.move(WRITING)
            self._set_events(conn, WRITE)
            self._set_deadline(conn, now + self._write_timeout_s)
            return False
        # _next_request, inlined for the way every keep-alive request ends (the
        # connection is registered for reading: inline, it never left; pooled, it is
        # back).
        if self._stopping and not pending and self._handback is None:
            self._close(conn)
            return False
        if pending:
            conn.move(READING)
            conn.request_started = now
            self._set_deadline(conn, now + self._header_timeout_s)
            return True
        conn.move(IDLE)
        deadline = conn.deadline = now + self._keepalive_s
        timer = conn.timer
        if timer is None or deadline < timer.when:
            self._set_deadline(conn, deadline)
        if conn.on_park is not None:
            self._note_idle(conn, now)
        return False

    def _resume(self, conn: ClientConnection) -> None:
        """``conn`` (WRITING) sent what its response left waiting: iterate the rest
        of the app's response (here, or on a pool thread as its app call was)."""
        conn.move(BUSY)
        pool = self._pool
        if pool is not None:
            if conn.events:
                self._loop.unregister(conn.fd)
                conn.events = 0
            conn.busy_since = self._loop.now
            pool.submit((conn, _RESUME))
            if pool.busy >= pool.size:
                self._set_listening(False)
            return
        outcome = conn.outcome
        if outcome.stream.advance():
            outcome.stream = None
            if not conn.outbuf:
                self._set_events(conn, READ)   # _finish expects a connection read from
        if self._finish(conn, self._clock()):
            self._process(conn)

    def _cut_short(self, conn: ClientConnection, outcome: Outcome) -> None:
        """The connection closes before its response was whole (the client stopped
        reading or went away, or the server stops): close the app's iterable, and
        log the request with what it got."""
        stream, outcome.stream = outcome.stream, None
        stream.close()
        outcome.must_close = True
        self._requests_served += 1
        self.stats.finished(outcome.status, self._loop.now - conn.head_at)
        if self.access_log is not None:
            self._log_access(conn, conn.request, outcome.status, outcome.sent, outcome)

    def _next_request(self, conn: ClientConnection, pending: bool, now: float) -> bool:
        """Prepare ``conn`` (WRITING, its response sent at ``now``) to wait for its
        next request, of which something is already here if ``pending`` (`_finish` has
        its own copy of this). True when that is to be parsed now;
        False when the connection was closed, or must wait for bytes (a peer's close is
        then seen by the next read)."""
        if self._stopping and not pending and self._handback is None:
            self._close(conn)   # draining: an idle keep-alive connection is closed
            return False        # (with a hand-back, the drain step gives it away instead)
        if conn.events != READ:
            self._set_events(conn, READ)
        if pending:
            conn.move(READING)
            conn.request_started = now
            self._set_deadline(conn, now + self._header_timeout_s)
            return True
        conn.move(IDLE)
        self._set_deadline(conn, now + self._keepalive_s)
        if conn.on_park is not None:
            self._note_idle(conn, now)
        return False

    # ---------------------------------------------------------------- parking

    def _note_idle(self, conn: ClientConnection, now: float) -> None:
        """``conn`` went IDLE at ``now``: to the end of the idle dict (its order is the
        order of these times), and the park timer armed if it is not."""
        conn.idle_since = now
        idle = self._idle
        fd = conn.fd
        if fd in idle:
            del idle[fd]
        idle[fd] = conn
        if self._park_timer is None:
            self._park_timer = self._loop.call_at(now + self._park_after_s, self._park_idle)

    def _park_before_inline(self) -> None:
        """The loop is about to be held by an app call, which may be long: park now the
        connections idle for INLINE_PARK_AFTER_S already (not only those due), since no
        timer fires meanwhile, so that their next requests go to a free worker instead of
        waiting behind this one. A connection whose client sends again at once (idle for
        less, or its next request in its socket already) stays: it is hot, and parking it
        would cost more than it spares; so does everything while the loop is busy (more
        than one fd was ready at its wakeup), when its connections queue anyway."""
        if self._loop.batch > 1:
            return   # a busy loop: what is idle here is most likely read next, not parked
        first = next(iter(self._idle.values()), None)
        if first is None or first.idle_since > self._loop.now - min(self._park_after_s, INLINE_PARK_AFTER_S):
            return
        self._park_timer.cancel()
        self._park_idle(min(self._park_after_s, INLINE_PARK_AFTER_S), hot_stays=True)

    def _park_idle(self, after_s: float | None = None, hot_stays: bool = False) -> None:
        """The park timer: park every connection IDLE since before the last poll by
        ``park_after_s`` (or `after_s`); entries of connections busy again (noted anew
        when idle) or gone are dropped; the timer is armed again for the oldest left.
        `hot_stays`: one whose next request is in its socket already (this loop has not
        read it yet) is not parked but left to be read."""
        self._park_timer = None
        idle = self._idle
        if self._stopping:
            idle.clear()   # a drain hands idle connections back (or closes them) itself
            return
        limit = self._loop.now - (self._park_after_s if after_s is None else after_s)
        conns = self._conns
        while idle:
            fd, conn = next(iter(idle.items()))
            if conn.state is not IDLE or conns.get(fd) is not conn:
                del idle[fd]
                continue
            if conn.idle_since > limit:
                self._park_timer = self._loop.call_at(conn.idle_since + self._park_after_s, self._park_idle)
                return
            del idle[fd]
            if conn.events == READ and not conn.outbuf and not conn.proto.has_unparsed and conn.proto.idle:
                if hot_stays and _has_bytes(conn.sock):
                    continue
                self._park(conn)

    def _park(self, conn: ClientConnection) -> None:
        on_park = conn.on_park
        left_s = max(0.0, conn.deadline - self._loop.now)
        conn.move(HANDED_BACK)
        conn.on_close = None   # the hand-back itself tells the balancer it ended here
        self._forget(conn, closing=False)
        conn.proto.close()
        try:
            on_park(conn.sock, left_s)
        except Exception:  # noqa: BLE001 - a failed park must not stop the serving loop
            self.error_log.exception("could not park a connection")
            conn.sock.close()

    def _log_access(self, conn: ClientConnection, request, status: str, sent: int,
                    outcome: Outcome | None) -> None:
        # Only called when an access log is configured; the line is formatted by the
        # log handler, and only if the record is emitted.
        headers, environ = (), None
        if outcome is not None and outcome.__class__ is RecordingOutcome:
            headers, environ = outcome.headers, outcome.environ
        log_access(self.access_log, AccessRecord.for_request(
            conn.peer, request, status, sent, conn.request_started or self._loop.now,
            self._clock(), headers, environ))


def _has_bytes(sock) -> bool:
    """Whether bytes (or the client's EOF) wait to be read on `sock`."""
    try:
        sock.recv(1, _PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True   # an error to be read: the loop's read will see it
    return True


_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 421: "Misdirected Request",
            414: "URI Too Long", 431: "Request Header Fields Too Large"}
