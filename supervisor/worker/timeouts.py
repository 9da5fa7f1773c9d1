"""A hung worker's last words to its clients: 504 for the requests it never answered.

The master aborts a worker whose request ran past `timeout` (SIGABRT, SIGKILL a
moment later). The master never touches a client's bytes, so the worker answers
them itself, on its way out. How the abort unfolds here:

1. faulthandler's C handler writes every thread's stack to stderr (the master's log),
   needing neither the GIL nor a running thread: the stacks come out as they always
   did, even from an app stuck in a C call that holds the GIL.
2. It then restores, and calls, the handler that was there before it: Python's own
   (installed first, by `install`), which records the signal and writes its number to
   the wakeup fd, so the process does not die yet.
3. That fd is this module's pipe (the loop's wakeup fd is relayed through it, see
   `Answerer.start`), read by a small thread that needs only the GIL, not the main
   thread: an app call blocked in a C library (a database query) is no obstacle. The
   thread answers `504 Gateway Timeout` with `Connection: close` on every connection
   whose request is running and whose response head was not framed yet, and shuts
   down those whose head went out (no second status line: the client sees the
   response end short), then aborts the process (it dies of SIGABRT, as before).

Best effort, and said so in the README: an app holding the GIL in a C call never lets
the thread run, and the master's SIGKILL ends the worker with its clients unanswered
(as before); and a head the app frames in the instant between the check and the
shutdown can follow the 504 on the wire.
"""
from __future__ import annotations

import email.utils
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading

_BODY = b"Gateway Timeout\n"


class Answerer:
    """The worker's SIGABRT handling (see the module). `install` before the app is
    imported; `start(server, log)` once it serves; `close` when it is done serving."""

    def __init__(self) -> None:
        self._server = None
        self._log: logging.Logger | None = None
        self._pipe: tuple[int, int] | None = None
        self._relay = -1              # a dup of the loop's wakeup fd, fed what the pipe gets
        self._previous_wakeup = -1
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        """Python's SIGABRT handler first, then faulthandler over it (step 2 needs that
        order). Main thread only."""
        signal.signal(signal.SIGABRT, self._on_main_thread)
        faulthandler.enable(file=sys.stderr.fileno(), all_threads=True)

    def start(self, server, log: logging.Logger) -> None:
        """Answer `server`'s running requests at the next abort. Call after the loop set
        its wakeup fd (its signals go on reaching it, through the relay). Main thread."""
        self._server = server
        self._log = log
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_fd, False)   # a signal handler must never block on it
        self._pipe = (read_fd, write_fd)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._previous_wakeup = previous
        if previous >= 0:
            # A dup: if the loop closes its fd first, writes fail rather than reach
            # whatever file takes that number next.
            self._relay = os.dup(previous)
            os.set_blocking(self._relay, False)
        self._thread = threading.Thread(target=self._watch, name="baton-timeout", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Give the wakeup fd back to the loop and end the thread. Main thread."""
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup, warn_on_full_buffer=False)
        read_fd, write_fd = self._pipe
        os.close(write_fd)            # the thread reads the end of the pipe
        self._thread.join(5.0)
        if not self._thread.is_alive():
            os.close(read_fd)
            if self._relay >= 0:
                os.close(self._relay)
        self._pipe = None
        self._thread = None   # an abort from here on dies at once (_on_main_thread)

    def _on_main_thread(self, signum, frame) -> None:
        """Python's handler, run by the main thread when it gets to it. Outside `start`
        .. `close` (booting, or done serving) nothing is to be answered: die now.
        Between them the thread does it."""
        if self._thread is None:
            os.abort()

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        while True:
            try:
                data = os.read(read_fd, 512)
            except InterruptedError:
                continue
            if not data:
                return
            if self._relay >= 0:
                try:
                    os.write(self._relay, data)
                except OSError:
                    pass   # full (the loop is awake anyway) or the loop is gone
            if signal.SIGABRT in data:
                self._answer()
                os.abort()

    def _answer(self) -> None:
        answered = cut = 0
        for conn in self._server.running_connections():
            try:
                if conn.proto.response_started:
                    cut += 1
                else:
                    conn.sock.send(response_for(conn.request.method if conn.request is not None else b""))
                    answered += 1
                # Ends the exchange for the client now, and every later write of the
                # app's with EPIPE: nothing follows the 504.
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if answered or cut:
            self._log.error("aborted: answered 504 to %d running request%s, closed %d whose response"
                            " had begun", answered, "" if answered == 1 else "s", cut)


def response_for(method: bytes) -> bytes:
    """The whole 504 answer to a request with `method` (a HEAD gets no body)."""
    head = b"".join((
        b"HTTP/1.1 504 Gateway Timeout\r\n",
        b"Date: %s\r\n" % email.utils.formatdate(usegmt=True).encode(),
        b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(_BODY),
    ))
    return head if method == b"HEAD" else head + _BODY
