"""The worker's serving loop: one selector, many connections, the app inline or on threads.

This is the I/O shell around :mod:`supervisor.http11` (protocol state) and
:mod:`supervisor.wsgi` (calling the app). Promises:

* The loop never blocks on one client while reading: only a complete request
  (head and whole body, spooled to a temp file past ``SPOOL_BYTES``) reaches the
  application, so a slow client holds nothing but its own buffers.
  Exceptions: a request with ``Expect: 100-continue`` reads its body when the app
  does, and a ``wsgi.file_wrapper`` response is sent to completion; in
  ``threads == 1`` mode both block the loop (bounded by the timeouts).
* Every timer is a deadline in one heap; the selector waits for the nearest one.
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
import logging
import os
import select
import selectors
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from . import http11, proxyproto
from .wsgi import EnvironBuilder, Input, run_app

__all__ = ["ServerSettings", "Server"]

SPOOL_BYTES = 1 << 20         # request bodies larger than this go to a temp file
OUTBUF_CAP = 1 << 20          # inline mode: buffer this much unsent response, then wait
RECV_BYTES = 65536
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_LISTENER, _CONN, _WATCH, _WAKEUP = 0, 1, 2, 3
# Connection states.
# _PROXY: awaiting its PROXY header. Its client is not known yet, so such a connection
# is never taken or handed back (both want _READING); header_timeout_s bounds the wait.
_READING, _BUSY, _WRITING, _CLOSING, _PROXY = 0, 1, 2, 3, 4


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
    __slots__ = ("sock", "fd", "peer", "builder", "proto", "state", "outbuf", "deadline",
                 "request", "body", "body_len", "spool", "events", "started", "outcome",
                 "continue_input", "on_close", "listener", "proxy_buf")

    def __init__(self, sock, peer, builder, proto) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.builder = builder
        self.proto = proto
        self.state = _READING
        self.outbuf = bytearray()
        self.deadline = 0.0
        self.request = None
        self.body = []
        self.body_len = 0
        self.spool = None
        self.events = 0
        self.started = False       # bytes of the current request have arrived
        self.outcome = None
        self.continue_input = None
        self.on_close = None       # told when the connection leaves this server
        self.listener = ""         # the listener's name, for a hand-back
        self.proxy_buf = None      # bytes of a PROXY header still arriving (state _PROXY)


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
        self.error_log = error_log
        self.access_log = access_log
        self._selector = selectors.DefaultSelector()
        self._date = http11.DateCache()
        self._conns: dict[int, _Conn] = {}
        self._timers: list = []
        self._requests_served = 0
        self._busy = 0
        self._stopping = False
        self._graceful = True
        self._listening = False
        self._listeners = list(listeners)
        self._listener_names = dict(zip((s.fileno() for s in self._listeners), listener_names or ()))
        self._proxy_fds = proxy_protocol_fds   # listeners whose connections open with PROXY
        self._handback: Callable | None = None
        self._builders: dict[str, EnvironBuilder] = {}
        self._listener_builders = []
        for sock in self._listeners:
            sock.setblocking(False)
            self._listener_builders.append(self._builder_for(sock))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, (_WAKEUP, None))
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
        self._selector.register(fd, selectors.EVENT_READ, (_WATCH, on_readable))

    def unwatch(self, fd: int) -> None:
        self._selector.unregister(fd)

    def add_connection(self, sock: socket.socket, peer, listener_name: str = "",
                       initial_bytes: bytes = b"", on_close: Callable[[], None] | None = None,
                       proxy_protocol: bool = False) -> None:
        builder = self._builders.get(listener_name) or self._builder_for(sock, listener_name)
        conn = self._new_conn(sock, peer, builder, proxy_protocol)
        conn.on_close = on_close
        conn.listener = listener_name
        if initial_bytes and proxy_protocol:
            self._on_proxy_bytes(conn, initial_bytes)
        elif initial_bytes:
            conn.started = True
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
        select_ = self._selector.select
        timers = self._timers
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
                    timeout = max(0.0, timers[0][0] - time.monotonic())
                for key, mask in select_(timeout):
                    kind, obj = key.data
                    if kind == _CONN:
                        if mask & selectors.EVENT_READ:
                            self._on_readable(obj)
                        elif mask & selectors.EVENT_WRITE:
                            self._on_writable(obj)
                    elif kind == _LISTENER:
                        self._accept(key.fileobj, obj)
                    elif kind == _WAKEUP:
                        self._on_wakeup()
                    else:
                        obj()
                if timers:
                    self._expire(time.monotonic())
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
                self._selector.register(sock, selectors.EVENT_READ, (_LISTENER, builder))
            else:
                self._selector.unregister(sock)
        self._listening = on

    def _new_conn(self, sock: socket.socket, peer, builder, proxy: bool = False) -> _Conn:
        s = self.settings
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = http11.Connection(
            limit_request_line=s.limit_request_line, limit_request_fields=s.limit_request_fields,
            limit_request_field_size=s.limit_request_field_size,
            max_body_size=s.max_body_size, date_cache=self._date)
        conn = _Conn(sock, peer, builder, proto)
        self._conns[conn.fd] = conn
        conn.events = selectors.EVENT_READ
        if proxy:
            # Until its header is complete the connection is read by a watch callback,
            # so the hot _CONN path carries no PROXY test.
            conn.state = _PROXY
            conn.proxy_buf = bytearray()
            key_data = (_WATCH, functools.partial(self._on_proxy_readable, conn))
        else:
            key_data = (_CONN, conn)
        self._selector.register(sock, selectors.EVENT_READ, key_data)
        self._set_deadline(conn, s.header_timeout_s)
        return conn

    def _accept(self, lsock: socket.socket, builder) -> None:
        proxy = lsock.fileno() in self._proxy_fds
        while True:
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds or a connection reset before accept: keep serving.
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    self.error_log.warning("accept failed: %s", exc)
                return
            self._new_conn(sock, peer, builder, proxy).listener = self._listener_names.get(lsock.fileno(), "")

    def _set_deadline(self, conn: _Conn, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        conn.deadline = deadline
        heapq.heappush(self._timers, (deadline, id(conn), conn))

    def _expire(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if conn.deadline != deadline or self._conns.get(conn.fd) is not conn:
                continue   # superseded or closed
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

    def _forget(self, conn: _Conn) -> None:
        if self._conns.pop(conn.fd, None) is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            if conn.on_close is not None:
                conn.on_close()
        conn.deadline = 0.0

    def _close(self, conn: _Conn) -> None:
        self._forget(conn)
        if conn.spool is not None:
            conn.spool.close()
        conn.sock.close()

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
        for conn in list(self._conns.values()):
            if conn.state != _BUSY:
                self._close(conn)
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
            conn.started = True
            if conn.proto.idle:
                self._set_deadline(conn, self.settings.header_timeout_s)
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
        rest = bytes(buf[result.consumed:])
        conn.proxy_buf = None
        conn.state = _READING
        self._selector.modify(conn.sock, selectors.EVENT_READ, (_CONN, conn))
        if rest:
            conn.started = True
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
            if cls is http11.Data:
                if conn.request is None:
                    continue          # an abandoned 100-continue body
                self._add_body(conn, event.data)
            elif cls is http11.Request:
                conn.request = event
                if event.expects_continue:
                    if not self._dispatch(conn, continue_mode=True):
                        return
            elif cls is http11.EndOfMessage:
                if conn.request is None:
                    proto.start_next_cycle()
                    continue
                if not self._dispatch(conn, continue_mode=False):
                    return
            elif event is http11.NEED_DATA:
                if conn.body_len and conn.request is not None:
                    # Body progress: the timeout is about inactivity, not total time.
                    self._set_deadline(conn, self.settings.header_timeout_s)
                return
            elif event is http11.CONNECTION_CLOSED:
                if conn.outbuf:
                    conn.state = _CLOSING
                    self._set_events(conn, selectors.EVENT_WRITE)
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
        self._set_events(conn, selectors.EVENT_WRITE)
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
        if self._next_request(conn):
            self._process(conn)

    # ---------------------------------------------------------------- running the app

    def _dispatch(self, conn: _Conn, continue_mode: bool) -> bool:
        """Run the request; True when the caller should go on reading ``conn``
        (inline mode; a loop instead of recursion keeps deep pipelines safe)."""
        conn.state = _BUSY
        conn.deadline = 0.0
        if self._work is None:
            self._handle(conn, continue_mode, inline=True)
            return self._finish(conn)
        # The connection leaves the selector while a thread owns it.
        self._selector.unregister(conn.sock)
        conn.events = 0
        self._busy += 1
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
            try:
                self._wake_w.send(b"d")
            except OSError:
                pass

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
                conn.events = selectors.EVENT_READ
                self._selector.register(conn.sock, selectors.EVENT_READ, (_CONN, conn))
            if self._finish(conn):
                self._process(conn)
        if not self._stopping and self._busy < self.settings.threads:
            self._set_listening(True)

    def _handle(self, conn: _Conn, continue_mode: bool, inline: bool) -> None:
        """Run the app for conn.request (in the loop thread or a pool thread)."""
        request = conn.request
        proto = conn.proto
        if inline:
            send = self._make_inline_send(conn)
        else:
            send = self._make_blocking_send(conn)
        if continue_mode:
            wsgi_input = Input(self._make_pull(conn, send))
            conn.continue_input = wsgi_input
        elif conn.spool is not None:
            wsgi_input = conn.spool
            wsgi_input.seek(0)
        else:
            body = conn.body
            wsgi_input = io.BytesIO(body[0] if len(body) == 1 else b"".join(body))
        environ = conn.builder.build(request, wsgi_input, conn.peer)
        conn.outcome = run_app(self.app, environ, proto, request, send, self.error_log,
                               self._make_sendfile(conn))

    def _make_inline_send(self, conn: _Conn):
        sock = conn.sock
        write_timeout_s = self.settings.write_timeout_s

        def send(data: bytes) -> None:
            if not conn.outbuf:
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                if sent == len(data):
                    return
                data = data[sent:]
            conn.outbuf += data
            # Keep memory bounded for a big streamed response: wait for the client.
            while len(conn.outbuf) > OUTBUF_CAP:
                _wait_fd(conn.fd, select.POLLOUT, write_timeout_s)
                try:
                    del conn.outbuf[:sock.send(conn.outbuf)]
                except (BlockingIOError, InterruptedError):
                    pass
        return send

    def _make_blocking_send(self, conn: _Conn):
        sock = conn.sock
        write_timeout_s = self.settings.write_timeout_s

        def send(data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    sent = sock.send(view)
                except (BlockingIOError, InterruptedError):
                    _wait_fd(conn.fd, select.POLLOUT, write_timeout_s)
                    continue
                view = view[sent:]
        return send

    def _flush_blocking(self, conn: _Conn) -> None:
        while conn.outbuf:
            _wait_fd(conn.fd, select.POLLOUT, self.settings.write_timeout_s)
            try:
                del conn.outbuf[:conn.sock.send(conn.outbuf)]
            except (BlockingIOError, InterruptedError):
                pass

    def _make_sendfile(self, conn: _Conn):
        def sendfile(fileobj, offset: int, count: int) -> int:
            self._flush_blocking(conn)
            while True:
                try:
                    return os.sendfile(conn.fd, fileobj.fileno(), offset, count)
                except (BlockingIOError, InterruptedError):
                    _wait_fd(conn.fd, select.POLLOUT, self.settings.write_timeout_s)
        return sendfile

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

        True when ``conn`` is ready to be read for its next request."""
        outcome = conn.outcome
        request = conn.request
        self._requests_served += 1
        if self.access_log is not None and outcome is not None:
            self._log_access(conn, request, outcome.status, outcome.sent)
        if conn.spool is not None:
            conn.spool.close()
            conn.spool = None
        conn.request = None
        conn.body = []
        conn.body_len = 0
        conn.started = False
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
                self._set_events(conn, selectors.EVENT_WRITE)
                self._set_deadline(conn, self.settings.write_timeout_s)
            else:
                self._close(conn)
            return False
        conn.proto.start_next_cycle()
        if conn.outbuf:
            conn.state = _WRITING
            self._set_events(conn, selectors.EVENT_WRITE)
            self._set_deadline(conn, self.settings.write_timeout_s)
            return False
        conn.state = _READING
        return self._next_request(conn)

    def _next_request(self, conn: _Conn) -> bool:
        """Prepare ``conn`` to wait for its next request; False if it was closed."""
        pending = conn.proto.has_unparsed
        if self._stopping and not pending and self._handback is None:
            self._close(conn)   # draining: an idle keep-alive connection is closed
            return False        # (with a hand-back, the drain loop gives it away instead)
        self._set_events(conn, selectors.EVENT_READ)
        if pending:
            conn.started = True
            self._set_deadline(conn, self.settings.header_timeout_s)
        else:
            self._set_deadline(conn, self.settings.keepalive_s)
        return True

    def _log_access(self, conn: _Conn, request, status: str, sent: int) -> None:
        peer = conn.peer[0] if isinstance(conn.peer, tuple) else str(conn.peer or "-")
        if request is not None:
            line = (f"{request.method.decode('latin-1')} {request.target.decode('latin-1')} "
                    f"HTTP/{request.version}")
            referer = agent = "-"
            for name, value in request.headers:
                lname = name.lower()
                if lname == b"referer":
                    referer = value.decode("latin-1")
                elif lname == b"user-agent":
                    agent = value.decode("latin-1")
        else:
            line, referer, agent = "-", "-", "-"
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        self.access_log.info('%s - - [%s] "%s" %s %s "%s" "%s"', peer, stamp, line, status,
                             sent if sent else "-", referer, agent)


_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
            414: "URI Too Long", 431: "Request Header Fields Too Large"}
