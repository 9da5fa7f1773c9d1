"""Which worker takes a connection, and what waits for one (pure, sans I/O).

The balancer's process shell feeds a `Dispatcher` events: a connection is ready to go
to a worker of its app, a worker attached, was detached, reported, or went away, a
send failed, time passed. It answers with decisions, which the shell carries out:

* `Send(conn, worker, conn_id)`: pass the connection to that worker, numbered
  `conn_id` for the worker's REPORT.
* `Refuse(conn, reason)`: no worker will take it; answer 503 (`OVERFLOW`,
  `QUEUE_TIMEOUT`, `WORKER_REFUSED`) or just close it (`APP_GONE`: its app went away
  with a reload).
* nothing (None, or no entry in a list): the connection waits in the queue.

Promises:

1. **A decision is carried out unless the shell says otherwise.** The core counts a
   `Send` as done when it makes it (the worker holds one connection more, the
   connection is unacknowledged until that worker's REPORT acks it). A send that fails
   (the worker's channel is full, or broken) goes back through `send_failed`, which
   takes the send back and answers for the same connection: another worker, the queue,
   or a 503 for the oldest queued connection to make room. The hot path (a new
   connection, a free worker) is one `dispatch` call and nothing more.
2. **Only accepting workers get connections**: attached, not detached, not gone, and
   not a peer balancer (a negative key: the old master's balancer after an upgrade,
   which only hands connections over). Among them the app's `balancing` policy
   (`policies.py`) chooses; the core only keeps each app's policy instance.
2a. **Only a worker that can serve now gets one**: a free worker is one whose threads
   outnumber its reported busy ones plus the connections sent to it that it has not
   acknowledged (`unacked`). So a connection just sent makes its worker busy at once,
   in the same instant, until the worker's REPORT says otherwise; the worker's
   acknowledging REPORT counts the connections it acknowledges among its busy ones
   (it has not served them yet), and the REPORT it sends when a thread frees says it
   is free again. A worker's thread count is its reports' word; until its first
   report it is taken to have one. Policies choose among the free workers, except
   ip-hash, whose connection waits for the client's own worker when that one is busy.
2b. **When no worker is free, one may take connections ahead** (`prefetch`, PREFETCH
   by default): a worker whose busy and unacknowledged count is below its threads plus
   `prefetch` (plus at most as many as its last REPORT that closed connections closed,
   one before any did: so a worker takes ahead what it shows it gets through in one
   go, and a burst never piles onto a worker that might be stuck), and that made progress (a REPORT saying fewer busy than the one before,
   or closing connections) within the last `prefetch_window_s`, gets it; of several,
   the one that progressed last. A saturated worker then finds its next connection in
   its channel when a request ends, instead of idling through a round trip; a worker
   stuck in a slow request soon stops progressing and gets none, so a connection never
   waits behind a slow request while another worker would free up sooner. Promise 2a
   is kept first: a spare slot is used only when no worker is free (ip-hash: never).
2c. **A connection a worker has not read yet is taken back for a worker that is free.**
   When an app's queue is empty and one of its workers has a free thread, while another
   has unacknowledged connections and has been silent for `steal_after_s` (in a slow
   request, or stopped), `steals` names that worker, once per connection the free
   threads could take, longest silent first. Silent means: no progress since it was
   last given a connection while it had none unacknowledged, nor since its last REPORT
   that showed progress (an idle worker is not silent the moment it gets one). The
   shell reads the oldest CONN still unread in that worker's channel (from its copy of
   the worker's end, the same one a dead worker's unread connections are read back
   from) and calls `stolen`, which takes the connection back and answers for it as
   `dispatch` does, with any worker but that one. When there was nothing left to read
   (the worker read them all), `steal_missed` says so, and that worker is not tried
   again until it progresses. When a worker is silent but not yet for long enough,
   `steals` says when to look again. (Not for ip-hash, whose connections wait for
   their own worker.) So a connection sent ahead to a worker that then stayed in a
   slow request does not wait for it while another is free, which the kernel's queue
   cannot do once a worker accepted.
3. **The queue is bounded, and first in first out per app** (per worker for ip-hash,
   whose connections wait for their own). A connection no free worker could take
   waits; when `queue_limit` connections already wait (all apps together),
   the oldest of them (of any app) is refused with `OVERFLOW` to make room. A
   connection waits at most `queue_timeout_s` from the moment it entered the queue (a
   failed attempt to send it does not restart that wait); then `expire` refuses it
   with `QUEUE_TIMEOUT`.
4. **Queued connections go out as soon as a worker may take them**: after the app's
   worker attached or reported itself free (a report also means it read its channel,
   so there is room), or the routes changed. `next_queued` hands them out oldest first
   to the free workers; when none is free, or one that no worker of its app could take
   goes back to the front, that app's queue rests until its next such event (no busy
   loop on a full channel).
5. **No connection is lost with a worker.** When a worker goes away, every connection
   it had not acknowledged and never read is dispatched again, as if just accepted
   (the shell says which it never read; a worker acknowledges lazily, so one it read
   may be unacknowledged, and that one went with it). One a worker
   refused (its fd never reached it: it was out of fds) goes at once to another
   accepting worker of its app; when there is none, or it was refused as many times as
   its app has accepting workers, it is refused with `WORKER_REFUSED` (never queued,
   for the same worker to refuse again).
6. Time is the injected `clock`'s; nothing here does I/O or reads the system clock.

A `Connection` is the core's view of a connection; the shell subclasses it with the
socket and whatever else it must send along. The core never touches those.
"""
from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from supervisor.balancer import policies
from supervisor.balancer.policies import WorkerLoad
from supervisor.ipc.messages import PREFETCH

