"""Which worker of an app gets the next connection (pure).

The balancer keeps, per app, the serving workers' last reported load and asks a policy
to pick one; it then passes the connection's fd to that worker. Nothing here does I/O or
reads a clock. Each policy instance belongs to one app and holds only its own small
state (a rotation position); the load figures are the caller's and are never mutated.

Promises common to every policy:

- `pick` returns one of the given `WorkerLoad` objects that is `free` (it can serve a
  connection now: the caller keeps that flag current), or None when none is. The
  exception is "ip-hash", whose choice is the client's, not the load's: it names the
  client's worker free or not, and the caller waits for that one (`AFFINE`).
- Among the free workers each policy keeps its meaning: fewest connections, in turn,
  the less loaded of two, the client's own.
- The worker list may change between calls (workers join, leave, reorder); no policy
  crashes on that or keeps pointing at a worker that is gone.
- No policy relies on Python's salted `hash()`: with the same inputs (and the same seeded
  `rng` for "random-two") the same choices come out in every process and every run.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Protocol, Sequence

POLICIES: tuple[str, ...] = ("least-connections", "round-robin", "random-two", "ip-hash")
DEFAULT_POLICY = "least-connections"


@dataclass
class WorkerLoad:
    """One worker as the balancer sees it: a stable key and its last reported load."""
    key: int                 # identifies the worker (e.g. its pid); stable while it lives
    connections: int = 0     # open connections the worker holds
    busy: int = 0            # requests running now
    free: bool = True        # it has a thread for one more connection now


class Policy(Protocol):
    AFFINE: bool   # its choice may be a worker that is not free (see the promises)

    def pick(self, workers: Sequence[WorkerLoad], client: str | None) -> WorkerLoad | None:
        """The free worker for a new connection from `client` (its address without the
        port, or None if unknown); None if none is free."""
        ...


def _load(worker: WorkerLoad) -> tuple[int, int]:
    return (worker.connections, worker.busy)


class LeastConnections:
    """Fewest open connections, then fewest busy, among the free; ties taken in turn.

    Load reports lag behind the connections we hand out, so between two reports every
    worker may look equally idle: rotating among the tied workers spreads a burst over all
    of them instead of piling it on the first in the list. The turn goes by key (the
    tied worker with the next key after the last one picked, wrapping around), not by a
    position in the list: which workers are free and tied changes from one pick to the
    next, and a position in a different list would favour some of them.
    """

    AFFINE = False
    __slots__ = ("_last_key",)

    def __init__(self) -> None:
        self._last_key: int | None = None

    def pick(self, workers: Sequence[WorkerLoad], client: str | None = None) -> WorkerLoad | None:
        # One pass, no helper calls: the balancer runs this for every connection. Per
        # load, the tied worker with the lowest key (`first`) and the one with the
        # lowest key after the last pick (`after`).
        last = self._last_key
        best = first = after = None
        for worker in workers:
            if not worker.free:
                continue
            load = (worker.connections, worker.busy)
            key = worker.key
            if best is None or load < best:
                best, first = load, worker
                after = worker if last is None or key > last else None
            elif load == best:
                if key < first.key:
                    first = worker
                if (last is None or key > last) and (after is None or key < after.key):
                    after = worker
        choice = after if after is not None else first
        if choice is not None:
            self._last_key = choice.key
        return choice


class RoundRobin:
    """Each free worker in list order, ignoring load (a busy one's turn is skipped).

    Rotation follows the last worker picked, not a bare index, so a worker joining or
    leaving elsewhere in the list neither skips nor repeats anyone. If the last-picked
    worker itself left, the worker that took its place in the list goes next.
    """

    AFFINE = False
    __slots__ = ("_last_key", "_last_index")

    def __init__(self) -> None:
        self._last_key: int | None = None
        self._last_index = -1

    def pick(self, workers: Sequence[WorkerLoad], client: str | None = None) -> WorkerLoad | None:
        count = len(workers)
        if not count:
            return None
        # If the last-picked worker left, its successor slid into its index.
        index = self._last_index % count if self._last_index >= 0 else 0
        for position, worker in enumerate(workers):
            if worker.key == self._last_key:
                index = (position + 1) % count
                break
        for step in range(count):
            choice = workers[(index + step) % count]
            if choice.free:
                self._last_key = choice.key
                self._last_index = (index + step) % count
                return choice
        return None


class RandomTwo:
    """The less loaded of two distinct workers drawn at random ("power of two choices").

    Nearly as even as least-connections when reports are fresh, and far less prone to
    stampeding one idle-looking worker when they are stale. Ties go to the first drawn.
    Both are drawn among the free workers.
    """

    AFFINE = False
    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        # A private generator, never the random module's shared one, so a seeded policy
        # is reproducible whatever else in the process draws numbers.
        self._rng = rng if rng is not None else random.Random()

    def pick(self, workers: Sequence[WorkerLoad], client: str | None = None) -> WorkerLoad | None:
        if not all(worker.free for worker in workers):
            workers = [worker for worker in workers if worker.free]
        if not workers:
            return None
        if len(workers) == 1:
            return workers[0]
        first, second = self._rng.sample(range(len(workers)), 2)
        a, b = workers[first], workers[second]
        return b if _load(b) < _load(a) else a


class IpHash:
    """The same client address goes to the same worker for as long as that worker lives.

    Rendezvous (highest-random-weight) hashing: every worker scores
    blake2b(key, client) and the highest score wins. Removing a worker moves only the
    clients it had; adding one takes only the clients it now wins. A connection with no
    client address goes to least-connections (among the free). Pass the address without
    its port, or every connection of one client lands somewhere different.

    The client's worker is named whether it is free or not (`AFFINE`): its connection
    waits for that worker rather than go to another.
    """

    AFFINE = True
    __slots__ = ("_fallback",)

    def __init__(self) -> None:
        self._fallback = LeastConnections()

    def pick(self, workers: Sequence[WorkerLoad], client: str | None) -> WorkerLoad | None:
        if not workers:
            return None
        if client is None:
            return self._fallback.pick(workers, None)
        address = client.encode("utf-8", "surrogatepass")
        return max(workers, key=lambda worker: (_score(worker.key, address), worker.key))


def _score(key: int, address: bytes) -> int:
    digest = hashlib.blake2b(b"%d\x00%s" % (key, address), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def make_policy(name: str = DEFAULT_POLICY, rng: random.Random | None = None) -> Policy:
    """A fresh policy instance by its config name (one of `POLICIES`).

    `rng` is used only by "random-two". Raises ValueError on an unknown name.
    """
    if name == "least-connections":
        return LeastConnections()
    if name == "round-robin":
        return RoundRobin()
    if name == "random-two":
        return RandomTwo(rng)
    if name == "ip-hash":
        return IpHash()
    raise ValueError(f"unknown balancing policy {name!r}; expected one of {', '.join(POLICIES)}")
