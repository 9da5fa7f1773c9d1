"""Which worker of an app gets the next connection (pure).

The balancer keeps, per app, the serving workers' last reported load and asks a policy
to pick one; it then passes the connection's fd to that worker. Nothing here does I/O or
reads a clock. Each policy instance belongs to one app and holds only its own small
state (a rotation position); the load figures are the caller's and are never mutated.

Promises common to every policy:

- `pick` returns one of the given `WorkerLoad` objects, or None only for an empty list.
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


class Policy(Protocol):
    def pick(self, workers: Sequence[WorkerLoad], client: str | None) -> WorkerLoad | None:
        """The worker for a new connection from `client` (its address without the port,
        or None if unknown); None only if `workers` is empty."""
        ...


def _load(worker: WorkerLoad) -> tuple[int, int]:
    return (worker.connections, worker.busy)


class LeastConnections:
    """Fewest open connections, then fewest busy; ties taken in turn.

    Load reports lag behind the connections we hand out, so between two reports every
    worker may look equally idle: rotating among the tied workers spreads a burst over all
    of them instead of piling it on the first in the list.
    """

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, workers: Sequence[WorkerLoad], client: str | None = None) -> WorkerLoad | None:
        if not workers:
            return None
        # One pass, no helper calls: the balancer runs this for every connection.
        best = None
        tied: list[WorkerLoad] = []
        for worker in workers:
            load = (worker.connections, worker.busy)
            if best is None or load < best:
                best, tied = load, [worker]
            elif load == best:
                tied.append(worker)
        choice = tied[self._turn % len(tied)]
        self._turn += 1
        return choice


class RoundRobin:
    """Each worker in list order, ignoring load.

    Rotation follows the last worker picked, not a bare index, so a worker joining or
    leaving elsewhere in the list neither skips nor repeats anyone. If the last-picked
    worker itself left, the worker that took its place in the list goes next.
    """

    __slots__ = ("_last_key", "_last_index")

    def __init__(self) -> None:
        self._last_key: int | None = None
        self._last_index = -1

    def pick(self, workers: Sequence[WorkerLoad], client: str | None = None) -> WorkerLoad | None:
        if not workers:
            return None
        # If the last-picked worker left, its successor slid into its index.
        index = self._last_index % len(workers) if self._last_index >= 0 else 0
        for position, worker in enumerate(workers):
            if worker.key == self._last_key:
                index = (position + 1) % len(workers)
                break
        choice = workers[index]
        self._last_key = choice.key
        self._last_index = index
        return choice


class RandomTwo:
    """The less loaded of two distinct workers drawn at random ("power of two choices").

    Nearly as even as least-connections when reports are fresh, and far less prone to
    stampeding one idle-looking worker when they are stale. Ties go to the first drawn.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        # A private generator, never the random module's shared one, so a seeded policy
        # is reproducible whatever else in the process draws numbers.
        self._rng = rng if rng is not None else random.Random()

    def pick(self, workers: Sequence[WorkerLoad], client: str | None = None) -> WorkerLoad | None:
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
    client address goes to least-connections. Pass the address without its port, or
    every connection of one client lands somewhere different.
    """

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
