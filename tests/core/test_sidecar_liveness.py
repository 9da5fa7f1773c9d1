"""The balancer's liveness in the supervision core, on a fake clock.

The balancer's loop sends a heartbeat every BALANCER_HEARTBEAT_S; the core judges it
by its silence: past `balancer_silent_s` since its last heartbeat (or its start), it
is stopped or stuck, so it gets SIGCONT and SIGABRT (its stacks), SIGKILL after
ABORT_GRACE_S if that did not end it, and its exit restarts it like any exit.
"""
from __future__ import annotations

import pytest

from supervisor.master import supervision as sv

SILENT_S = 4.0


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def core(silent_s=SILENT_S) -> tuple[sv.Supervisor, Clock]:
    clock = Clock()
    return sv.Supervisor(sv.Settings(balancer_silent_s=silent_s), clock), clock


ABORT = [sv.SignalSidecar("balancer", sv.SIGCONT), sv.SignalSidecar("balancer", sv.SIGABRT)]
KILL = [sv.SignalSidecar("balancer", sv.SIGKILL)]


def signals(actions):
    return [a for a in actions if isinstance(a, (sv.SignalSidecar, sv.StartSidecar))]


# Each case: steps after the balancer started at t=0, as (t, what), where what is
# "beat" (a heartbeat), "exit" (it was reaped), "stop" (a graceful stop began) or
# a list: the sidecar actions tick() must answer with at t (and nothing just before).
CASES = [
    ("heartbeats keep it alive",
     [(t, "beat") for t in range(1, 30)] + [(29 + SILENT_S - 0.01, [])]),
    ("silent from its start: aborted, then killed, then restarted",
     [(SILENT_S - 0.01, []), (SILENT_S, ABORT), (SILENT_S + sv.ABORT_GRACE_S, KILL),
      (SILENT_S + sv.ABORT_GRACE_S + 0.1, "exit"),
      (SILENT_S + sv.ABORT_GRACE_S + 0.1, [sv.StartSidecar("balancer")])]),
    ("silent after its last heartbeat",
     [(1, "beat"), (2, "beat"), (2 + SILENT_S - 0.01, []), (2 + SILENT_S, ABORT)]),
    ("the abort ends it: no SIGKILL, restarted at once",
     [(SILENT_S, ABORT), (SILENT_S + 0.5, "exit"), (SILENT_S + 0.5, [sv.StartSidecar("balancer")]),
      (SILENT_S + sv.ABORT_GRACE_S, [])]),
    ("aborted once: no second abort while it dies",
     [(SILENT_S, ABORT), (SILENT_S + sv.ABORT_GRACE_S - 0.01, []), (SILENT_S + sv.ABORT_GRACE_S, KILL),
      (SILENT_S * 5, [])]),
    ("a heartbeat after it exited changes nothing",
     [(0.5, "exit"), (0.7, "beat"), (0.5 + sv.SIDECAR_RESTART_PAUSE_S, [sv.StartSidecar("balancer")]),
      (SILENT_S * 3, [])]),
    ("silent while a graceful stop drains: aborted, killed, not restarted",
     [(1, "beat"), (1, "stop"), (1 + SILENT_S, ABORT), (1 + SILENT_S + sv.ABORT_GRACE_S, KILL),
      (1 + SILENT_S + sv.ABORT_GRACE_S, "exit"), (100, [])]),
]


@pytest.mark.parametrize("steps", [steps for _, steps in CASES], ids=[name for name, _ in CASES])
def test_balancer_liveness(steps):
    supervisor, clock = core()
    start = last = clock.now
    supervisor.handle(sv.SidecarStarted("balancer"))
    for at, what in steps:
        if isinstance(what, list):
            if start + at - 0.001 > last:
                clock.now = start + at - 0.001
                assert signals(supervisor.tick()) == [], f"early at {at}"
            clock.now = last = start + at
            assert signals(supervisor.tick()) == what, f"at {at}"
            continue
        clock.now = last = start + at
        if what == "beat":
            supervisor.handle(sv.SidecarHeartbeat("balancer"))
        elif what == "exit":
            supervisor.handle(sv.SidecarExited("balancer", "killed by SIGKILL"))
        else:
            supervisor.stop(graceful=True)


def test_the_abort_is_logged_with_how_long_it_was_silent():
    supervisor, clock = core()
    supervisor.handle(sv.SidecarStarted("balancer"))
    clock.now += 1
    supervisor.handle(sv.SidecarHeartbeat("balancer"))
    clock.now += SILENT_S
    errors = [a.text for a in supervisor.tick() if isinstance(a, sv.Log) and a.level == "error"]
    assert errors == [f"balancer sent no heartbeat for {SILENT_S:.1f}s (stopped or stuck): aborting it, "
                      "its stacks follow; a new one replaces it"]


def test_next_deadline_is_the_silence_deadline():
    supervisor, clock = core()
    supervisor.handle(sv.SidecarStarted("balancer"))
    assert supervisor.next_deadline() == clock.now + SILENT_S
    clock.now += 1.5
    supervisor.handle(sv.SidecarHeartbeat("balancer"))
    assert supervisor.next_deadline() == clock.now + SILENT_S


@pytest.mark.parametrize("silent_s, name", [(None, "balancer"), (SILENT_S, "watcher")])
def test_never_judged_by_silence(silent_s, name):
    """Without the setting (an executor whose balancer sends none) or for the watcher,
    which sends no heartbeat."""
    supervisor, clock = core(silent_s)
    supervisor.handle(sv.SidecarStarted(name))
    assert supervisor.next_deadline() is None
    clock.now += 1000
    assert supervisor.tick() == []
