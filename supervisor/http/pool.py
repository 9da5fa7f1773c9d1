"""The worker's thread pool: application calls off the serving loop (``threads > 1``).

`Pool.submit(item)` queues an item for one of the pool's threads, which calls
`run(item)`; the loop then hears of each finished item through `finished(item)`.
Promises:

* `finished` is called on the loop's thread only (the pool wakes the loop with
  `loop.threadsafe_waker`), once for every item that finished before `shutdown()`.
* `busy` counts items submitted and not yet given to `finished`; it is the loop's
  thread's to read.
* An exception escaping `run` is logged to `error_log`; the item still finishes.
* After `shutdown()`, nothing more reaches the loop: an item that finishes later is
  given to `abandon(item)` on the thread that ran it (the loop may be gone), and so
  is every finished item not yet delivered. The threads exit once idle; one stuck in
  an application call is a daemon thread and does not keep the process alive.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

from supervisor.system.loop import Loop

__all__ = ["Pool"]


class Pool:
    """`threads` threads running `run(item)` for the items the loop submits."""

    def __init__(self, threads: int, run: Callable[[object], None],
                 finished: Callable[[object], None], abandon: Callable[[object], None],
                 loop: Loop, error_log: logging.Logger, name: str = "baton-http") -> None:
        self._run = run
        self._finished = finished
        self._abandon = abandon
        self._error_log = error_log
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._done: deque = deque()   # finished, not yet delivered (appends and pops are atomic)
        self._shut_down = False
        self.busy = 0
        self._wake = loop.threadsafe_waker(self._deliver)
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def size(self) -> int:
        return len(self._threads)

    def submit(self, item) -> None:
        self.busy += 1
        self._work.put(item)

    def shutdown(self) -> None:
        """Stop delivering; abandon what finished meanwhile; let the threads exit."""
        self._shut_down = True
        self._abandon_done()
        for _ in self._threads:
            self._work.put(None)

    def _serve(self) -> None:
        work = self._work
        while True:
            item = work.get()
            if item is None:
                return
            try:
                self._run(item)
            except BaseException:   # noqa: BLE001 - never lose an item
                self._error_log.exception("unexpected error serving a request")
            self._done.append(item)
            # The flag is read after the append: either the loop's shutdown sees the
            # item in _done, or this thread sees the flag (both may try: pops are atomic).
            if self._shut_down:
                self._abandon_done()
            else:
                self._wake()

    def _deliver(self) -> None:
        """On the loop's thread: hand every finished item to `finished`."""
        done = self._done
        while done and not self._shut_down:
            item = done.popleft()
            self.busy -= 1
            self._finished(item)

    def _abandon_done(self) -> None:
        while True:
            try:
                item = self._done.popleft()
            except IndexError:
                return
            self._abandon(item)
