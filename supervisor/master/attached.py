"""The master's attached workers (pure): which serve, which stand by, which are gone.

A worker started elsewhere (`baton worker --attach`, see `master.attach_points`) is not
the master's child, and the master never signals it: it knows it by a key, the pid and
uid that SO_PEERCRED saw, and the version tag it introduced itself with. Per app, one
tag is *live*: its ready workers get connections from the balancer. Workers of any
other tag stand by: ready and attached, given no connection, handing back every kept
one as soon as it is idle, until their tag is promoted (a blue/green deploy, and its
rollback, are the same `promote`).

Promises:

1. While an app has no live tag, the first tag with a ready worker becomes live.
2. `promote(app, tag)` makes `tag` live if one of its workers is ready, else raises
   ValueError saying why. Its workers are routed before the old tag's are unrouted, so
   the app is never without a worker; each routed worker is told `Standby(False)`, each
   unrouted one `Standby(True)`.
3. With `attach_promote = N` (> 0), a tag that is not live is promoted by itself once
   N of its workers are ready. A live tag with no ready worker left gives way by
   itself too: to the tag with the most ready workers standing by, or, if none, to the
   next tag that has one ready.
4. A worker not ready within `boot_s` of joining, or silent (no heartbeat) for
   `silent_s`, is dropped: `Drop(key, why)`, and it is forgotten. A worker whose
   channel ended is forgotten (`left`): the shell has closed everything of it.
5. No action names a key this registry does not hold, and none comes for a key after
   its `Drop` or `left`. Decisions read time only from the injected clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Route:
    """Give the worker connections (attach it to every balancer)."""
    key: int


@dataclass(frozen=True)
class Unroute:
    """Give the worker no more connections (it stays attached, and reports)."""
    key: int


@dataclass(frozen=True)
class Standby:
    key: int
    standby: bool


@dataclass(frozen=True)
class Drop:
    """End the worker's channel and its balancer links (it is gone for us)."""
    key: int
    why: str


@dataclass(frozen=True)
class Log:
    level: str
    text: str


Action = Route | Unroute | Standby | Drop | Log


@dataclass
class AttachedWorker:
    key: int
    app: str
    tag: str
    pid: int            # as SO_PEERCRED saw it (0: in a PID namespace we cannot see)
    uid: int
    gid: int
    joined_at: float
    ready_at: float | None = None
    heard_at: float | None = None
    routed: bool = False
    requests: int = 0
    connections: int = 0

    @property
    def state(self) -> str:
        if self.ready_at is None:
            return "booting"
        return "serving" if self.routed else "standby"

    def describe(self) -> str:
        tag = self.tag or '""'
        return f"attached {self.app} tag {tag} (pid {self.pid}, uid {self.uid})"


@dataclass
class AppPolicy:
    boot_s: float
    silent_s: float
    promote_after: int = 0   # attach_promote: 0, by hand only
    live: str | None = None  # the tag that serves


