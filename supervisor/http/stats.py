"""A worker's request figures, as /metrics reports them (pure).

The serving loop tells `RequestStats` when a request's app call starts and when its
response is done (or when Baton answered a request itself: a bad or late head, a
misdirected host); `snapshot()` is what the worker's STATS message says. Everything
is counted since the worker started, so a message lost on the way costs nothing.

Promises: every answered request is counted once, by its status class and in exactly
one duration bucket, so the buckets add up to the responses; `in_flight` counts the
requests whose app call started and whose response is not done; `changed` says
whether anything moved since the last snapshot. Only the loop's thread calls it.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from supervisor.ipc.messages import REQUEST_DURATION_BOUNDS_S, STATUS_CLASSES, Stats


class RequestStats:
    """Counts since the worker started; see the module's promises."""

    __slots__ = ("in_flight", "responses", "durations", "duration_sum_s", "changed", "on_started")

    def __init__(self) -> None:
        self.in_flight = 0
        self.responses = [0] * len(STATUS_CLASSES)
        self.durations = [0] * (len(REQUEST_DURATION_BOUNDS_S) + 1)
        self.duration_sum_s = 0.0
        self.changed = False
        # Told when a request starts, before the app runs: a worker with one thread runs
        # it on its loop, which says nothing more until the call returns.
        self.on_started: Callable[[], None] | None = None

    def started(self) -> None:
        """A request's app call began."""
        self.in_flight += 1
        self.changed = True
        if self.on_started is not None:
            self.on_started()

    def finished(self, status: str, duration_s: float) -> None:
        """The response of a started request is done (whole, or cut short)."""
        if self.in_flight:
            self.in_flight -= 1
        self.answered(status, duration_s)

    def answered(self, status: str, duration_s: float) -> None:
        """A response went out with `status` ("404", or "404 Not Found"), `duration_s`
        after its head was complete (0 when there was no whole head to time from)."""
        digit = status[:1]
        index = ord(digit) - 49 if digit else 4
        self.responses[index if 0 <= index < 5 else 4] += 1   # the app's statuses are 1xx-5xx
        duration_s = max(0.0, duration_s)
        self.durations[bisect_left(REQUEST_DURATION_BOUNDS_S, duration_s)] += 1
        self.duration_sum_s += duration_s
        self.changed = True

    def snapshot(self) -> Stats:
        """The STATS message saying all of it; `changed` is False afterwards."""
        self.changed = False
        return Stats(in_flight=self.in_flight, responses=tuple(self.responses), durations=tuple(self.durations),
                     duration_sum_s=self.duration_sum_s)
