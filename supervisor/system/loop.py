"""The one event loop of every Baton process: master, balancer, worker, watcher.

One `epoll` wait per iteration, with the nearest timer as its timeout. Promises:

* **Handlers are zero-argument callables**, one per registered fd. A handler that
  cares whether its fd is readable or writable knows what it asked for (`modify`).
* **Registration is level-triggered unless it says `EDGE`** (`READ | EDGE`): then the
  handler runs when new readiness arrives (more bytes, a hang-up), not on every
  iteration while the fd stays ready. For sockets whose bytes are peeked and left in
  place (the balancer's Host/SNI peek), which would otherwise wake every iteration.
* **Stale events are skipped.** An fd unregistered by an earlier handler of the same
  batch (closed, or closed and reused by a new registration) gets none of that batch's
  events: they belonged to the socket that is gone. This is the rule every loop of
  Baton had to learn separately; the master crash of d70cbce was its absence.
* **Time is read once per iteration**, from the injected clock, right after the wait:
  `now` is what handlers and timers see. A timer fires on the first iteration whose
  `now` reaches it: late by at most one iteration's work, never early.
* **Timers are cheap to cancel** (a flag; the heap drops cancelled entries lazily and
  is compacted when they outnumber live ones). A cancelled timer lets go of its
  callback at once, so what the callback refers to is not kept until then.
* **Signal handlers only record.** `on_signal` routes a signal through Python's wakeup
  fd; its callback runs in the loop, never inside the signal handler.
* **Other threads wake the loop only through `threadsafe_waker`**; nothing else here
  may be called from another thread.
* `close()` releases every fd the loop itself opened; fds registered by callers stay
  theirs to close.
"""
from __future__ import annotations

import heapq
import itertools
import select
import signal
import socket
import time
from collections.abc import Callable

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
HANGUP = select.EPOLLRDHUP   # the peer shut its writing side
EDGE = select.EPOLLET        # with READ (and HANGUP): once per new arrival, see above

Handler = Callable[[], None]

_COMPACT_MIN = 64     # cancelled heap entries tolerated before compaction is considered


class Timer:
    """A callback due at `when` (the loop's clock); `cancel()` makes it never run."""

    __slots__ = ("when", "callback", "cancelled", "_queued", "_loop")

    def __init__(self, loop: "Loop", when: float, callback: Handler) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        self._queued = False   # an entry for it is in the heap
        self._loop = loop

    def cancel(self) -> None:
        """Never run; the callback is released at once, so a cancelled timer still
        waiting in the heap keeps nothing it refers to alive."""
        if not self.cancelled:
            self.cancelled = True
            self.callback = _released
            if self._queued:
                self._loop._cancelled += 1


_new_timer = object.__new__   # a Timer without the call to __init__ (see call_at)


