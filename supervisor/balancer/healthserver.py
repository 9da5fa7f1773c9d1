"""The balancer's health and metrics server: `/healthz` and `/metrics` on the loop.

It accepts on its own socket (the `[master] health` address), reads one request head
of at most `health.MAX_HEAD` bytes, answers it whole with `health.answer` and closes.
What the answer says (the draining flag, the metrics text) comes from the callables it
is given, asked only when a complete head wants it.

Promises: a client gets HEAD_TIMEOUT_S from its accept to send its head and take its
answer, then it is closed (with as much of the answer as it took); no client can make
the balancer block (what the socket does not take at once goes out as the client
reads, never in a blocking send: a /metrics answer for many apps outgrows a socket
buffer); at most ACCEPT_BATCH clients are accepted per wakeup, so health checks cannot
starve the connections being balanced.
"""
from __future__ import annotations

import socket
from collections.abc import Callable

from supervisor.balancer import health
from supervisor.system.loop import WRITE, Loop, Timer

ACCEPT_BATCH = 16
HEAD_TIMEOUT_S = 10.0


class _Client:
    __slots__ = ("sock", "head", "timer", "out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray()
        self.timer: Timer | None = None
        self.out = b""   # the part of the answer the socket has not taken yet


class HealthServer:
    """Serves health checks on `listening` until `close()`."""

    def __init__(self, loop: Loop, listening: socket.socket, draining: Callable[[], bool],
                 metrics: Callable[[], str], head_timeout_s: float = HEAD_TIMEOUT_S) -> None:
        self.loop = loop
        self.listening = listening
        self.draining = draining
        self.metrics = metrics
        self.head_timeout_s = head_timeout_s
        self.clients: dict[int, _Client] = {}   # by fd
        listening.setblocking(False)
        loop.register(listening, self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listening.accept()
            except OSError:  # none left (BlockingIOError), or EMFILE: the next wakeup retries
                return
            sock.setblocking(False)
            self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        client = self.clients[sock.fileno()] = _Client(sock)
        self.loop.register(sock, lambda: self._readable(client))
        client.timer = self.loop.call_later(self.head_timeout_s, lambda: self._close(client))

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(health.MAX_HEAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:   # it left without a whole head
            self._close(client)
            return
        client.head += data
        response = health.answer(bytes(client.head), draining=self.draining(), metrics=self.metrics)
        if response is None:
            return
        client.out = response
        self.loop.modify(client.sock, WRITE, lambda: self._writable(client))
        self._writable(client)

    def _writable(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            return
        except OSError:
            sent = len(client.out)
        client.out = client.out[sent:]
        if not client.out:
            self._close(client)

    def _close(self, client: _Client) -> None:
        if self.clients.pop(client.sock.fileno(), None) is None:
            return
        client.timer.cancel()
        self.loop.unregister(client.sock)
        client.sock.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        self.loop.unregister(self.listening)
        self.listening.close()
