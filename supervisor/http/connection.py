"""One client connection of the worker's HTTP server: its socket, its buffers, its state.

The states, and the moves between them, are a table (`TRANSITIONS`). Promises:

* **A state changes only through `ClientConnection.move`**, and a move the table does
  not list raises `IllegalTransition`: that is a bug in the server, never the peer's
  doing (the peer's mistakes are answered, or closed, through legal moves).
* **Every state a connection is ever in is a key of the table**; `CLOSED` and
  `HANDED_BACK` are final (no move leaves them).
* **A move is cheap**: one set lookup. The keep-alive hot path makes two per request,
  IDLE -> BUSY -> IDLE.

What a state means (which direction the server waits for, which deadline runs):

=========== ====================================================================
PROXY       awaiting its PROXY protocol header (under ``header_timeout_s`` from the
            connect). Its client is not known yet, so it is never handed back.
HANDSHAKE   a TLS connection's handshake (under ``header_timeout_s`` from the connect;
            see ``http.tls``). A TLS connection is never handed back or parked: its
            state lives in this process's OpenSSL.
IDLE        nothing of a request is here yet: a new connection, or a keep-alive one
            between requests (under ``keepalive_s``). The bytes of one read are
            parsed before the state changes, so a request that is complete in its
            first read (most are) goes from IDLE straight to BUSY, with no deadline
            of its own.
READING     a request is partly here, under ``header_timeout_s`` (from its first
            byte for the head; re-armed by every piece of body).
BUSY        the application runs, inline or on a pool thread; no deadline.
WRITING     bytes of the response wait for the socket (``write_timeout_s`` from the
            last progress); then the rest of the app's response, if it has more (BUSY
            again), or the next request.
CLOSING     the final bytes (an error answer, or a response after which the
            connection must close) go out, then the connection closes; when the
            client may still be sending (a body we did not read), it lingers first:
            our side shut, what comes dropped, for a bounded time and size.
CLOSED      closed by the server (final).
HANDED_BACK detached, with its unparsed bytes, for another process (final): a retiring
            worker's idle connection, or one a serving worker parks in the balancer
            (IDLE past ``park_after_s``, nothing unparsed).
=========== ====================================================================

The send methods are the application's output, as `wsgi.run_app` calls them.
"""
from __future__ import annotations

import os
import select
from collections.abc import Mapping
from types import MappingProxyType

OUTBUF_CAP = 1 << 20   # write() (PEP 3333's legacy callable) buffers this much, then waits


class State:
    """A connection state; states compare by identity. `next` holds the states it may
    move to, as `TRANSITIONS` says (copied there for `move`: an attribute is cheaper
    than a lookup in the table)."""

    __slots__ = ("name", "next")

    def __init__(self, name: str) -> None:
        self.name = name
        self.next: frozenset[State] = frozenset()

    def __repr__(self) -> str:
        return self.name


PROXY = State("PROXY")
HANDSHAKE = State("HANDSHAKE")
IDLE = State("IDLE")
READING = State("READING")
BUSY = State("BUSY")
WRITING = State("WRITING")
CLOSING = State("CLOSING")
CLOSED = State("CLOSED")
HANDED_BACK = State("HANDED_BACK")