@dataclass
class Attached:
    """Every attached worker of every app; see the module docstring."""
    clock: Callable[[], float]
    workers: dict[int, AttachedWorker] = field(default_factory=dict)
    apps: dict[str, AppPolicy] = field(default_factory=dict)

    def configure(self, app: str, boot_s: float, silent_s: float, promote_after: int) -> None:
        """The app's settings (at start and on each reload); its live tag stays."""
        policy = self.apps.get(app)
        if policy is None:
            self.apps[app] = AppPolicy(boot_s, silent_s, promote_after)
        else:
            policy.boot_s, policy.silent_s, policy.promote_after = boot_s, silent_s, promote_after

    def forget_app(self, app: str, why: str) -> list[Action]:
        """The app takes no attached workers any more (a reload): each is dropped."""
        self.apps.pop(app, None)
        actions: list[Action] = []
        for worker in [w for w in self.workers.values() if w.app == app]:
            del self.workers[worker.key]
            actions += [Log("warning", f"worker {worker.describe()}: {why}; dropping it"), Drop(worker.key, why)]
        return actions

    # -- events ------------------------------------------------------------------------

    def joined(self, key: int, app: str, tag: str, pid: int, uid: int, gid: int) -> list[Action]:
        """A worker was welcomed (its settings sent); it boots. KeyError for a known key
        or an app that takes no attached workers."""
        if key in self.workers:
            raise KeyError(f"attached worker {key} is known already")
        if app not in self.apps:
            raise KeyError(f"app {app!r} takes no attached workers")
        worker = self.workers[key] = AttachedWorker(key, app, tag, pid, uid, gid, self.clock())
        return [Log("info", f"worker {worker.describe()} attached; booting")]

    def ready(self, key: int) -> list[Action]:
        worker = self.workers.get(key)
        if worker is None or worker.ready_at is not None:
            return []
        worker.ready_at = worker.heard_at = self.clock()
        policy = self.apps[worker.app]
        actions: list[Action] = []
        if policy.live is None:
            policy.live = worker.tag
            actions.append(Log("info", f"app {worker.app}: tag {worker.tag or chr(34) * 2} is live "
                                       "(its first ready attached worker)"))
        elif worker.tag != policy.live and not self._ready_count(worker.app, policy.live):
            return [*self.promote(worker.app, worker.tag, why=f"tag {policy.live!r} has no ready worker"),
                    Log("info", f"worker {worker.describe()} ready, serving")]
        if worker.tag == policy.live:
            worker.routed = True
            actions += [Route(key), Log("info", f"worker {worker.describe()} ready, serving")]
            return actions
        actions.append(Log("info", f"worker {worker.describe()} ready, standing by (app {worker.app} "
                                   f"serves tag {policy.live or chr(34) * 2})"))
        if policy.promote_after and self._ready_count(worker.app, worker.tag) >= policy.promote_after:
            actions += self.promote(worker.app, worker.tag, why=f"{policy.promote_after} of its workers are ready")
        return actions

    def heard(self, key: int, requests: int, connections: int) -> None:
        worker = self.workers.get(key)
        if worker is not None:
            worker.heard_at = self.clock()
            worker.requests, worker.connections = requests, connections

    def left(self, key: int, why: str) -> list[Action]:
        """Its channel ended (it exited, or closed it): forgotten."""
        worker = self.workers.pop(key, None)
        if worker is None:
            return []
        return [Log("warning" if worker.ready_at is None else "info", f"worker {worker.describe()} left: {why}"),
                *self._fall_back(worker.app)]

    def _fall_back(self, app: str) -> list[Action]:
        """The live tag has no ready worker left: the tag with the most ready workers
        that stand by serves instead (an app is never left unserved for a tag)."""
        policy = self.apps.get(app)
        if policy is None or policy.live is None or self._ready_count(app, policy.live):
            return []
        counts: dict[str, int] = {}
        for worker in self.workers.values():
            if worker.app == app and worker.ready_at is not None:
                counts[worker.tag] = counts.get(worker.tag, 0) + 1
        if not counts:
            return []
        best = max(sorted(counts), key=lambda tag: counts[tag])
        return self.promote(app, best, why=f"tag {policy.live!r} has no ready worker left")

    def promote(self, app: str, tag: str, why: str = "promoted") -> list[Action]:
        """Make `tag` the app's live one (see promise 2)."""
        policy = self.apps.get(app)
        if policy is None:
            raise ValueError(f"app {app!r} takes no attached workers")
        if not self._ready_count(app, tag):
            tags = sorted({w.tag for w in self.workers.values() if w.app == app and w.ready_at is not None})
            raise ValueError(f"no ready worker of app {app!r} has tag {tag!r} (ready tags: "
                             f"{', '.join(repr(t) for t in tags) or 'none'})")
        if policy.live == tag:
            return []
        old, policy.live = policy.live, tag
        mine = [w for w in self.workers.values() if w.app == app and w.ready_at is not None]
        others = f", {old!r} stands by" if old is not None and self._ready_count(app, old) else ""
        actions: list[Action] = [Log("info", f"app {app}: tag {tag!r} is live{others} ({why})")]
        for worker in mine:
            if worker.tag == tag and not worker.routed:
                worker.routed = True
                actions += [Route(worker.key), Standby(worker.key, False)]
        for worker in mine:
            if worker.tag != tag and worker.routed:
                worker.routed = False
                actions += [Unroute(worker.key), Standby(worker.key, True)]
        return actions

    def tick(self) -> list[Action]:
        """Drop the workers past their boot or silence deadline."""
        now = self.clock()
        actions: list[Action] = []
        for worker in list(self.workers.values()):
            why = self._overdue(worker, now)
            if why is not None:
                del self.workers[worker.key]
                actions += [Log("warning", f"worker {worker.describe()} {why}; dropping it"), Drop(worker.key, why),
                            *self._fall_back(worker.app)]
        return actions

    def next_deadline(self) -> float | None:
        deadlines = [self._deadline(worker) for worker in self.workers.values()]
        return min(deadlines, default=None)

    # -- questions ---------------------------------------------------------------------

    def of_app(self, app: str) -> list[AttachedWorker]:
        return [worker for worker in self.workers.values() if worker.app == app]

    def _ready_count(self, app: str, tag: str) -> int:
        return sum(1 for w in self.workers.values() if w.app == app and w.tag == tag and w.ready_at is not None)

    def _deadline(self, worker: AttachedWorker) -> float:
        policy = self.apps[worker.app]
        if worker.ready_at is None:
            return worker.joined_at + policy.boot_s
        return worker.heard_at + policy.silent_s

    def _overdue(self, worker: AttachedWorker, now: float) -> str | None:
        if now < self._deadline(worker):
            return None
        policy = self.apps[worker.app]
        if worker.ready_at is None:
            return f"was not ready within {policy.boot_s:g} s"
        return f"sent no heartbeat for {policy.silent_s:g} s"
