"""The worker's serving loop: one selector, many connections, the app inline or on threads.

This is the I/O shell around :mod:`supervisor.http11` (protocol state) and
:mod:`supervisor.wsgi` (calling the app). Promises:

* The loop never blocks on one client while reading: only a complete request
  (head and whole body, spooled to a temp file past ``SPOOL_BYTES``) reaches the
  application, so a slow client holds nothing but its own buffers.
  Exceptions: a request with ``Expect: 100-continue`` reads its body when the app
  does, and a ``wsgi.file_wrapper`` response is sent to completion; in
  ``threads == 1`` mode both block the loop (bounded by the timeouts).
* Every connection has at most one deadline (``_Conn.deadline``); the selector waits
  for the nearest. The heap holds at most a few entries per live connection: an entry
  is re-armed lazily when it fires early, and the heap is compacted when stale entries
  (closed connections, superseded deadlines) outnumber live ones.
* A connection from a PROXY protocol listener (``proxy_protocol_fds``) or given with
  ``add_connection(proxy_protocol=True)`` must open with a valid PROXY header (see
  :mod:`supervisor.proxyproto`) within ``header_timeout_s``; its source address becomes
  the peer. A bad header closes it without a response: that peer is no HTTP client.
* Every socket the server opened or was given is closed by it, except listeners
  (owned by the caller) and connections detached by ``take_idle_connections``.
* Methods other than ``stop`` must be called from the loop's thread (from a
  ``watch`` callback, or before ``run``); ``stop`` may be called from anywhere.
"""

from __future__ import annotations

import errno
import functools
import heapq
import io
import itertools
import logging
import os
import select
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.http import protocol as http11
from supervisor.http import proxyproto
from supervisor.http.accesslog import AccessRecord
from supervisor.http.wsgi import EnvironBuilder, Input, run_app
from supervisor.system.log import log_access

__all__ = ["ServerSettings", "Server"]

SPOOL_BYTES = 1 << 20         # request bodies larger than this go to a temp file
OUTBUF_CAP = 1 << 20          # inline mode: buffer this much unsent response, then wait
RECV_BYTES = 65536
ACCEPT_BATCH = 64             # connections accepted per listener per loop iteration
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_LISTENER, _CONN, _WATCH, _WAKEUP = 0, 1, 2, 3
_READ, _WRITE = select.EPOLLIN, select.EPOLLOUT
_SocketType = socket.SocketType   # the C socket type, under socket.socket
_Request, _Data, _EndOfMessage = http11.Request, http11.Data, http11.EndOfMessage
_NEED_DATA, _CONNECTION_CLOSED = http11.NEED_DATA, http11.CONNECTION_CLOSED
# Connection states.
# _PROXY: awaiting its PROXY header. Its client is not known yet, so such a connection
# is never taken or handed back (both want _READING); header_timeout_s bounds the wait.
_READING, _BUSY, _WRITING, _CLOSING, _PROXY = 0, 1, 2, 3, 4
_IDLE, _STARTED, _TIMED = 0, 1, 2   # _Conn.started


@dataclass(frozen=True)
class ServerSettings:
    threads: int = 1
    keepalive_s: float = 5.0
    header_timeout_s: float = 10.0
    limit_request_line: int = 8190
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    max_body_size: int | None = None
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    write_timeout_s: float = 30.0   # a client that stops reading our response is cut off