# state -> the states it may move to
TRANSITIONS: Mapping[State, frozenset[State]] = MappingProxyType({
    PROXY: frozenset({IDLE, HANDSHAKE, CLOSED}),
    HANDSHAKE: frozenset({IDLE, CLOSED}),
    # BUSY: the first read held a whole request. CLOSING: it held a bad one (answered,
    # then closed). CLOSED: the peer closed, the keep-alive deadline passed, or a drain
    # closed it. HANDED_BACK: a drain gave it away, or it was parked.
    IDLE: frozenset({READING, BUSY, CLOSING, CLOSED, HANDED_BACK}),
    READING: frozenset({BUSY, CLOSING, CLOSED, HANDED_BACK}),
    # IDLE or READING: keep-alive (READING: the next request is partly here already).
    BUSY: frozenset({IDLE, READING, WRITING, CLOSING, CLOSED}),
    # BUSY: the socket took what waited; the app's response iterable goes on.
    WRITING: frozenset({IDLE, READING, BUSY, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
    HANDED_BACK: frozenset(),
})


def _link(table: Mapping[State, frozenset[State]]) -> None:
    for state, targets in table.items():
        state.next = targets


_link(TRANSITIONS)


class IllegalTransition(RuntimeError):
    """The server tried a move the state table does not allow (a bug in the server)."""

    def __init__(self, old: State, new: State) -> None:
        super().__init__(f"a connection cannot move from {old} to {new}")
        self.old = old
        self.new = new


class ClientConnection:
    """The server's side of one client connection.

    Owned by the loop's thread, except while BUSY on a pool thread: then that thread
    owns it until it hands it back. The fields are the server's to read and write; the
    state is written only through `move`.
    """

    __slots__ = ("sock", "fd", "peer", "builder", "environ_base", "proto", "state", "outbuf",
                 "deadline", "timer", "request", "body", "body_len", "linger", "events",
                 "outcome", "body_error", "on_close", "listener", "proxy_buf",
                 "write_timeout_s", "busy_since", "request_started", "sole_copy", "on_deadline",
                 "host_gate", "on_park", "idle_since", "on_started", "head_at")

    def __init__(self, sock, peer, builder, proto, write_timeout_s: float, state: State,
                 on_deadline) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.builder = builder
        self.environ_base = builder.connection_base(peer)
        self.proto = proto
        self.state = state
        self.outbuf = bytearray()
        self.deadline = 0.0         # when the current timeout fires (0: none; BUSY has none)
        self.timer = None           # the loop timer armed for it (due at or before `deadline`)
        self.request = None
        self.body = []              # the pieces of a body the loop reads before the app runs
        self.body_len = 0
        self.linger = 0             # closing: drop up to this many bytes of the client's first (see the server's _end)
        self.events = 0             # what the loop watches it for (0: not registered)
        self.outcome = None
        self.body_error = None      # how a streamed body broke the protocol (or timed out), as the app read it
        self.busy_since = 0.0       # when a pool thread took its current request
        self.request_started = 0.0  # when the current request's first byte arrived (access log)
        self.head_at = 0.0          # when the current request's head was complete (its duration, /metrics)
        self.on_close = None        # told when the connection leaves this server
        self.listener = ""          # the listener's name, for a hand-back
        self.proxy_buf = None       # bytes of a PROXY header still arriving (state PROXY)
        self.write_timeout_s = write_timeout_s
        self.sole_copy = False      # True: closing our fd closes the socket (no other process has it)
        self.on_deadline = on_deadline  # the server's on_deadline(conn), see deadline_passed
        self.host_gate = None       # on a listener routed by Host: checks each request's (hostcheck)
        self.on_park = None         # on_park(sock, keepalive_left_s): who takes it when idle (a balancer)
        self.idle_since = 0.0       # when it last went IDLE (read only with on_park set)
        self.on_started = None      # told once that its first request started (see add_connection)

    def move(self, new: State) -> None:
        """Change state, if the table allows it; raise `IllegalTransition` otherwise."""
        if new not in self.state.next:
            raise IllegalTransition(self.state, new)
        self.state = new

    def deadline_passed(self) -> None:
        """The callback of the loop timer armed for this connection: a bound method
        is cheaper to make for every connection than a closure or a partial."""
        self.on_deadline(self)

    def __repr__(self) -> str:
        return f"<ClientConnection fd={self.fd} {self.state} peer={self.peer!r}>"

    # The app's output, as run_app's send / sendfile (bound methods: no per-request
    # closures, no reference cycles).

    def send_inline(self, data: bytes) -> bool | None:
        """Send without waiting: what the socket does not take waits in outbuf, and
        then the answer is True (the server sends it when the socket is writable,
        and the response goes no further meanwhile)."""
        outbuf = self.outbuf
        if not outbuf:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            outbuf += memoryview(data)[sent:]
            return True
        outbuf += data
        # Only write() adds to bytes still waiting (an iterable's response stops at the
        # first that wait): its calls are inside the app's, so memory is bounded by
        # waiting for the client.
        while len(outbuf) > OUTBUF_CAP:
            wait_fd(self.fd, select.POLLOUT, self.write_timeout_s)
            try:
                del outbuf[:self.sock.send(outbuf)]
            except (BlockingIOError, InterruptedError):
                pass
        return True

    def send_blocking(self, data: bytes) -> None:
        """Send everything, waiting for the socket (the interim 100 Continue, which
        the app's read of its body waits for)."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                wait_fd(self.fd, select.POLLOUT, self.write_timeout_s)
                continue
            view = view[sent:]

    def sendfile(self, fileobj, offset: int, count: int) -> int | None:
        """os.sendfile without waiting: bytes sent (0: the file ended), or None when
        the socket is full. Only called with outbuf empty (see wsgi.ResponseStream)."""
        try:
            return os.sendfile(self.fd, fileobj.fileno(), offset, count)
        except (BlockingIOError, InterruptedError):
            return None


def wait_fd(fd: int, mask: int, timeout_s: float) -> None:
    """Block until `fd` is ready for `mask` (select.POLLIN / POLLOUT); TimeoutError after
    `timeout_s`. Only for the places where blocking is the promise (see the server)."""
    poller = select.poll()
    poller.register(fd, mask)
    if not poller.poll(max(0.0, timeout_s) * 1000):
        raise TimeoutError("peer did not become ready in time")
