"""The worker's STATS messages to the master: its request figures, soon after they change.

/metrics must count a response within a moment of it, in `share` mode too, where no
balancer sees the requests; the heartbeat (once a second) is too slow for that. So
after each loop iteration in which a figure moved, the worker sends the master a
STATS message saying all of them, at most once per STATS_MIN_INTERVAL_S: the first
change after a quiet spell goes out at once, and a busy worker sends about twenty a
second, whatever its request rate. A send the master's full channel refuses is tried
again after that interval (each message says everything, so none is lost for good).
"""
from __future__ import annotations

import select
import socket

from supervisor.http.stats import RequestStats
from supervisor.ipc import channel
from supervisor.system.loop import Loop, Timer

STATS_MIN_INTERVAL_S = 0.05
FLUSH_WAIT_S = 1.0   # how long an exiting worker waits for room for its last figures


class StatsSender:
    """Sends `stats` over `sock` from `loop`: call `after_events` after every loop
    iteration (it is cheap when nothing changed), `flush` before the worker exits."""

    def __init__(self, loop: Loop, sock: socket.socket, stats: RequestStats,
                 min_interval_s: float = STATS_MIN_INTERVAL_S) -> None:
        self.loop = loop
        self.sock = sock
        self.stats = stats
        self.min_interval_s = min_interval_s
        self.sent_at = float("-inf")
        self.timer: Timer | None = None
        # A request about to run on the loop (one thread) would hide itself from
        # requests-in-flight until it ends: it is said before it runs, when that is due.
        stats.on_started = self.after_events

    def after_events(self) -> None:
        """Send, if a figure changed and the last send is STATS_MIN_INTERVAL_S old; else
        make sure a timer will."""
        if not self.stats.changed or self.timer is not None:
            return
        due = self.sent_at + self.min_interval_s
        if self.loop.now >= due:
            self._send()
        else:
            self.timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.stats.changed:
            self._send()

    def _send(self) -> None:
        self.sent_at = self.loop.now
        message = self.stats.snapshot()
        try:
            channel.send(self.sock, message)
        except BlockingIOError:   # the master is behind: say it all a little later
            self.stats.changed = True
            self.timer = self.loop.call_later(self.min_interval_s, self._on_timer)
        except OSError:
            pass   # the master is gone: the heartbeat notices and stops the worker

    def flush(self) -> None:
        """The last figures, if the master has not heard them (the worker is exiting)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.stats.changed:
            return
        message = self.stats.snapshot()
        for _ in range(2):   # a master behind on reading gets a moment to make room, once
            try:
                channel.send(self.sock, message)
                return
            except BlockingIOError:
                select.select([], [self.sock], [], FLUSH_WAIT_S)
            except OSError:
                return