class Loop:
    """Run handlers for ready fds, due timers and signals, until `stop()`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.now = clock()
        self.batch = 0   # how many fds the last wakeup found ready (more than one: busy)
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._stale: set[int] = set()     # unregistered during the batch being dispatched
        self._dispatching = False
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self._cancelled = 0
        self._before_wait: list[Handler] = []
        self._after_events: list[Handler] = []
        self._running = False
        self._stop_requested = False
        self._signal_callbacks: dict[int, Callable[[int], None]] = {}
        self._signal_pair: tuple[socket.socket, socket.socket] | None = None
        self._wake_pair: tuple[socket.socket, socket.socket] | None = None
        self._wake_callbacks: list[Handler] = []

    # -- fds ------------------------------------------------------------------

    def register(self, fileobj, handler: Handler, events: int = READ) -> None:
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        if fd in self._handlers:
            raise KeyError(f"fd {fd} is already registered")
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fileobj, events: int, handler: Handler | None = None) -> None:
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        if fd not in self._handlers:
            raise KeyError(f"fd {fd} is not registered")
        self._epoll.modify(fd, events)
        if handler is not None:
            self._handlers[fd] = handler

    def unregister(self, fileobj) -> None:
        """Stop watching an fd; safe on one already closed (the kernel dropped it)."""
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        del self._handlers[fd]   # KeyError when not registered: a bookkeeping bug
        self.forget_closed(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass

    def forget_closed(self, fd: int) -> None:
        """The caller closed the only descriptor of `fd`'s file, which removed it from
        epoll: drop its handler without a syscall (a no-op if it was not registered)."""
        self._handlers.pop(fd, None)
        if self._dispatching:
            self._stale.add(fd)

    def registered(self, fileobj) -> bool:
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        return fd in self._handlers

    # -- time -----------------------------------------------------------------

    def call_at(self, when: float, callback: Handler) -> Timer:
        # Timer(...) and _push, inlined: the worker's server arms one per connection.
        timer = _new_timer(Timer)
        timer.when, timer.callback, timer._loop = when, callback, self
        timer.cancelled, timer._queued = False, True
        timers = self._timers
        heapq.heappush(timers, (when, next(self._timer_seq), timer))
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(timers):
            self._compact()
        return timer

    def call_later(self, delay_s: float, callback: Handler) -> Timer:
        return self.call_at(self.now + delay_s, callback)

    def every(self, interval_s: float, callback: Handler) -> Timer:
        """Call `callback` every `interval_s` from the loop (a heartbeat: it stops when
        the loop is stuck, which is the point); cancel the returned timer to stop."""
        def tick() -> None:
            timer.when = self.now + interval_s
            self._push(timer)
            callback()
        timer = Timer(self, self.now + interval_s, tick)
        self._push(timer)
        return timer

    def _push(self, timer: Timer) -> None:
        timer._queued = True
        heapq.heappush(self._timers, (timer.when, next(self._timer_seq), timer))
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._timers):
            self._compact()

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)[2]._queued = False
            self._cancelled -= 1
        return timers[0][0] if timers else None

    def _compact(self) -> None:
        live = []
        for entry in self._timers:
            if entry[2].cancelled:
                entry[2]._queued = False
            else:
                live.append(entry)
        heapq.heapify(live)
        self._timers[:] = live
        self._cancelled = 0

    def _run_due_timers(self) -> None:
        timers, now = self._timers, self.now
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            timer._queued = False
            if timer.cancelled:
                self._cancelled -= 1
                continue
            timer.callback()

    # -- signals and other threads ----------------------------------------------

    def on_signal(self, signum: int, callback: Callable[[int], None]) -> None:
        """Run `callback(signum)` in the loop whenever `signum` arrives."""
        if self._signal_pair is None:
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._signal_pair = (reader, writer)
            self.register(reader, self._on_signal_bytes)
        self._signal_callbacks[signum] = callback
        signal.signal(signum, _record_only)

    def _on_signal_bytes(self) -> None:
        try:
            data = self._signal_pair[0].recv(512)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            callback = self._signal_callbacks.get(signum)
            if callback is not None:
                callback(signum)

    def threadsafe_waker(self, callback: Handler) -> Callable[[], None]:
        """Return a function any thread may call: the loop wakes and runs `callback`
        (once per wakeup, however many calls were made meanwhile)."""
        if self._wake_pair is None:
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            self._wake_pair = (reader, writer)
            self.register(reader, self._on_wake_bytes)
        self._wake_callbacks.append(callback)
        writer = self._wake_pair[1]

        def wake() -> None:
            try:
                writer.send(b"w")
            except OSError:   # full (the loop is awake anyway) or closed (it is gone)
                pass
        return wake

    def _on_wake_bytes(self) -> None:
        reader = self._wake_pair[0]
        try:
            while reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        for callback in self._wake_callbacks:
            callback()

    # -- running ----------------------------------------------------------------

    def before_wait(self, callback: Handler) -> None:
        """Call `callback` at the start of every iteration, before the wait."""
        self._before_wait.append(callback)

    def after_events(self, callback: Handler) -> None:
        """Call `callback` once per iteration, after its events and timers: where news
        gathered meanwhile (one message for many connections) goes out."""
        self._after_events.append(callback)

    def run_once(self, max_wait_s: float | None = None) -> None:
        for callback in self._before_wait:
            callback()
        if self._stop_requested:
            return   # a before-wait callback stopped the loop
        timers = self._timers
        while timers and timers[0][2].cancelled:   # next_deadline, inlined
            heapq.heappop(timers)[2]._queued = False
            self._cancelled -= 1
        deadline = timers[0][0] if timers else None
        if deadline is None:
            timeout = -1.0
        else:
            timeout = deadline - self.now
            if timeout < 0.0:
                timeout = 0.0
        if max_wait_s is not None and (timeout < 0 or timeout > max_wait_s):
            timeout = max_wait_s
        events = self._epoll.poll(timeout)
        self.now = self.clock()
        self.batch = len(events)
        handlers, stale = self._handlers, self._stale
        self._dispatching = True
        try:
            for fd, _ in events:
                handler = handlers.get(fd)
                if handler is None or (stale and fd in stale):
                    continue
                handler()
        finally:
            self._dispatching = False
            if stale:
                stale.clear()
        if self._timers and self._timers[0][0] <= self.now:
            self._run_due_timers()
        for callback in self._after_events:
            callback()

    def run(self) -> None:
        """Iterate until `stop()` (from a handler, a timer or a before-wait callback)."""
        self._running, self._stop_requested = True, False
        try:
            while not self._stop_requested:
                self.run_once()
        finally:
            self._running = False

    def stop(self) -> None:
        self._stop_requested = True

    @property
    def running(self) -> bool:
        return self._running

    def close(self) -> None:
        if self._signal_pair is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._signal_pair:
                sock.close()
            self._signal_pair = None
        if self._wake_pair is not None:
            for sock in self._wake_pair:
                sock.close()
            self._wake_pair = None
        self._handlers.clear()
        self._timers.clear()
        self._epoll.close()


def _released() -> None:
    """The callback of a cancelled timer (which never runs): the real one is let go."""


def _record_only(signum, frame) -> None:
    """The wakeup fd carries the signal number to the loop; the handler does nothing."""