QUEUE_LIMIT = 1024
QUEUE_TIMEOUT_S = 30.0
PREFETCH_WINDOW_S = 0.005   # a worker silent longer may be stuck in a slow request
STEAL_AFTER_S = 0.001       # a worker silent this long with unread connections: take them back (2c)

# Why a connection is refused; the two 503s are also the counters' names.
OVERFLOW = "overflow_503"
QUEUE_TIMEOUT = "queue_timeout_503"
WORKER_REFUSED = "worker_refused_503"
APP_GONE = "app_gone"


class Connection:
    """A connection that no worker owns yet: its app, and the client address ip-hash
    reads (without the port; None if unknown). `queued_at`, `deadline` and `refusals`
    are the core's: when it entered the queue, when it leaves it with a 503, and how
    many workers refused it."""

    __slots__ = ("app", "client", "queued_at", "deadline", "refusals")

    def __init__(self, app: str | None, client: str | None = None) -> None:
        self.app = app
        self.client = client
        self.queued_at = 0.0
        self.deadline = 0.0
        self.refusals = 0


class Worker(WorkerLoad):
    """A worker link as the core sees it: its load (what policies read; `free` is kept
    by the core, promise 2a), its app, its thread count, whether it takes connections,
    and the connections sent to it that it has not acknowledged yet (conn id ->
    Connection), which go elsewhere if it dies."""

    def __init__(self, key: int, app: str) -> None:
        super().__init__(key)
        self.app = app
        self.threads = 1   # until its first report says
        self.accepting = key >= 0
        self.unacked: dict[int, Connection] = {}
        self.progressed_at = float("-inf")   # its last REPORT that showed a request done (2b)
        self.ahead = 1   # how many it may take ahead: what its last closing REPORT closed (2b)
        self.steal_missed_at = float("-inf")   # when its channel last had nothing to take back (2c)
        self.unacked_since = float("-inf")   # when it was last given one while it had none unacknowledged

    def refresh(self) -> None:
        """Recompute `free` after its busy count, threads or unacknowledged ones moved."""
        self.free = self.busy + len(self.unacked) < self.threads


def _silent_since(worker: Worker) -> float:
    """Since when it has shown no sign of taking what it was given (2c)."""
    return max(worker.progressed_at, worker.unacked_since)


