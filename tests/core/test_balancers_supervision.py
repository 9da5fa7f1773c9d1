"""Several balancers (`[master] balancers = N`) in the supervision core, on a fake clock.

Each balancer is a sidecar of its own (`balancer_name(i)`): its heartbeats, its
silence, its exit and its restart concern it alone, so one that is stuck or crashed is
replaced and the others keep their processes.
"""
from __future__ import annotations

import pytest

from supervisor.master import supervision as sv

SILENT_S = 4.0
NAMES = [sv.balancer_name(index) for index in range(3)]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def started(count: int = 2) -> tuple[sv.Supervisor, Clock]:
    clock = Clock()
    supervisor = sv.Supervisor(sv.Settings(balancer_silent_s=SILENT_S, graceful_timeout_s=10.0), clock)
    for name in NAMES[:count]:
        supervisor.handle(sv.SidecarStarted(name))
    return supervisor, clock


def sidecar_actions(actions):
    return [a for a in actions if isinstance(a, (sv.SignalSidecar, sv.StartSidecar, sv.DrainBalancer))]


def abort(name):
    return [sv.SignalSidecar(name, sv.SIGCONT), sv.SignalSidecar(name, sv.SIGABRT)]


def test_names():
    assert NAMES == ["balancer", "balancer#1", "balancer#2"]
    assert all(sv.is_balancer(name) for name in NAMES)
    assert not sv.is_balancer("watcher") and not sv.is_balancer("balancers")


# Each case: steps after both balancers started at t=0, as (t, what): ("beat", name),
# ("exit", name), ("stop",) for a graceful stop, or a list: the sidecar actions
# tick() must answer with at t (and nothing just before).
CASES = [
    ("one silent: only that one is aborted, killed and replaced",
     [*((t, ("beat", "balancer")) for t in range(1, 8)),
      (SILENT_S, abort("balancer#1")),
      (SILENT_S + sv.ABORT_GRACE_S, [sv.SignalSidecar("balancer#1", sv.SIGKILL)]),
      (SILENT_S + sv.ABORT_GRACE_S + 0.1, ("exit", "balancer#1")),
      (SILENT_S + sv.ABORT_GRACE_S + 0.1, [sv.StartSidecar("balancer#1")]),
      (7.5, [])]),
    ("the other one silent: only the first is replaced",
     [*((t, ("beat", "balancer#1")) for t in range(1, 8)),
      (SILENT_S, abort("balancer")),
      (SILENT_S + 0.5, ("exit", "balancer")),
      (SILENT_S + 0.5, [sv.StartSidecar("balancer")]),
      (7.5, [])]),
    ("both beat: neither is touched",
     [*((t, ("beat", name)) for t in range(1, 20) for name in NAMES[:2]), (19 + SILENT_S - 0.01, [])]),
    ("one crashes: only that one restarts (after a pause: it died young)",
     [(0.5, ("exit", "balancer#1")), (0.5 + sv.SIDECAR_RESTART_PAUSE_S, [sv.StartSidecar("balancer#1")])]),
    ("a graceful stop drains every balancer, each killed at its own deadline if it stays",
     [*((t, ("beat", name)) for t in (1, 2, 3) for name in NAMES[:2]),
      (3, ("stop",)),
      (3, ("exit", "balancer")),
      *((t, ("beat", "balancer#1")) for t in range(4, 14)),
      (3 + 10.0 + sv.QUICK_STOP_GRACE_S, [sv.SignalSidecar("balancer#1", sv.SIGKILL)])]),
]


@pytest.mark.parametrize("steps", [steps for _, steps in CASES], ids=[name for name, _ in CASES])
def test_two_balancers(steps):
    supervisor, clock = started()
    start = last = clock.now
    for at, what in steps:
        if isinstance(what, list):
            if start + at - 0.001 > last:
                clock.now = start + at - 0.001
                assert sidecar_actions(supervisor.tick()) == [], f"early at {at}"
            clock.now = last = start + at
            assert sidecar_actions(supervisor.tick()) == what, f"at {at}"
            continue
        clock.now = last = start + at
        if what[0] == "beat":
            supervisor.handle(sv.SidecarHeartbeat(what[1]))
        elif what[0] == "exit":
            supervisor.handle(sv.SidecarExited(what[1], "killed by SIGKILL"))
        else:
            supervisor.stop(graceful=True)


def test_a_graceful_stop_tells_each_balancer_to_drain():
    supervisor, _ = started(3)
    assert sidecar_actions(supervisor.stop(graceful=True)) == [sv.DrainBalancer(name) for name in NAMES]


def test_a_quick_stop_signals_each_balancer():
    supervisor, _ = started(2)
    assert sidecar_actions(supervisor.stop(graceful=False)) == [sv.SignalSidecar(name, sv.SIGTERM)
                                                                for name in NAMES[:2]]


def test_the_silent_one_is_named_in_the_log():
    supervisor, clock = started()
    clock.now += SILENT_S - 1
    supervisor.handle(sv.SidecarHeartbeat("balancer"))
    clock.now += 1
    errors = [a.text for a in supervisor.tick() if isinstance(a, sv.Log) and a.level == "error"]
    assert errors == [f"balancer#1 sent no heartbeat for {SILENT_S:.1f}s (stopped or stuck): aborting it, "
                      "its stacks follow; a new one replaces it"]