class _Conn:
    __slots__ = ("sock", "fd", "peer", "builder", "environ_base", "proto", "state", "outbuf",
                 "deadline", "armed", "request", "body", "body_len", "spool", "events", "started",
                 "outcome", "continue_input", "on_close", "listener", "proxy_buf",
                 "write_timeout_s", "busy_since", "request_started", "sole_copy")

    def __init__(self, sock, peer, builder, proto, write_timeout_s: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.builder = builder
        self.environ_base = builder.connection_base(peer)
        self.proto = proto
        self.state = _READING
        self.outbuf = bytearray()
        self.deadline = 0.0        # when the current timeout fires (0: none)
        self.armed = 0.0           # the deadline of this connection's live heap entry
        self.request = None
        self.body = []
        self.body_len = 0
        self.spool = None
        self.events = 0
        # Whether bytes of the current request arrived: _IDLE, _STARTED, or _TIMED once
        # its header_timeout_s deadline is armed (only if the request is not complete in
        # the first read: most are, and never need one).
        self.started = _IDLE
        self.outcome = None
        self.continue_input = None
        self.busy_since = 0.0      # when a pool thread took its current request
        self.request_started = 0.0  # when the current request's first byte arrived (access log)
        self.on_close = None       # told when the connection leaves this server
        self.listener = ""         # the listener's name, for a hand-back
        self.proxy_buf = None      # bytes of a PROXY header still arriving (state _PROXY)
        self.write_timeout_s = write_timeout_s
        self.sole_copy = False     # True: closing our fd closes the socket (see _forget)

    # The app's output, as run_app's send / sendfile (bound methods: no per-request
    # closures, no reference cycles).

    def send_inline(self, data: bytes) -> None:
        """Send from the loop's thread: what the socket does not take waits in outbuf."""
        outbuf = self.outbuf
        if not outbuf:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        outbuf += data
        # Keep memory bounded for a big streamed response: wait for the client.
        while len(outbuf) > OUTBUF_CAP:
            _wait_fd(self.fd, select.POLLOUT, self.write_timeout_s)
            try:
                del outbuf[:self.sock.send(outbuf)]
            except (BlockingIOError, InterruptedError):
                pass

    def send_blocking(self, data: bytes) -> None:
        """Send everything from a pool thread (the connection is off the selector)."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                _wait_fd(self.fd, select.POLLOUT, self.write_timeout_s)
                continue
            view = view[sent:]

    def sendfile(self, fileobj, offset: int, count: int) -> int:
        while self.outbuf:
            _wait_fd(self.fd, select.POLLOUT, self.write_timeout_s)
            try:
                del self.outbuf[:self.sock.send(self.outbuf)]
            except (BlockingIOError, InterruptedError):
                pass
        while True:
            try:
                return os.sendfile(self.fd, fileobj.fileno(), offset, count)
            except (BlockingIOError, InterruptedError):
                _wait_fd(self.fd, select.POLLOUT, self.write_timeout_s)


class _Poller:
    """epoll with the data of each fd in a dict: what ``selectors`` does, without a
    key object per registration and a translated event list per wait."""

    __slots__ = ("_epoll", "data")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.data: dict[int, tuple] = {}   # fd -> (kind, object)

    @staticmethod
    def _fd(fileobj) -> int:
        return fileobj if type(fileobj) is int else fileobj.fileno()

    def register(self, fileobj, events: int, data: tuple) -> None:
        fd = self._fd(fileobj)
        if fd in self.data:
            raise KeyError(f"fd {fd} is already registered")
        self._epoll.register(fd, events)
        self.data[fd] = data

    def modify(self, fileobj, events: int, data: tuple) -> None:
        fd = self._fd(fileobj)
        self._epoll.modify(fd, events)
        self.data[fd] = data

    def unregister(self, fileobj) -> None:
        fd = self._fd(fileobj)
        del self.data[fd]   # KeyError when not registered
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass   # already closed: the kernel dropped it

    def poll(self, timeout_s: float | None) -> list[tuple[int, int]]:
        return self._epoll.poll(-1 if timeout_s is None else timeout_s)

    def close(self) -> None:
        self._epoll.close()
        self.data.clear()


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


def _wait_fd(fd: int, mask: int, timeout_s: float) -> None:
    poller = select.poll()
    poller.register(fd, mask)
    if not poller.poll(max(0.0, timeout_s) * 1000):
        raise TimeoutError("peer did not become ready in time")


class Server:
    """Serve ``app`` on ``listeners`` (non-blocking, possibly shared with other
    processes) and on connections given with ``add_connection``, until stopped."""

    def __init__(self, app, listeners: list[socket.socket], settings: ServerSettings,
                 error_log: logging.Logger, access_log: logging.Logger | None = None,
                 listener_names: list[str] | None = None,
                 proxy_protocol_fds: frozenset[int] = frozenset()) -> None:
        self.app = app
        self.settings = settings
        self._header_timeout_s = settings.header_timeout_s
        self._keepalive_s = settings.keepalive_s
        self._write_timeout_s = settings.write_timeout_s
        self.error_log = error_log
        self.access_log = access_log
        self._selector = _Poller()
        self._date = http11.DateCache()
        self._conns: dict[int, _Conn] = {}
        self._timers: list = []             # (deadline, seq, conn), see _set_deadline
        self._timer_seq = itertools.count()
        self._now = time.monotonic()        # read once per loop iteration
        self._requests_served = 0
        self._busy = 0
        self._stopping = False
        self._graceful = True
        self._listening = False
        self._listeners = list(listeners)
        self._listener_names = dict(zip((s.fileno() for s in self._listeners), listener_names or ()))
        self._proxy_fds = proxy_protocol_fds   # listeners whose connections open with PROXY
        self._handback: Callable | None = None
        self._tick: tuple[float, Callable[[], None]] | None = None
        self._shut_down = False  # pool threads close what they finish after this
        self._tick_at = float("inf")
        self._after_events: Callable[[], None] | None = None
        self._builders: dict[str, EnvironBuilder] = {}
        self._listener_builders = []
        for sock in self._listeners:
            sock.setblocking(False)
            self._listener_builders.append(self._builder_for(sock))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ, (_WAKEUP, None))
        self._done: deque = deque()          # conns whose app call finished (threads > 1)
        self._work = None
        self._threads: list[threading.Thread] = []
        if settings.threads > 1:
            import queue
            self._work = queue.SimpleQueue()
            for i in range(settings.threads):
                t = threading.Thread(target=self._worker_thread, name=f"baton-http-{i}",
                                     daemon=True)
                t.start()
                self._threads.append(t)
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
        return self._busy

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        self._selector.register(fd, _READ, (_WATCH, on_readable))

    def every(self, interval_s: float, callback: Callable[[], None]) -> None:
        """Call `callback` from the loop every `interval_s` (a heartbeat: it stops
        when the loop is stuck, which is the point)."""
        self._tick = (interval_s, callback)
        self._tick_at = time.monotonic() + interval_s

    def after_events(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once per loop iteration, after that wakeup's events were
        handled and before the next wait: where reports gathered meanwhile (one
        message for many connections) go out."""
        self._after_events = callback

    def oldest_request_age(self) -> float | None:
        """Seconds the longest-running app call has run (pool threads only: an inline
        call blocks the loop, and the silence says it)."""
        busy = [conn.busy_since for conn in self._conns.values() if conn.state == _BUSY and conn.busy_since]
        return round(time.monotonic() - min(busy), 3) if busy else None

    def unwatch(self, fd: int) -> None:
        self._selector.unregister(fd)

    def add_connection(self, sock: socket.socket, peer, listener_name: str = "",
                       initial_bytes: bytes = b"", on_close: Callable[[], None] | None = None,
                       proxy_protocol: bool = False) -> None:
        builder = self._builders.get(listener_name) or self._builder_for(sock, listener_name)
        self._now = time.monotonic()   # may be called between loop iterations
        conn = self._new_conn(sock, peer, builder, proxy_protocol)
        conn.on_close = on_close
        conn.listener = listener_name
        if initial_bytes and proxy_protocol:
            self._on_proxy_bytes(conn, initial_bytes)
        elif initial_bytes:
            conn.started = _STARTED
            conn.request_started = self._now
            conn.proto.receive_data(initial_bytes)
            self._process(conn)

    def stop(self, graceful: bool) -> None:
        self._stopping = True
        self._graceful = self._graceful and graceful
        try:
            self._wake_w.send(b"s")
        except OSError:
            pass

    def hand_back_with(self, handback: Callable[[socket.socket, bytes, object, str], None]) -> None:
        """On a graceful stop, give idle keep-alive connections to `handback(sock,
        unparsed_bytes, peer, listener_name)` instead of closing them, so a client
        never sees a reload. The callback owns the socket afterwards."""
        self._handback = handback

    def take_idle_connections(self) -> list[tuple[socket.socket, bytes]]:
        taken = []
        for conn in list(self._conns.values()):
            if conn.state == _READING and not conn.outbuf and conn.proto.idle:
                self._forget(conn)
                conn.sock.setblocking(True)
                taken.append((conn.sock, conn.proto.unparsed_bytes()))
        return taken

    def run(self) -> None:
        poll = self._selector.poll
        fd_data = self._selector.data
        timers = self._timers
        self._now = time.monotonic()
        try:
            while True:
                if self._stopping:
                    if self._listening:
                        self._set_listening(False)
                    if not self._graceful:
                        return
                    if self._handback is not None:
                        self._hand_back_idle()
                    else:
                        self._close_idle()
                    if not self._conns and not self._busy:
                        return
                timeout = None
                if timers:
                    # From the clock read after the last wait: a timer may fire late
                    # by one iteration's work, never early.
                    timeout = max(0.0, timers[0][0] - self._now)
                if self._tick is not None:
                    tick_in = max(0.0, self._tick_at - self._now)
                    timeout = tick_in if timeout is None else min(timeout, tick_in)
                events = poll(timeout)
                self._now = time.monotonic()
                if self._now >= self._tick_at:
                    self._tick_at = self._now + self._tick[0]
                    self._tick[1]()
                for fd, _ in events:
                    # Looked up now, not at the wait: an earlier handler of this batch
                    # may have closed the fd (or a new connection may reuse it).
                    data = fd_data.get(fd)
                    if data is None:
                        continue
                    kind, obj = data
                    if kind == _CONN:
                        # A connection waits for one direction only; an error or a
                        # hang-up is noticed by the recv or send it triggers.
                        if obj.events == _READ:
                            self._on_readable(obj)
                        else:
                            self._on_writable(obj)
                    elif kind == _LISTENER:
                        self._accept(*obj)
                    elif kind == _WAKEUP:
                        self._on_wakeup()
                    else:
                        obj()
                if timers and timers[0][0] <= self._now:
                    self._expire(self._now)
                if self._after_events is not None:
                    self._after_events()
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
                                 forwarded_allow_ips=self.settings.forwarded_allow_ips)
        if name:
            self._builders[name] = builder
        return builder

    def _set_listening(self, on: bool) -> None:
        if on == self._listening or (on and self._stopping):
            return
        for sock, builder in zip(self._listeners, self._listener_builders):
            if on:
                fd = sock.fileno()
                self._selector.register(sock, _READ, (_LISTENER, (
                    sock, builder, fd in self._proxy_fds, self._listener_names.get(fd, ""),
                    _tcp_option(sock, socket.TCP_NODELAY) == 0,
                    (int(sock.family), int(sock.type), sock.proto),
                    bool(_tcp_option(sock, socket.TCP_DEFER_ACCEPT)))))
            else:
                self._selector.unregister(sock)
        self._listening = on

    def _new_conn(self, sock: socket.socket, peer, builder, proxy: bool = False,
                  nodelay: bool | None = None) -> _Conn:
        """``nodelay``: whether TCP_NODELAY must be set (None: find out)."""
        s = self.settings
        sock.setblocking(False)
        if nodelay is None:
            nodelay = sock.family in (socket.AF_INET, socket.AF_INET6)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = http11.Connection(
            limit_request_line=s.limit_request_line, limit_request_fields=s.limit_request_fields,
            limit_request_field_size=s.limit_request_field_size,
            max_body_size=s.max_body_size, date_cache=self._date)
        conn = _Conn(sock, peer, builder, proto, s.write_timeout_s)
        self._conns[conn.fd] = conn
        conn.events = _READ
        if proxy:
            # Until its header is complete the connection is read by a watch callback,
            # so the hot _CONN path carries no PROXY test.
            conn.state = _PROXY
            conn.proxy_buf = bytearray()
            key_data = (_WATCH, functools.partial(self._on_proxy_readable, conn))
        else:
            key_data = (_CONN, conn)
        self._selector.register(sock, _READ, key_data)
        self._set_deadline(conn, s.header_timeout_s)
        return conn

    def _accept(self, lsock: socket.socket, builder, proxy: bool, name: str,
                nodelay: bool, kind: tuple[int, int, int], read_at_once: bool) -> None:
        # A bounded batch: the connections already accepted get read before more come
        # in (the listener stays readable, so the rest wait one iteration).
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
            conn = self._new_conn(sock, peer, builder, proxy, nodelay)
            conn.listener = name
            conn.sole_copy = True   # accepted here: no other process holds the socket
            if read_at_once and not proxy:
                # TCP_DEFER_ACCEPT: the kernel handed it over once its first bytes came,
                # so they are read now rather than after another wait.
                self._on_readable(conn)

    def _set_deadline(self, conn: _Conn, delay_s: float) -> None:
        """Move conn's deadline. Pushes a heap entry only when the new deadline is
        earlier than the one already armed; a later one is found when that fires."""
        deadline = self._now + delay_s
        conn.deadline = deadline
        armed = conn.armed
        if not armed or deadline < armed:
            timers = self._timers
            conn.armed = deadline
            heapq.heappush(timers, (deadline, next(self._timer_seq), conn))
            if len(timers) > 2 * len(self._conns) + 64:
                self._compact_timers()

    def _compact_timers(self) -> None:
        """Rebuild the heap from live connections: one entry each, at its deadline."""
        timers = []
        seq = self._timer_seq
        for conn in self._conns.values():
            conn.armed = conn.deadline
            if conn.deadline:
                timers.append((conn.deadline, next(seq), conn))
        heapq.heapify(timers)
        self._timers[:] = timers

    def _expire(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            armed, _, conn = heapq.heappop(timers)
            if conn.armed != armed:
                continue   # superseded by an earlier entry
            conn.armed = 0.0
            deadline = conn.deadline
            if not deadline or self._conns.get(conn.fd) is not conn:
                continue   # no timeout now (busy), or closed
            if deadline > now:   # moved later since this entry was pushed: re-arm
                conn.armed = deadline
                heapq.heappush(timers, (deadline, next(self._timer_seq), conn))
                continue
            if conn.state == _READING:
                if conn.started and not conn.outbuf:
                    self._fail(conn, 408, "Request Timeout")
                else:
                    self._close(conn)
            elif conn.state in (_WRITING, _CLOSING, _PROXY):
                self._close(conn)   # the client stopped reading, or never sent its PROXY header

    def _set_events(self, conn: _Conn, events: int) -> None:
        if conn.events != events:
            conn.events = events
            self._selector.modify(conn.sock, events, (_CONN, conn))

    def _forget(self, conn: _Conn, closing: bool = False) -> None:
        if self._conns.get(conn.fd) is conn:   # (its fd may be another's by now)
            del self._conns[conn.fd]
            if closing and conn.sole_copy:
                # Closing the socket's only descriptor drops its epoll registration:
                # an epoll_ctl of our own would be a syscall for nothing.
                self._selector.data.pop(conn.fd, None)
            else:
                try:
                    self._selector.unregister(conn.sock)
                except (KeyError, ValueError):
                    pass
            if conn.on_close is not None:
                conn.on_close()
        conn.deadline = 0.0

    def _close(self, conn: _Conn) -> None:
        self._forget(conn, closing=True)
        if conn.spool is not None:
            conn.spool.close()
        conn.sock.close()
        conn.proto.close()   # frees the parser now, not at the next cycle collection

    def _hand_back_idle(self) -> None:
        for conn in list(self._conns.values()):
            if conn.state == _READING and not conn.outbuf and conn.proto.idle:
                self._forget(conn)
                try:
                    self._handback(conn.sock, conn.proto.unparsed_bytes(), conn.peer, conn.listener)
                except Exception:  # noqa: BLE001 - a failed hand-back must not stop the drain
                    self.error_log.exception("could not hand back a connection")
                    conn.sock.close()

    def _close_idle(self) -> None:
        for conn in list(self._conns.values()):
            if conn.state == _READING and not conn.started and not conn.outbuf:
                self._close(conn)

    def _shutdown(self) -> None:
        self._shut_down = True
        for conn in list(self._conns.values()):
            if conn.state != _BUSY:
                self._close(conn)
        self._close_done()
        if self._work is not None:
            for _ in self._threads:
                self._work.put(None)
        self._set_listening(False)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---------------------------------------------------------------- reading

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            if not conn.started and conn.state == _READING:
                self._close(conn)
                return
        elif not conn.started:
            # First bytes of a request (the previous one, if any, is answered).
            conn.started = _STARTED
            conn.request_started = self._now
        conn.proto.receive_data(data)
        self._process(conn)

    def _on_proxy_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        self._on_proxy_bytes(conn, data)

    def _on_proxy_bytes(self, conn: _Conn, data: bytes) -> None:
        """Buffer until the PROXY header is decided; then serve HTTP with its source
        address as the peer (the header_timeout_s deadline set at connect still runs)."""
        buf = conn.proxy_buf
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
        conn.state = _READING
        self._selector.modify(conn.sock, _READ, (_CONN, conn))
        if rest:
            conn.started = _STARTED
            conn.request_started = self._now
            conn.proto.receive_data(rest)
            self._process(conn)

    def _process(self, conn: _Conn) -> None:
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
                conn.request = event
                if event.ends_message:   # no body: the request is whole
                    if not self._dispatch(conn, False):
                        return
                elif event.expects_continue:
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
                    continue          # an abandoned 100-continue body
                self._add_body(conn, event.data)
            elif event is _NEED_DATA:
                # The head must be complete header_timeout_s after its first byte; a
                # body's timeout is about inactivity, so progress re-arms it.
                if conn.started == _STARTED or (conn.body_len and conn.request is not None):
                    conn.started = _TIMED
                    self._set_deadline(conn, self._header_timeout_s)
                return
            elif event is _CONNECTION_CLOSED:
                if conn.outbuf:
                    conn.state = _CLOSING
                    self._set_events(conn, _WRITE)
                else:
                    self._close(conn)
                return
            else:   # PAUSED: a response is still going out
                return

    def _add_body(self, conn: _Conn, data: bytes) -> None:
        conn.body_len += len(data)
        if conn.spool is not None:
            conn.spool.write(data)
            return
        conn.body.append(data)
        if conn.body_len > SPOOL_BYTES:
            spool = tempfile.TemporaryFile()
            spool.write(b"".join(conn.body))
            conn.body = []
            conn.spool = spool

    def _fail(self, conn: _Conn, status: int, reason: str) -> None:
        """Answer a protocol error with Connection: close, then close."""
        body = f"{status} {reason}\n".encode("latin-1", "replace")
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
                f"Server: baton\r\nDate: {self._date.get()}\r\nConnection: close\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n")
        conn.state = _CLOSING
        conn.request = None
        self._queue_out(conn, head.encode("latin-1") + body)
        if self.access_log is not None:
            self._log_access(conn, None, str(status), len(body))

    def _queue_out(self, conn: _Conn, data: bytes) -> None:
        """Send what the socket takes now; the rest goes out on writability."""
        if not conn.outbuf:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent == len(data):
                if conn.state == _CLOSING:
                    self._close(conn)
                return
            data = data[sent:]
        conn.outbuf += data
        self._set_events(conn, _WRITE)
        self._set_deadline(conn, self.settings.write_timeout_s)

    def _on_writable(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        if conn.outbuf:
            self._set_deadline(conn, self.settings.write_timeout_s)
            return
        if conn.state == _CLOSING:
            self._close(conn)
            return
        conn.state = _READING
        if self._next_request(conn, conn.proto.has_unparsed):
            self._process(conn)

    # ---------------------------------------------------------------- running the app

    def _dispatch(self, conn: _Conn, continue_mode: bool) -> bool:
        """Run the request; True when bytes of ``conn``'s next request wait to be
        parsed (inline mode; a loop instead of recursion keeps deep pipelines safe)."""
        conn.state = _BUSY
        conn.deadline = 0.0
        if self._work is None:
            self._handle(conn, continue_mode, True)
            self._now = time.monotonic()   # the app may have taken long
            return self._finish(conn)
        # The connection leaves the selector while a thread owns it.
        self._selector.unregister(conn.sock)
        conn.events = 0
        self._busy += 1
        conn.busy_since = self._now
        if self._busy >= self.settings.threads:
            self._set_listening(False)   # don't accept what no thread can serve
        self._work.put((conn, continue_mode))
        return False

    def _worker_thread(self) -> None:
        work = self._work
        while True:
            item = work.get()
            if item is None:
                return
            conn, continue_mode = item
            try:
                self._handle(conn, continue_mode, inline=False)
            except BaseException:   # noqa: BLE001 - never lose a connection
                self.error_log.exception("unexpected error serving a request")
                conn.outcome = None
            self._done.append(conn)
            if self._shut_down:
                self._close_done()  # the loop is gone: nobody else will
                continue
            try:
                self._wake_w.send(b"d")
            except OSError:
                pass

    def _close_done(self) -> None:
        """After shutdown, close connections whose app call finished; the loop thread
        and pool threads may both call this (deque pops are atomic)."""
        while True:
            try:
                conn = self._done.popleft()
            except IndexError:
                return
            conn.sock.close()

    def _on_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        done = self._done
        while done:
            conn = done.popleft()
            self._busy -= 1
            if self._conns.get(conn.fd) is conn:
                conn.events = _READ
                self._selector.register(conn.sock, _READ, (_CONN, conn))
            if self._finish(conn):
                self._process(conn)
        if not self._stopping and self._busy < self.settings.threads:
            self._set_listening(True)

    def _handle(self, conn: _Conn, continue_mode: bool, inline: bool) -> None:
        """Run the app for conn.request (in the loop thread or a pool thread)."""
        request = conn.request
        proto = conn.proto
        send = conn.send_inline if inline else conn.send_blocking
        if continue_mode:
            wsgi_input = Input(self._make_pull(conn, send))
            conn.continue_input = wsgi_input
        elif conn.spool is not None:
            wsgi_input = conn.spool
            wsgi_input.seek(0)
        elif conn.body_len:
            body = conn.body
            wsgi_input = io.BytesIO(body[0] if len(body) == 1 else b"".join(body))
        else:
            wsgi_input = io.BytesIO()
        environ = conn.builder.build_from(conn.environ_base, request, wsgi_input)
        conn.outcome = run_app(self.app, environ, proto, request, send, self.error_log,
                               conn.sendfile)

    def _make_pull(self, conn: _Conn, send):
        """Body source for Expect: 100-continue: answer 100, then read as the app reads."""
        state = {"continued": False}
        proto = conn.proto
        timeout_s = self.settings.header_timeout_s

        def pull() -> bytes:
            if not state["continued"]:
                state["continued"] = True
                send(_CONTINUE)
            while True:
                event = proto.next_event()   # RemoteProtocolError reaches the app: a 500
                if event.__class__ is http11.Data:
                    return event.data
                if event.__class__ is http11.EndOfMessage:
                    conn.continue_input = None   # the body was read to its end
                    return b""
                if event is not http11.NEED_DATA:
                    return b""
                _wait_fd(conn.fd, select.POLLIN, timeout_s)
                try:
                    data = conn.sock.recv(RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                proto.receive_data(data)
                if not data:
                    raise ConnectionResetError("client closed during the request body")
        return pull

    def _finish(self, conn: _Conn) -> bool:
        """Back in the loop thread after the app ran: log, then next request or close.

        True when bytes of ``conn``'s next request wait to be parsed."""
        outcome = conn.outcome
        request = conn.request
        self._requests_served += 1
        if self.access_log is not None and outcome is not None:
            self._log_access(conn, request, outcome.status, outcome.sent)
        if conn.spool is not None:
            conn.spool.close()
            conn.spool = None
        conn.request = None
        if conn.body_len or conn.body:
            conn.body = []
            conn.body_len = 0
        conn.started = _IDLE
        conn.outcome = None
        if self._conns.get(conn.fd) is not conn:
            return False
        # An unread 100-continue body may or may not be on its way: only closing is safe.
        unread_body = conn.continue_input is not None
        conn.continue_input = None
        if (outcome is None or outcome.must_close or unread_body
                or not conn.proto.response_keep_alive):
            conn.state = _CLOSING
            if conn.outbuf:
                self._set_events(conn, _WRITE)
                self._set_deadline(conn, self._write_timeout_s)
            else:
                self._close(conn)
            return False
        pending = conn.proto.start_next_cycle()
        if conn.outbuf:
            conn.state = _WRITING
            self._set_events(conn, _WRITE)
            self._set_deadline(conn, self._write_timeout_s)
            return False
        conn.state = _READING
        return self._next_request(conn, pending)

    def _next_request(self, conn: _Conn, pending: bool) -> bool:
        """Prepare ``conn`` to wait for its next request, of which something is
        already here if ``pending``. True when that is to be parsed now; False when
        the connection was closed, or must wait for bytes (a peer's close is then seen
        by the next read)."""
        if self._stopping and not pending and self._handback is None:
            self._close(conn)   # draining: an idle keep-alive connection is closed
            return False        # (with a hand-back, the drain loop gives it away instead)
        if conn.events != _READ:
            self._set_events(conn, _READ)
        if pending:
            conn.started = _TIMED
            conn.request_started = self._now
            self._set_deadline(conn, self._header_timeout_s)
            return True
        # _set_deadline, inlined for the way every keep-alive request ends: a later
        # deadline than the armed one needs no heap entry.
        deadline = conn.deadline = self._now + self._keepalive_s
        if not conn.armed or deadline < conn.armed:
            self._set_deadline(conn, self._keepalive_s)
        return False

    def _log_access(self, conn: _Conn, request, status: str, sent: int) -> None:
        # Only called when an access log is configured; the line is formatted by the
        # log handler, and only if the record is emitted.
        log_access(self.access_log, AccessRecord.for_request(
            conn.peer, request, status, sent, conn.request_started or self._now, time.monotonic()))

_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
            414: "URI Too Long", 431: "Request Header Fields Too Large"}