class Send:
    """Decision: pass `conn` to `worker`, numbered `conn_id`. `from_queue`, `waited_s`
    and `tried` are the core's, for `send_failed` (where it came from, the queue wait it
    counted, the workers whose sends already failed for it)."""

    __slots__ = ("conn", "worker", "conn_id", "from_queue", "waited_s", "tried")

    def __init__(self, conn: Connection, worker: Worker, conn_id: int, from_queue: bool = False,
                 waited_s: float = 0.0, tried: frozenset[int] = frozenset()) -> None:
        self.conn = conn
        self.worker = worker
        self.conn_id = conn_id
        self.from_queue = from_queue
        self.waited_s = waited_s
        self.tried = tried

    def __repr__(self) -> str:
        return f"Send(conn={self.conn!r}, worker={self.worker.key}, conn_id={self.conn_id})"


class Refuse:
    """Decision: no worker takes `conn`; `reason` is OVERFLOW, QUEUE_TIMEOUT,
    WORKER_REFUSED or APP_GONE."""

    __slots__ = ("conn", "reason")

    def __init__(self, conn: Connection, reason: str) -> None:
        self.conn = conn
        self.reason = reason

    def __repr__(self) -> str:
        return f"Refuse(conn={self.conn!r}, reason={self.reason!r})"


Decision = Send | Refuse


@dataclass(frozen=True)
class AppFigures:
    """What /metrics reports of one app, from the core's side."""
    handoffs: int            # connections sent to its workers (failed sends not counted)
    queue_wait_s: float      # time its sent connections had spent queued
    connections: int         # connections its workers hold, by their reports
    queue_depth: int         # its connections waiting now


class _App:
    """One app's state: its policy (None once the routes no longer name it), the
    workers that take its connections, in attach order, and its queue."""

    __slots__ = ("name", "policy_name", "policy", "accepting", "waiting", "handoffs", "queue_wait_s")

    def __init__(self, name: str) -> None:
        self.name = name
        self.policy_name = ""
        self.policy: policies.Policy | None = None
        self.accepting: list[Worker] = []
        self.waiting: deque[Connection] = deque()   # oldest first; deadlines ascend
        self.handoffs = 0
        self.queue_wait_s = 0.0


