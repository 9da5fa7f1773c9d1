"""The balancer's dispatch-and-queue core (supervisor.balancer.dispatch), on a fake clock.

Each scenario is a table of steps: an event fed to the core, and the decisions it must
answer with, written as "send c1 to 1" (pass connection c1 to worker 1), "refuse c1
overflow_503", "taken c1" (a REPORT acknowledged c1: the shell closes its copy).
An empty list: nothing to do (a connection that could not go waits in the queue).

Events: `apps a=POLICY ...` (the routed apps), `attach KEY APP [threads=N]` (with a
first report saying N threads; without, the core takes it to have one), `detach KEY`,
`gone KEY`, `dispatch NAME [APP] [client=ADDRESS]` (APP defaults to "a"), `fail NAME`
(the last send of NAME failed), `report KEY [acked=N,M] [closed=COUNT] [busy=COUNT]
[threads=N]`,
`next` (the next queued connection some worker may take), `time SECONDS` (the clock
moves to it), `expire`, `drain`. A step `("state", {...})` checks the core's figures.
"""
from __future__ import annotations

import random

import pytest

from supervisor.balancer.dispatch import (
    APP_GONE,
    OVERFLOW,
    QUEUE_TIMEOUT,
    WORKER_REFUSED,
    Connection,
    Dispatcher,
    Refuse,
    Send,
)
from supervisor.balancer.policies import RandomTwo
from supervisor.ipc.messages import PREFETCH


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Named(Connection):
    __slots__ = ("name",)

    def __init__(self, name: str, app: str, client: str | None) -> None:
        super().__init__(app, client)
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Driver:
    """Drives a core with no connections taken ahead (promise 2b) unless `prefetch`
    says: SCENARIOS are the free-worker rules, PREFETCH_SCENARIOS what 2b adds."""

    def __init__(self, queue_limit=1024, queue_timeout_s=30.0, rng=None, prefetch=0):
        self.clock = FakeClock()
        self.core = Dispatcher(self.clock, queue_limit=queue_limit, queue_timeout_s=queue_timeout_s, rng=rng,
                               prefetch=prefetch, prefetch_window_s=0.005)
        self.core.set_apps({"a": "least-connections"})
        self.conns: dict[str, Named] = {}
        self.sends: dict[str, Send] = {}

    def step(self, command: str):
        verb, *words = command.split()
        args = [word for word in words if "=" not in word]
        options = dict(word.split("=", 1) for word in words if "=" in word)
        core = self.core
        if verb == "apps":
            return self.render(core.set_apps(options))
        if verb == "attach":
            worker = core.attach(int(args[0]), args[1])
            if "threads" in options:
                core.report(worker, (), (), 0, int(options["threads"]))
            return []
        if verb == "detach":
            core.detach(core.worker(int(args[0])))
            return []
        if verb == "resume":
            core.resume(core.worker(int(args[0])))
            return []
        if verb == "gone":   # gone KEY [unread=c1,c2]: without, it read none of what it holds
            unread = ({self.sends[name].conn_id for name in options["unread"].split(",") if name}
                      if "unread" in options else None)
            decisions, lost = core.gone(core.worker(int(args[0])), unread)
            return self.render(decisions) + [f"lost {conn.name}" for conn in lost]
        if verb == "dispatch":
            name = args[0]
            conn = self.conns[name] = Named(name, args[1] if len(args) > 1 else "a", options.get("client"))
            return self.render(core.dispatch(conn))
        if verb == "fail":
            return self.render(core.send_failed(self.sends[args[0]]))
        if verb == "report":
            worker = core.worker(int(args[0]))
            acked = tuple(self.sends[name].conn_id for name in options.get("acked", "").split(",") if name)
            closed = tuple(range(int(options.get("closed", 0))))
            taken = core.report(worker, acked, closed, int(options.get("busy", 0)),
                                int(options.get("threads", 0)) or None)
            return [f"taken {conn.name}" for conn in taken]
        if verb == "next":
            return self.render(core.next_queued())
        if verb == "time":
            self.clock.now = float(args[0])
            return []
        if verb == "expire":
            return self.render(core.expire())
        if verb == "drain":
            core.drain()
            return []
        raise AssertionError(f"unknown step {command!r}")

    def render(self, decisions):
        if decisions is None:
            return []
        if not isinstance(decisions, list):
            decisions = [decisions]
        out = []
        for decision in decisions:
            if isinstance(decision, Send):
                self.sends[decision.conn.name] = decision
                out.append(f"send {decision.conn.name} to {decision.worker.key}")
            else:
                assert isinstance(decision, Refuse)
                out.append(f"refuse {decision.conn.name} {decision.reason}")
        return out

    def state(self):
        core = self.core
        figures = core.figures()
        return {
            "queued": core.queued,
            "next_deadline": core.next_deadline(),
            "done": core.done,
            "dispatched": core.dispatched,
            "redispatched": core.redispatched,
            "overflow_503": core.overflow_503,
            "queue_timeout_503": core.queue_timeout_503,
            **{f"{app}.{field}": getattr(f, field) for app, f in figures.items()
               for field in ("handoffs", "queue_wait_s", "connections", "queue_depth")},
            **{f"load.{key}": (worker.connections, worker.busy) for key in (1, 2, 3, -1)
               if (worker := core.worker(key)) is not None},
            **{f"free.{key}": worker.free for key in (1, 2, 3)
               if (worker := core.worker(key)) is not None},
        }


