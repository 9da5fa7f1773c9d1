"""Worker lifecycle as data (pure).

A worker moves SPAWNED -> BOOTING -> READY -> DRAINING -> EXITED through `TRANSITIONS`;
any other move raises, so a bookkeeping bug surfaces at once instead of as a stray
process. Time-driven decisions (boot deadline, drain deadline, crash-loop backoff) take
`now` from the caller's clock, so tests drive them with plain numbers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    SPAWNED = "spawned"     # forked, not yet heard from
    BOOTING = "booting"     # reserved for workers that report progress before READY
    READY = "ready"         # app imported, serving
    DRAINING = "draining"   # told to stop; finishing running requests
    EXITED = "exited"       # reaped


TRANSITIONS: dict[State, frozenset[State]] = {
    State.SPAWNED: frozenset({State.BOOTING, State.READY, State.DRAINING, State.EXITED}),
    State.BOOTING: frozenset({State.READY, State.DRAINING, State.EXITED}),
    State.READY: frozenset({State.DRAINING, State.EXITED}),
    State.DRAINING: frozenset({State.EXITED}),
    State.EXITED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Worker:
    """What the master knows of one worker process."""
    app: str
    index: int
    generation: int
    pid: int
    spawned_at: float
    state: State = State.SPAWNED
    ready_at: float | None = None
    kill_at: float | None = None     # deadline after which the master sends SIGKILL

    def move(self, to: State, now: float) -> None:
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.pid} ({self.app}#{self.index}): {self.state.value} -> {to.value}")
        self.state = to
        if to is State.READY:
            self.ready_at = now

    @property
    def alive(self) -> bool:
        return self.state is not State.EXITED

    @property
    def serving(self) -> bool:
        return self.state is State.READY


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

    def record_exit(self, worker: Worker, now: float) -> float:
        """Return how long to wait before replacing `worker`."""
        lived_s = now - worker.ready_at if worker.ready_at is not None else None
        if lived_s is not None and lived_s >= self.stable_after_s:
            self.failures = 0
            return 0.0
        self.failures += 1
        return self.delay()

    def delay(self) -> float:
        if self.failures <= 1:
            return 0.0 if self.failures == 0 else self.first_delay_s
        return min(self.max_delay_s, self.first_delay_s * 2 ** (self.failures - 1))