class Dispatcher:
    """The dispatch-and-queue core; see the module's promises."""

    def __init__(self, clock: Callable[[], float], queue_limit: int = QUEUE_LIMIT,
                 queue_timeout_s: float = QUEUE_TIMEOUT_S, rng: random.Random | None = None,
                 prefetch: int = PREFETCH, prefetch_window_s: float = PREFETCH_WINDOW_S,
                 steal_after_s: float = STEAL_AFTER_S) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, not {queue_limit}")
        if not 0 <= prefetch <= PREFETCH:
            raise ValueError(f"prefetch must be 0 to {PREFETCH} (what workers report for), not {prefetch}")
        self.clock = clock
        self.prefetch = prefetch
        self.prefetch_window_s = prefetch_window_s
        self.steal_after_s = steal_after_s
        self.queue_limit = queue_limit
        self.queue_timeout_s = queue_timeout_s
        self._rng = rng
        self._apps: dict[str, _App] = {}
        self._workers: dict[int, Worker] = {}
        self._ready: set[str] = set()   # apps whose queue may move now (promise 4)
        self.steal_ready: set[str] = set()   # apps with a free worker, which may take back (2c)
        self._ids = itertools.count(1)
        self.queued = 0                 # connections waiting, all apps together
        self.draining = False
        # Counters, for /metrics.
        self.dispatched = 0
        self.redispatched = 0
        self.taken_back = 0
        self.overflow_503 = 0
        self.queue_timeout_503 = 0
        self.worker_refused_503 = 0

    # -- apps ------------------------------------------------------------------

    def set_apps(self, balance: Mapping[str, str]) -> list[Refuse]:
        """Adopt the routed apps (app -> its policy's name). An app whose policy name is
        unchanged keeps its policy instance (and so its rotation). Connections queued
        for an app no longer named are refused (APP_GONE). ValueError, with nothing
        changed, on an unknown policy name."""
        fresh = {name: policies.make_policy(policy_name, self._rng) for name, policy_name in balance.items()
                 if not self._routed_with(name, policy_name)}
        refused: list[Refuse] = []
        for name, app in self._apps.items():
            if name in balance:
                if name in fresh:
                    app.policy_name, app.policy = balance[name], fresh[name]
            elif app.policy is not None:
                app.policy_name, app.policy = "", None
                refused.extend(Refuse(conn, APP_GONE) for conn in app.waiting)
                self.queued -= len(app.waiting)
                app.waiting.clear()
        for name in balance:
            if name not in self._apps:
                app = self._app(name)
                app.policy_name, app.policy = balance[name], fresh[name]
        self._ready.update(name for name, app in self._apps.items() if app.waiting)
        return refused

    def _routed_with(self, name: str, policy_name: str) -> bool:
        app = self._apps.get(name)
        return app is not None and app.policy is not None and app.policy_name == policy_name

    def _app(self, name: str) -> _App:
        app = self._apps.get(name)
        if app is None:
            app = self._apps[name] = _App(name)
        return app

    # -- workers ---------------------------------------------------------------

    def attach(self, key: int, app: str) -> Worker:
        """A worker link came. KeyError if `key` is attached already."""
        if key in self._workers:
            raise KeyError(f"worker {key} is attached already")
        worker = self._workers[key] = Worker(key, app)
        worker.progressed_at = self.clock()   # a new worker is as good as one just done
        if worker.accepting:
            state = self._app(app)
            state.accepting.append(worker)
            if state.waiting:
                self._ready.add(app)
        return worker

    def worker(self, key: int) -> Worker | None:
        return self._workers.get(key)

    def detach(self, worker: Worker) -> None:
        """Send the worker nothing more (it retires); it stays attached until `gone`,
        since it still acknowledges, and its unacknowledged connections still count."""
        if worker.accepting:
            worker.accepting = False
            accepting = self._apps[worker.app].accepting
            accepting[:] = [other for other in accepting if other is not worker]

    def resume(self, worker: Worker) -> None:
        """A detached worker takes connections again (an attached worker's tag is live
        again). Nothing for a worker that accepts already, or is gone."""
        if worker.accepting or self._workers.get(worker.key) is not worker:
            return
        worker.accepting = True
        state = self._app(worker.app)
        state.accepting.append(worker)
        if state.waiting:
            self._ready.add(worker.app)

    def report(self, worker: Worker, acked: tuple[int, ...], closed: tuple[int, ...], busy: int,
               threads: int | None = None) -> list[Connection]:
        """The worker's REPORT: the connections it now owns (returned: the shell drops
        its copies), how many of its connections ended, how many threads are busy (the
        acknowledged ones among them) and, if it says, how many it has."""
        unacked = worker.unacked
        taken = [conn for conn_id in acked if (conn := unacked.pop(conn_id, None)) is not None]
        if closed:
            worker.connections = max(0, worker.connections - len(closed))
        if closed or busy < worker.busy:
            worker.progressed_at = self.clock()
        if closed:
            worker.ahead = len(closed)
        worker.busy = busy
        if threads:
            worker.threads = threads
        load = busy + len(unacked)
        free = worker.free = load < worker.threads   # refresh(), inlined: once per report
        if free:
            self.steal_ready.add(worker.app)
        if self.queued and worker.accepting and load < worker.threads + min(self.prefetch, worker.ahead):
            self._ready.add(worker.app)
        return taken

    def steals(self) -> tuple[list[Worker], float | None]:
        """Promise 2c: the workers to take an unread connection back from now, one entry
        per connection (longest silent first), and when to call again (None: no need
        until a worker reports itself free)."""
        ready = self.steal_ready
        victims: list[Worker] = []
        recheck: float | None = None
        if not ready:
            return victims, recheck
        now, after = self.clock(), self.steal_after_s
        for name in list(ready):
            app = self._apps.get(name)
            if app is None or app.policy is None or app.policy.AFFINE or app.waiting:
                ready.discard(name)
                continue
            room = sum(worker.threads - worker.busy - len(worker.unacked) for worker in app.accepting if worker.free)
            silent = [] if room <= 0 else [
                worker for worker in app.accepting
                if worker.unacked and not worker.free and worker.steal_missed_at < worker.progressed_at]
            due = sorted((_silent_since(worker) + after, worker.key, worker) for worker in silent)
            later = next((when for when, _, _ in due if when > now), None)   # the soonest not yet due
            if later is not None:
                recheck = later if recheck is None else min(recheck, later)
            else:
                ready.discard(name)
            for when, _, worker in due:
                if when > now:
                    break
                take = min(room, len(worker.unacked))
                victims.extend([worker] * take)
                room -= take
                if not room:
                    break
        return victims, recheck

    def stolen(self, worker: Worker, conn_id: int) -> tuple[bool, Decision | None]:
        """The shell took connection `conn_id` back unread from `worker`'s channel: it is
        no longer that worker's. (False, None) if it never was; else (True, what becomes
        of it, as from `dispatch`), another worker than that one."""
        conn = worker.unacked.pop(conn_id, None)
        if conn is None:
            return False, None
        worker.connections = max(0, worker.connections - 1)
        worker.refresh()
        app = self._apps[conn.app]   # it was sent, so its app has a record
        app.handoffs -= 1   # that handoff did not happen; the next one counts
        self.dispatched -= 1
        self.taken_back += 1
        if app.policy is None:
            return True, Refuse(conn, APP_GONE)
        others = [other for other in app.accepting if other is not worker]
        choice = app.policy.pick(others, conn.client) if others else None
        if choice is not None and choice.free:
            return True, self._send(conn, choice, app, False, frozenset((worker.key,)))
        return True, self._enqueue(conn, app)

    def steal_missed(self, worker: Worker) -> None:
        """Nothing was left unread in `worker`'s channel: not again until it progresses."""
        worker.steal_missed_at = self.clock()

    def refused(self, worker: Worker, conn_ids) -> list[Decision]:
        """The worker's REPORT says these connections never reached it (promise 5): each
        goes to another worker, or is refused. Ids it was not sent, or acknowledged, are
        ignored."""
        decisions: list[Decision] = []
        for conn_id in conn_ids:
            conn = worker.unacked.pop(conn_id, None)
            if conn is None:
                continue
            worker.connections = max(0, worker.connections - 1)
            worker.refresh()
            app = self._apps[conn.app]   # it was sent, so its app has a record
            self.dispatched -= 1   # that handoff did not happen
            app.handoffs -= 1
            conn.refusals += 1
            others = [other for other in app.accepting if other is not worker]
            if app.policy is None:
                decisions.append(Refuse(conn, APP_GONE))
            elif others and conn.refusals <= len(app.accepting):
                # A free one if there is one; else the least of evils, a busy one (it
                # must not wait in the queue for the worker that refused it).
                choice = app.policy.pick(others, conn.client) or min(
                    others, key=lambda other: (other.busy + len(other.unacked), other.connections))
                decisions.append(self._send(conn, choice, app, False, frozenset((worker.key,))))
            else:
                self.worker_refused_503 += 1
                decisions.append(Refuse(conn, WORKER_REFUSED))
        return decisions

    def gone(self, worker: Worker, unread: set[int] | None = None) -> tuple[list[Decision], list[Connection]]:
        """The worker went away: of its unacknowledged connections, those it never read
        (`unread`, by id; None: all of them) go elsewhere; the others it took, and they
        went with it (returned second: the shell closes its copies)."""
        if self._workers.get(worker.key) is not worker:
            return [], []
        self.detach(worker)
        del self._workers[worker.key]
        decisions, lost = [], []
        for conn_id, conn in worker.unacked.items():
            if unread is not None and conn_id not in unread:
                lost.append(conn)
                continue
            self.redispatched += 1
            conn.queued_at = 0.0   # it enters anew: its earlier wait was counted when sent
            decision = self.dispatch(conn)
            if decision is not None:
                decisions.append(decision)
        worker.unacked.clear()
        return decisions, lost

    # -- connections -----------------------------------------------------------

    def dispatch(self, conn: Connection) -> Decision | None:
        """A connection whose app is known: a worker for it, or it waits (None), or it
        waits and the oldest waiting connection makes room (Refuse OVERFLOW), or its app
        is gone (Refuse APP_GONE)."""
        app = self._apps.get(conn.app)
        if app is None or app.policy is None:
            return Refuse(conn, APP_GONE)
        policy = app.policy
        worker = policy.pick(app.accepting, conn.client)
        if worker is None and self.prefetch and not policy.AFFINE:
            worker = self._ahead(app)
        if worker is not None and (worker.free or not policy.AFFINE):
            conn_id = next(self._ids)
            unacked = worker.unacked
            if not unacked:
                worker.unacked_since = self.clock()
            unacked[conn_id] = conn
            worker.connections += 1
            worker.free = worker.busy + len(unacked) < worker.threads   # refresh(), inlined
            app.handoffs += 1
            self.dispatched += 1
            return Send(conn, worker, conn_id)
        return self._enqueue(conn, app)

    def send_failed(self, send: Send) -> Decision | None:
        """Carrying out `send` failed: take it back, and answer again for its connection,
        with the workers already tried left out."""
        conn, worker = send.conn, send.worker
        if worker.unacked.pop(send.conn_id, None) is not None:
            worker.connections = max(0, worker.connections - 1)
            worker.refresh()
        app = self._apps[conn.app]   # it was sent, so its app has a record
        self.dispatched -= 1
        app.handoffs -= 1
        app.queue_wait_s -= send.waited_s
        if app.policy is None:
            return Refuse(conn, APP_GONE)
        tried = send.tried | {worker.key}
        others = [other for other in app.accepting if other.key not in tried]
        choice = app.policy.pick(others, conn.client) if others else None
        if choice is not None and choice.free:
            return self._send(conn, choice, app, send.from_queue, tried)
        if send.from_queue:   # back where it was, by its deadline (the front, but for ip-hash)
            waiting = app.waiting
            position = 0
            while position < len(waiting) and waiting[position].deadline <= conn.deadline:
                position += 1
            waiting.insert(position, conn)
            self.queued += 1
            self._ready.discard(app.name)
            return None
        return self._enqueue(conn, app)

    def next_queued(self) -> Send | None:
        """The oldest queued connection of an app that may place it now, sent to one of
        its workers; None when no queue may move (call again after each send until then)."""
        ready = self._ready
        while ready:
            name = next(iter(ready))
            app = self._apps.get(name)
            if app is None or not app.waiting or not app.accepting or app.policy is None:
                ready.discard(name)
                continue
            policy, waiting = app.policy, app.waiting
            if not policy.AFFINE:
                worker = policy.pick(app.accepting, None)   # (the client matters to ip-hash only)
                if worker is None and self.prefetch:
                    worker = self._ahead(app)
                if worker is None:   # none can take it: rest until one says it can
                    ready.discard(name)
                    continue
                conn = waiting.popleft()
            else:   # the oldest connection whose own worker is free (promise 3)
                found = self._first_placeable(app)
                if found is None:
                    ready.discard(name)
                    continue
                position, worker = found
                conn = waiting[position]
                del waiting[position]
            self.queued -= 1
            return self._send(conn, worker, app, True, frozenset())
        return None

    def waiting_for(self, app: str) -> int:
        """How many of the app's connections wait in the queue."""
        if not self.queued:
            return 0
        state = self._apps.get(app)
        return len(state.waiting) if state is not None else 0

    def _ahead(self, app: _App) -> Worker | None:
        """No worker is free: the one that may take a connection ahead (promise 2b)."""
        since = self.clock() - self.prefetch_window_s
        best = None
        for worker in app.accepting:
            if (worker.progressed_at >= since
                    and worker.busy + len(worker.unacked) < worker.threads + min(self.prefetch, worker.ahead)
                    and (best is None or worker.progressed_at > best.progressed_at)):
                best = worker
        return best

    @staticmethod
    def _first_placeable(app: _App) -> tuple[int, Worker] | None:
        """For an affine policy: the position of the oldest queued connection whose
        worker is free, and that worker. The scan stops once no worker is free."""
        if not any(worker.free for worker in app.accepting):
            return None
        pick = app.policy.pick
        for position, conn in enumerate(app.waiting):
            worker = pick(app.accepting, conn.client)
            if worker is not None and worker.free:
                return position, worker
        return None

    def _send(self, conn: Connection, worker: Worker, app: _App, from_queue: bool, tried: frozenset[int]) -> Send:
        conn_id = next(self._ids)
        if not worker.unacked:
            worker.unacked_since = self.clock()
        worker.unacked[conn_id] = conn
        worker.connections += 1
        worker.refresh()
        app.handoffs += 1
        self.dispatched += 1
        waited_s = self.clock() - conn.queued_at if from_queue else 0.0
        app.queue_wait_s += waited_s
        return Send(conn, worker, conn_id, from_queue, waited_s, tried)

    def _enqueue(self, conn: Connection, app: _App) -> Refuse | None:
        refused = None
        if self.queued >= self.queue_limit:
            oldest = min((other for other in self._apps.values() if other.waiting),
                         key=lambda other: other.waiting[0].deadline)
            refused = Refuse(oldest.waiting.popleft(), OVERFLOW)
            self.queued -= 1
            self.overflow_503 += 1
        now = self.clock()
        conn.queued_at = now
        conn.deadline = now + self.queue_timeout_s
        app.waiting.append(conn)
        self.queued += 1
        return refused

    # -- time ------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do, if anything waits."""
        if not self.queued:
            return None
        return min(app.waiting[0].deadline for app in self._apps.values() if app.waiting)

    def expire(self) -> list[Refuse]:
        """Refuse (QUEUE_TIMEOUT) every queued connection whose wait is over."""
        now = self.clock()
        refused = []
        for app in self._apps.values():
            waiting = app.waiting
            while waiting and waiting[0].deadline <= now:
                refused.append(Refuse(waiting.popleft(), QUEUE_TIMEOUT))
        self.queued -= len(refused)
        self.queue_timeout_503 += len(refused)
        return refused

    # -- the end -----------------------------------------------------------------

    def drain(self) -> None:
        """A graceful stop began: nothing new arrives, but what waits still goes out."""
        self.draining = True

    @property
    def done(self) -> bool:
        """Draining, every worker gone (peer balancers aside) and nothing queued: every
        connection a worker handed back was passed on."""
        return self.draining and not self.queued and not any(key >= 0 for key in self._workers)

    def take_waiting(self, movable: Callable[[Connection], bool]) -> list[Connection]:
        """The queued connections `movable` accepts, out of the queue (oldest first per
        app; the others keep their places): a new master's balancer serves them, after
        an upgrade."""
        taken = []
        for app in self._apps.values():
            if app.waiting:
                staying = deque()
                for conn in app.waiting:
                    (taken if movable(conn) else staying).append(conn)
                app.waiting = staying
        self.queued -= len(taken)
        return taken

    def held(self) -> list[Connection]:
        """Every connection the core holds: queued, or sent and not acknowledged."""
        held = [conn for app in self._apps.values() for conn in app.waiting]
        held.extend(conn for worker in self._workers.values() for conn in worker.unacked.values())
        return held

    def figures(self) -> dict[str, AppFigures]:
        connections = dict.fromkeys(self._apps, 0)
        for worker in self._workers.values():
            if worker.app in connections:
                connections[worker.app] += worker.connections
        return {name: AppFigures(app.handoffs, app.queue_wait_s, connections[name], len(app.waiting))
                for name, app in self._apps.items()}