def run(driver: Driver, steps):
    for number, (command, expected) in enumerate(steps, 1):
        if command == "state":
            state = driver.state()
            got = {key: state[key] for key in expected}
        else:
            got = driver.step(command)
        assert got == expected, f"step {number}: {command!r}"


SCENARIOS = {
    # -- the policies, applied among the accepting workers only --------------------
    "least-connections spreads a burst, then follows the reports": [
        ("attach 1 a threads=9", []), ("attach 2 a threads=9", []), ("attach 3 a threads=9", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 2"]),       # ties are taken in turn, by key
        ("dispatch c3", ["send c3 to 3"]),
        ("report 1 acked=c1 closed=1", ["taken c1"]),
        ("dispatch c4", ["send c4 to 1"]),       # the only one with no connection
        ("report 3 acked=c3 busy=1", ["taken c3"]),
        ("state", {"load.1": (1, 0), "load.2": (1, 0), "load.3": (1, 1)}),
        ("dispatch c5", ["send c5 to 2"]),       # one connection each: the busy one is left out
        ("dispatch c6", ["send c6 to 1"]),
    ],
    "round-robin takes the accepting workers in turn": [
        ("apps a=round-robin", []),
        ("attach 1 a threads=9", []), ("attach 2 a threads=9", []), ("attach 3 a threads=9", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 2"]),
        ("detach 3", []),
        ("dispatch c3", ["send c3 to 1"]),
        ("dispatch c4", ["send c4 to 2"]),
    ],
    "ip-hash keeps a client on its worker, and moves it only when that one stops": [
        ("apps a=ip-hash", []),
        ("attach 1 a threads=9", []), ("attach 2 a threads=9", []), ("attach 3 a threads=9", []),
        ("dispatch c1 client=192.0.2.7", ["send c1 to 3"]),
        ("dispatch c2 client=192.0.2.7", ["send c2 to 3"]),
        ("dispatch c3 client=192.0.2.8", ["send c3 to 1"]),
        ("detach 3", []),
        ("dispatch c4 client=192.0.2.7", ["send c4 to 1"]),
        ("dispatch c5 client=192.0.2.8", ["send c5 to 1"]),   # its worker stayed: so does it
    ],
    "the policy is kept across routes that keep its name, replaced when it changes": [
        ("apps a=round-robin", []),
        ("attach 1 a threads=9", []), ("attach 2 a threads=9", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("apps a=round-robin b=ip-hash", []),
        ("dispatch c2", ["send c2 to 2"]),       # the rotation went on
        ("apps a=least-connections", []),
        ("dispatch c3", ["send c3 to 1"]),       # a fresh policy: by load (both hold one)
    ],

    # -- only a worker that can serve now gets a connection ---------------------------
    "a connection goes only to a free worker, else waits for the first that says it is free": [
        ("attach 1 a", []), ("attach 2 a", []),  # one thread each, until they say
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 2"]),       # 1 counts busy from the send on
        ("dispatch c3", []),
        ("state", {"queued": 1, "free.1": False, "free.2": False}),
        ("report 1 acked=c1 busy=1", ["taken c1"]),   # acknowledged, not served yet: busy
        ("next", []),
        ("report 2 acked=c2 busy=1", ["taken c2"]),
        ("next", []),
        ("report 2 busy=0", []),                 # its request finished: free
        ("next", ["send c3 to 2"]),
        ("next", []),
        ("state", {"queued": 0, "free.1": False, "free.2": False}),
    ],
    "two connections in the same instant never go to one free thread": [
        ("attach 1 a threads=2", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 1"]),
        ("dispatch c3", []),
        ("report 1 acked=c1,c2 busy=2", ["taken c1", "taken c2"]),
        ("next", []),
        ("report 1 busy=1", []),
        ("next", ["send c3 to 1"]),
    ],
    "a worker's thread count is its reports' word, one until the first": [
        ("attach 1 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", []),
        ("report 1 acked=c1 busy=1 threads=4", ["taken c1"]),
        ("next", ["send c2 to 1"]),
        ("dispatch c3", ["send c3 to 1"]),
        ("dispatch c4", ["send c4 to 1"]),       # 1 busy and 3 sent: its 4 threads
        ("dispatch c5", []),
        ("state", {"free.1": False, "queued": 1}),
    ],
    "least-connections chooses among the free workers only": [
        ("attach 1 a", []), ("attach 2 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("report 1 acked=c1 busy=1", ["taken c1"]),
        ("dispatch c2", ["send c2 to 2"]),
        ("report 2 acked=c2 busy=0", ["taken c2"]),   # a keep-alive connection, idle
        ("dispatch c3", ["send c3 to 2"]),       # as loaded as 1 by connections, but free
    ],
    "round-robin skips a busy worker's turn": [
        ("apps a=round-robin", []),
        ("attach 1 a", []), ("attach 2 a", []), ("attach 3 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 2"]),
        ("report 1 acked=c1 busy=0", ["taken c1"]),
        ("dispatch c3", ["send c3 to 3"]),
        ("dispatch c4", ["send c4 to 1"]),       # 2 is still busy with c2
    ],
    "ip-hash waits for its own worker, and holds up no other worker's connections": [
        ("apps a=ip-hash", []),
        ("attach 1 a", []), ("attach 2 a", []), ("attach 3 a", []),
        ("dispatch c1 client=192.0.2.7", ["send c1 to 3"]),
        ("dispatch c2 client=192.0.2.7", []),    # its worker is busy: it waits for it
        ("dispatch c3 client=192.0.2.8", ["send c3 to 1"]),
        ("dispatch c4 client=192.0.2.8", []),
        ("report 1 acked=c3 busy=0", ["taken c3"]),
        ("next", ["send c4 to 1"]),              # c2 is older, but its worker is still busy
        ("next", []),
        ("report 3 acked=c1 busy=0", ["taken c1"]),
        ("next", ["send c2 to 3"]),
        ("state", {"queued": 0}),
    ],
    "a failed send of a queued ip-hash connection goes back in deadline order": [
        ("apps a=ip-hash", []),
        ("attach 1 a", []), ("attach 2 a", []), ("attach 3 a", []),
        ("dispatch c1 client=192.0.2.7", ["send c1 to 3"]),
        ("dispatch c2 client=192.0.2.7", []),
        ("time 1", []), ("dispatch c3 client=192.0.2.8", ["send c3 to 1"]),
        ("dispatch c4 client=192.0.2.8", []),
        ("report 1 acked=c3 busy=0", ["taken c3"]),
        ("next", ["send c4 to 1"]),
        ("fail c4", []),
        ("state", {"queued": 2, "next_deadline": 30.0}),
        ("time 30", []), ("expire", ["refuse c2 queue_timeout_503"]),
        ("time 31", []), ("expire", ["refuse c4 queue_timeout_503"]),
    ],

    # -- who gets nothing ---------------------------------------------------------
    "a detached worker gets nothing more, but its reports still count": [
        ("attach 1 a threads=9", []), ("attach 2 a threads=9", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("detach 1", []),
        ("dispatch c2", ["send c2 to 2"]),
        ("dispatch c3", ["send c3 to 2"]),
        ("report 1 acked=c1 closed=1", ["taken c1"]),
        ("dispatch c4", ["send c4 to 2"]),
        ("state", {"a.connections": 3, "load.1": (0, 0)}),
    ],
    "a resumed worker (an attached worker's tag live again) takes connections again": [
        ("attach 1 a threads=1", []),
        ("detach 1", []),
        ("dispatch c1", []),
        ("state", {"queued": 1}),
        ("resume 1", []),
        ("next", ["send c1 to 1"]),
        ("resume 1", []),   # twice: still one entry
        ("report 1 acked=c1 closed=1", ["taken c1"]),
        ("dispatch c2", ["send c2 to 1"]),
        ("dispatch c3", []),
        ("state", {"queued": 1}),
    ],
    "a peer balancer (negative key) only hands over: it takes nothing": [
        ("attach -1 a", []),
        ("dispatch c1", []),
        ("state", {"queued": 1}),
    ],
    "another app's workers do not take an app's connections": [
        ("apps a=least-connections b=least-connections", []),
        ("attach 1 b", []),
        ("dispatch c1 a", []),
        ("dispatch c2 b", ["send c2 to 1"]),
        ("state", {"queued": 1, "a.queue_depth": 1, "b.queue_depth": 0}),
    ],
    "a connection for an app the routes no longer name is closed": [
        ("attach 1 a", []),
        ("dispatch c1 gone", ["refuse c1 app_gone"]),
        ("dispatch c2", ["send c2 to 1"]),
    ],

    # -- failed sends ---------------------------------------------------------------
    "a send that fails goes to another worker, and is not counted": [
        ("attach 1 a", []), ("attach 2 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("fail c1", ["send c1 to 2"]),
        ("state", {"dispatched": 1, "a.handoffs": 1, "load.1": (0, 0), "load.2": (1, 0)}),
    ],
    "a connection no worker's channel takes waits for the next report": [
        ("attach 1 a", []), ("attach 2 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("fail c1", ["send c1 to 2"]),
        ("fail c1", []),
        ("state", {"queued": 1, "dispatched": 0, "a.connections": 0}),
        ("next", []),                            # nothing happened that makes room
        ("report 2", []),
        ("next", ["send c1 to 1"]),
        ("next", []),
    ],

    # -- the queue ------------------------------------------------------------------
    "the queue overflows by refusing its oldest connection, of any app": [
        ("apps a=least-connections b=least-connections", []),
        ("time 1", []), ("dispatch c1 b", []),
        ("time 2", []), ("dispatch c2 a", []),
        ("time 3", []), ("dispatch c3 a", []),
        ("dispatch c4 a", ["refuse c1 overflow_503"]),
        ("dispatch c5 b", ["refuse c2 overflow_503"]),
        ("state", {"queued": 3, "overflow_503": 2, "a.queue_depth": 2, "b.queue_depth": 1}),
    ],
    "a queued connection times out with a 503": [
        ("time 100", []), ("dispatch c1", []),
        ("time 110", []), ("dispatch c2", []),
        ("state", {"next_deadline": 130.0}),
        ("time 129.9", []), ("expire", []),
        ("time 130", []), ("expire", ["refuse c1 queue_timeout_503"]),
        ("state", {"next_deadline": 140.0, "queue_timeout_503": 1}),
        ("time 145", []), ("expire", ["refuse c2 queue_timeout_503"]),
        ("state", {"queued": 0, "next_deadline": None}),
    ],
    "queued connections leave oldest first once a worker attaches, counting their wait": [
        ("time 10", []), ("dispatch c1", []),
        ("time 12", []), ("dispatch c2", []),
        ("time 15", []), ("attach 1 a threads=2", []),
        ("next", ["send c1 to 1"]),
        ("next", ["send c2 to 1"]),
        ("next", []),
        ("state", {"queued": 0, "a.queue_wait_s": 8.0, "a.handoffs": 2}),
    ],
    "a failed attempt puts a queued connection back in front and does not restart its wait": [
        ("time 0", []), ("dispatch c1", []),
        ("time 1", []), ("dispatch c2", []),
        ("time 5", []), ("attach 1 a", []),
        ("next", ["send c1 to 1"]),
        ("fail c1", []),
        ("next", []),                            # the app's queue rests until its next report
        ("state", {"queued": 2, "next_deadline": 30.0, "a.queue_wait_s": 0.0}),
        ("time 30", []), ("expire", ["refuse c1 queue_timeout_503"]),
        ("report 1", []),
        ("next", ["send c2 to 1"]),
    ],
    "new routes refuse what waits for a removed app and move the others": [
        ("apps a=least-connections b=least-connections", []),
        ("dispatch c1 a", []), ("dispatch c2 b", []),
        ("attach 1 b", []),
        ("apps b=least-connections", ["refuse c1 app_gone"]),
        ("next", ["send c2 to 1"]),
    ],

    # -- workers that go away -----------------------------------------------------------
    "a dead worker's unacknowledged connections are dispatched again": [
        ("attach 1 a threads=9", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 1"]),
        ("dispatch c3", ["send c3 to 1"]),
        ("report 1 acked=c1", ["taken c1"]),
        ("attach 2 a threads=9", []),
        ("gone 1", ["send c2 to 2", "send c3 to 2"]),
        ("state", {"redispatched": 2, "a.connections": 2}),
    ],
    "a dead worker's connections wait when no worker is left, then go out in order": [
        ("attach 1 a threads=2", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 1"]),
        ("gone 1", []),
        ("state", {"queued": 2}),
        ("attach 2 a threads=2", []),
        ("next", ["send c1 to 2"]),
        ("next", ["send c2 to 2"]),
    ],
    "a detached worker that dies still gives its connections back": [
        ("attach 1 a", []), ("attach 2 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("detach 1", []),
        ("gone 1", ["send c1 to 2"]),
    ],

    # -- draining -----------------------------------------------------------------------
    "a drain is done once every worker is gone and nothing waits": [
        ("attach -1 a", []), ("attach 1 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("drain", []),
        ("state", {"done": False}),
        ("gone 1", []),                          # c1 waits: nobody left to take it
        ("state", {"done": False, "queued": 1}),
        ("time 30", []), ("expire", ["refuse c1 queue_timeout_503"]),
        ("state", {"done": True}),               # the peer balancer does not hold it up
    ],
    "connections queued when the drain began still go out": [
        ("dispatch c1", []),
        ("drain", []),
        ("attach 1 a", []),
        ("next", ["send c1 to 1"]),
        ("state", {"done": False}),
        ("report 1 acked=c1", ["taken c1"]),
        ("gone 1", []),
        ("state", {"done": True}),
    ],
}


# Promise 2b: with no worker free, one that progressed lately takes one connection ahead.
PREFETCH_SCENARIOS = {
    "a saturated worker takes one connection ahead, no more": [
        ("attach 1 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 1"]),       # ahead: its channel holds it till c1 ends
        ("dispatch c3", []),
        ("state", {"queued": 1, "free.1": False}),
        ("report 1 acked=c1,c2 busy=2", ["taken c1", "taken c2"]),
        ("next", []),
        ("report 1 closed=1 busy=1", []),        # c1 done: room for one ahead again
        ("next", ["send c3 to 1"]),
        ("next", []),
    ],
    "a free worker always comes before one with room ahead": [
        ("attach 1 a", []), ("attach 2 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 2"]),
        ("dispatch c3", ["send c3 to 1"]),       # none free: ahead, the first of a tie
        ("report 2 acked=c2 busy=0", ["taken c2"]),   # 2 is free
        ("dispatch c4", ["send c4 to 2"]),
        ("dispatch c5", ["send c5 to 2"]),       # none free, 1 full with one ahead: 2
        ("dispatch c6", []),
    ],
    "a worker silent past the window gets nothing ahead (it may be in a slow request)": [
        ("attach 1 a", []), ("attach 2 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("report 1 acked=c1 busy=1", ["taken c1"]),
        ("dispatch c2", ["send c2 to 2"]),
        ("report 2 acked=c2 busy=1", ["taken c2"]),
        ("time 0.004", []),
        ("report 2 closed=1 busy=0", []),        # 2 ends a request: progress
        ("report 2 busy=1", []),                 # and is busy with the next
        ("time 0.008", []),                      # 1 silent for 8 ms, 2 for 4
        ("dispatch c3", ["send c3 to 2"]),
        ("dispatch c4", []),                     # 2 has no room; 1 may be stuck: it waits
        ("time 0.02", []),
        ("dispatch c5", []),                     # both silent past the window
        ("state", {"queued": 2}),
        ("report 1 closed=1 busy=0", []),        # 1 is free again
        ("next", ["send c4 to 1"]),
        ("next", ["send c5 to 1"]),              # and progressed just now: one ahead
        ("next", []),
    ],
    "a worker gone: what it never read goes elsewhere, what it read went with it": [
        ("attach 1 a threads=4", []), ("attach 2 a threads=4", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 2"]),
        ("dispatch c3", ["send c3 to 1"]),
        ("dispatch c4", ["send c4 to 2"]),
        ("dispatch c5", ["send c5 to 1"]),
        ("report 1 acked=c1 busy=1", ["taken c1"]),
        ("gone 1 unread=c5", ["send c5 to 2", "lost c3"]),   # it read c3 but had not said so
        ("state", {"redispatched": 1, "queued": 0}),
    ],
    "ip-hash never takes a connection ahead": [
        ("apps a=ip-hash", []),
        ("attach 1 a", []),
        ("dispatch c1 client=10.0.0.1", ["send c1 to 1"]),
        ("dispatch c2 client=10.0.0.1", []),
        ("state", {"queued": 1}),
    ],
    "a worker gone with a connection taken ahead: it goes elsewhere": [
        ("attach 1 a", []), ("attach 2 a", []),
        ("dispatch c1", ["send c1 to 1"]),
        ("dispatch c2", ["send c2 to 2"]),
        ("dispatch c3", ["send c3 to 1"]),
        ("report 2 acked=c2 busy=0", ["taken c2"]),
        ("gone 1", ["send c1 to 2", "send c3 to 2"]),   # 2 free, then one ahead
        ("state", {"queued": 0}),
    ],
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(name):
    driver = Driver(queue_limit=3) if "overflow" in name else Driver()
    run(driver, SCENARIOS[name])


@pytest.mark.parametrize("name", PREFETCH_SCENARIOS)
def test_prefetch_scenario(name):
    run(Driver(prefetch=1), PREFETCH_SCENARIOS[name])


def test_a_worker_takes_ahead_only_as_many_as_its_last_report_closed():
    clock = FakeClock()
    core = Dispatcher(clock, prefetch=PREFETCH, prefetch_window_s=0.005)
    core.set_apps({"a": "least-connections"})
    worker = core.attach(1, "a")
    core.report(worker, (), (), 0, threads=1)
    # Before any report closed a connection: one ahead, and the rest of a burst waits.
    sends = [core.dispatch(Connection("a")) for _ in range(2 + PREFETCH)]
    assert [type(send) for send in sends[:2]] == [Send, Send] and set(sends[2:]) == {None}
    # It closes both in one report: two ahead from now on (the queue moves that far).
    ids = tuple(send.conn_id for send in sends[:2])
    core.report(worker, ids, ids, 0)
    moved = []
    while (send := core.next_queued()) is not None:
        moved.append(send)
    assert len(moved) == 3   # one free slot, and two ahead


def test_prefetch_is_bounded_by_what_workers_report_for():
    with pytest.raises(ValueError, match=f"prefetch must be 0 to {PREFETCH}"):
        Dispatcher(FakeClock(), prefetch=PREFETCH + 1)


def test_random_two_draws_among_the_accepting_workers_only():
    driver = Driver(rng=random.Random(7))
    driver.core.set_apps({"a": "random-two"})
    for key in (1, 2, 3):
        driver.step(f"attach {key} a threads=99")
    driver.step("detach 2")
    reference, pool = RandomTwo(random.Random(7)), [driver.core.worker(1), driver.core.worker(3)]
    expected = []
    for n in range(20):
        expected.append(f"send c{n} to {reference.pick(pool, None).key}")
        assert driver.step(f"dispatch c{n}") == [expected[-1]]
        pool[0].connections = pool[1].connections = 0   # keep the loads level: the draw decides
    assert {line.rsplit(" ", 1)[1] for line in expected} == {"1", "3"}


def test_an_unknown_policy_changes_nothing():
    driver = Driver()
    driver.step("attach 1 a threads=9")
    driver.step("dispatch c1")
    with pytest.raises(ValueError, match="unknown balancing policy"):
        driver.core.set_apps({"a": "least-connections", "b": "fastest"})
    assert driver.step("dispatch c2") == ["send c2 to 1"]
    assert driver.step("dispatch c3 b") == ["refuse c3 app_gone"]


def test_attaching_a_key_twice_is_refused():
    driver = Driver()
    driver.step("attach 1 a")
    with pytest.raises(KeyError):
        driver.step("attach 1 a")


def test_reasons_are_the_counters_names():
    assert (OVERFLOW, QUEUE_TIMEOUT, APP_GONE) == ("overflow_503", "queue_timeout_503", "app_gone")


def test_a_refused_connection_goes_to_another_worker_then_is_refused():
    core = Dispatcher(FakeClock())
    core.set_apps({"a": "round-robin"})
    one, two = core.attach(1, "a"), core.attach(2, "a")
    conn = Named("c1", "a", None)
    first = core.dispatch(conn)
    (second,) = core.refused(first.worker, (first.conn_id, 12345))   # an id it was never sent: nothing
    assert type(second) is Send and second.worker is not first.worker and second.conn is conn
    assert first.conn_id not in first.worker.unacked and first.worker.connections == 0
    (third,) = core.refused(second.worker, (second.conn_id,))
    assert type(third) is Send and third.worker is first.worker   # each may refuse it once
    (last,) = core.refused(third.worker, (third.conn_id,))
    assert (type(last), last.reason) == (Refuse, WORKER_REFUSED)
    assert core.worker_refused_503 == 1 and core.dispatched == 0
    assert {one.connections, two.connections} == {0}


def test_a_connection_refused_by_the_only_worker_is_refused_at_once_never_queued():
    core = Dispatcher(FakeClock())
    core.set_apps({"a": "least-connections"})
    core.attach(1, "a")
    send = core.dispatch(Named("c1", "a", None))
    assert [(type(d), d.reason) for d in core.refused(send.worker, (send.conn_id,))] == [(Refuse, WORKER_REFUSED)]
    assert core.queued == 0
    assert core.refused(send.worker, (send.conn_id,)) == []   # told twice: once counts


def test_take_waiting_moves_only_what_it_may_and_the_rest_keeps_its_place():
    driver = Driver()
    driver.step("attach 1 a")
    driver.step("dispatch c0")                      # 1 is busy with it: what follows waits
    for name, client in (("c1", "10.0.0.1"), ("c2", "10.0.0.2"), ("c3", "10.0.0.3")):
        driver.step(f"dispatch {name} client={client}")
    driver.clock.now = 5.0
    taken = driver.core.take_waiting(lambda conn: conn.name != "c2")
    assert [conn.name for conn in taken] == ["c1", "c3"]
    assert driver.state()["queued"] == 1 and driver.core.next_deadline() == 30.0   # c2's wait is unchanged
    driver.step("report 1 acked=c0 busy=0")
    assert driver.step("next") == ["send c2 to 1"]


# -- promise 2c: taking back what a silent worker has not read ----------------------


def two_workers(policy="least-connections"):
    clock = FakeClock(1.0)
    core = Dispatcher(clock, prefetch=PREFETCH, steal_after_s=0.001)
    core.set_apps({"a": policy})
    slow, fast = core.attach(1, "a"), core.attach(2, "a")
    for worker in (slow, fast):
        core.report(worker, (), (), 0, threads=1)
    return clock, core, slow, fast


def test_a_silent_workers_unread_connection_is_named_for_a_free_worker_once_it_was_silent_long_enough():
    clock, core, slow, fast = two_workers()
    # Both take one; then one more goes ahead to the slow one (it progressed last).
    first = core.dispatch(Connection("a"))
    second = core.dispatch(Connection("a"))
    assert {first.worker.key, second.worker.key} == {slow.key, fast.key}
    at_slow = first if first.worker is slow else second
    at_fast = second if at_slow is first else first
    clock.now += 0.0001
    core.report(slow, (at_slow.conn_id,), (), 1)       # in its slow request now
    ahead = core.dispatch(Connection("a"))
    assert ahead.worker is slow
    core.report(fast, (at_fast.conn_id,), (at_fast.conn_id,), 0)   # free again, the queue empty
    # Silent since it was given one with none unacknowledged (just now), not since it
    # last progressed.
    victims, recheck = core.steals()
    assert victims == [] and recheck == pytest.approx(1.0001 + 0.001)
    clock.now = recheck
    victims, _ = core.steals()
    assert victims == [slow]
    taken, again = core.stolen(slow, ahead.conn_id)
    assert taken and ahead.conn_id not in slow.unacked and core.taken_back == 1
    assert again.conn is ahead.conn and again.worker is fast
    # Nothing more unread at the slow one: it is not tried again until it progresses.
    core.report(fast, (again.conn_id,), (again.conn_id,), 0)
    core.steal_missed(slow)
    clock.now += 0.01
    assert core.steals() == ([], None)
    assert core.stolen(slow, 12345) == (False, None)   # not one of its


def test_what_is_taken_back_never_goes_straight_back_to_that_worker():
    clock, core, slow, fast = two_workers()
    sent = core.dispatch(Connection("a"))
    stuck, other = sent.worker, (fast if sent.worker is slow else slow)
    core.dispatch(Connection("a"))    # the other is busy now
    clock.now += 0.5
    taken, decision = core.stolen(stuck, sent.conn_id)
    assert taken and decision is None and core.queued == 1   # no other free: it waits
    (conn_id,) = other.unacked
    core.report(other, (conn_id,), (conn_id,), 0)
    assert core.next_queued().conn is sent.conn   # it goes out when a worker frees


def test_nothing_is_taken_back_while_the_queue_waits_or_for_ip_hash():
    for policy in ("least-connections", "ip-hash"):
        clock, core, slow, fast = two_workers(policy)
        sent = core.dispatch(Connection("a", "10.0.0.1"))
        clock.now += 1.0
        if policy == "least-connections":
            core.dispatch(Connection("a"))   # the other takes one, and a third waits
            assert core.dispatch(Connection("a")) is None
            other = fast if sent.worker is slow else slow
            (conn_id,) = other.unacked
            core.report(other, (conn_id,), (conn_id,), 0)   # it frees, and the queue moves first
        else:
            core.report(fast if sent.worker is slow else slow, (), (), 0)
        assert core.steals() == ([], None)
