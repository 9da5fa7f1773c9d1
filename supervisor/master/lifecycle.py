"""Worker lifecycle as data (pure).

A worker record moves through `TRANSITIONS`; any other move raises, so a bookkeeping
bug surfaces at once instead of as a stray process:

    BACKOFF ──▶ SPAWNED ──▶ BOOTING ──▶ READY ──▶ DRAINING ──▶ EXITED
       │           │           │          │                      ▲
       └───────────┴───────────┴──────────┴──────────────────────┘

* BACKOFF: a replacement waiting out the crash-loop delay before it is forked (or
  dropped, if the app stops or shrinks meanwhile).
* SPAWNED: the master asked for a fork; the fork has not been confirmed yet. (A
  preloaded app's worker is forked by its template: one retired after the template
  was asked, before the worker said HELLO, goes to DRAINING, since it may exist.)
* BOOTING: forked, importing the app; not serving.
* READY: said READY; serving (routed to, once its generation is current).
* DRAINING: told to stop (or being killed); finishing its running requests.
* EXITED: reaped, or never forked.

Time-driven decisions take `now` from the caller's clock, so tests drive them with
plain numbers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    BACKOFF = "backoff"
    SPAWNED = "spawned"
    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    EXITED = "exited"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.BACKOFF: frozenset({State.SPAWNED, State.EXITED}),
    State.SPAWNED: frozenset({State.BOOTING, State.DRAINING, State.EXITED}),
    State.BOOTING: frozenset({State.READY, State.DRAINING, State.EXITED}),
    State.READY: frozenset({State.DRAINING, State.EXITED}),
    State.DRAINING: frozenset({State.EXITED}),
    State.EXITED: frozenset(),
}

# The states in which a process exists (or is being made) for the record.
ALIVE = frozenset({State.SPAWNED, State.BOOTING, State.READY, State.DRAINING})


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Backoff:
    """Crash-loop backoff for one app: a growing, capped delay before the next spawn.

    A worker that dies before READY, or within `stable_after_s` of it, counts as a
    failure; one that lived longer resets the count.
    """
    first_delay_s: float = 0.1
    max_delay_s: float = 30.0
    stable_after_s: float = 5.0
    failures: int = 0

    def record_exit(self, ready_at: float | None, now: float) -> float:
        """Return how long to wait before replacing a worker that became READY at
        `ready_at` (None: never) and exited at `now`."""
        if ready_at is not None and now - ready_at >= self.stable_after_s:
            self.failures = 0
            return 0.0
        self.failures += 1
        return self.delay()

    def delay(self) -> float:
        if self.failures <= 1:
            return 0.0 if self.failures == 0 else self.first_delay_s
        return min(self.max_delay_s, self.first_delay_s * 2 ** (self.failures - 1))
