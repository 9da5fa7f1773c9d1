"""The master's supervision core (supervisor.master.supervision) on a fake clock.

Every timeout path of the master, in milliseconds: boot timeout, an app that hangs at
import while an old generation serves, drain expiry then SIGKILL, hung requests, the
balancer's kill deadline, recycling with jitter, rollback and crash-loop backoff.
"""
from __future__ import annotations

import random

import pytest

from supervisor.config.model import AppConfig
from supervisor.master import supervision as sv
from supervisor.master.lifecycle import TRANSITIONS, IllegalTransition, State


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def app_config(name="web", workers=2, **overrides) -> AppConfig:
    return AppConfig(name=name, module="app:app", listeners=("http",), workers=workers, **overrides)


class Harness:
    """A fake executor: confirms every fork at once, keeps the actions it was given."""

    def __init__(self, settings=sv.Settings(boot_timeout_s=10, graceful_timeout_s=5, crash_backoff_max_s=2),
                 seed=7):
        self.clock = Clock()
        self.core = sv.Supervisor(settings, self.clock, rng=random.Random(seed))
        self.actions: list = []
        self.pids = iter(range(1000, 100000))

    def run(self, actions):
        """Record actions, and confirm each Spawn the way the executor does."""
        for action in actions:
            self.actions.append(action)
            if isinstance(action, sv.Spawn):
                self.run(self.core.handle(sv.Spawned(action.key, next(self.pids))))
        return actions

    def advance(self, seconds):
        self.clock.now += seconds
        return self.run(self.core.tick())

    def event(self, event):
        return self.run(self.core.handle(event))

    def take(self):
        actions, self.actions = self.actions, []
        return actions

    def keys(self, app="web", state=None, generation=None):
        return sorted(w.key for w in self.core.workers.values() if w.app == app
                      and (state is None or w.state is state)
                      and (generation is None or w.generation == generation))

    def ready_all(self):
        for key in self.keys(state=State.BOOTING):
            self.event(sv.Ready(key))

    def start(self, config=None):
        self.run(self.core.add_app(config or app_config(), identity="www-data"))
        self.ready_all()
        return self.take()


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def logs(actions, level=None):
    return [a.text for a in actions if isinstance(a, sv.Log) and (level is None or a.level == level)]


# -- the lifecycle table -----------------------------------------------------------

def test_every_state_has_a_row_and_exited_is_final():
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.EXITED] == frozenset()
    for state, targets in TRANSITIONS.items():
        if state is not State.EXITED:
            assert State.EXITED in targets, f"{state} cannot end"


@pytest.mark.parametrize("start, to", [
    (State.BACKOFF, State.READY), (State.SPAWNED, State.READY), (State.READY, State.BOOTING),
    (State.DRAINING, State.READY), (State.EXITED, State.SPAWNED), (State.BOOTING, State.BACKOFF),
])
def test_an_illegal_move_raises(start, to):
    record = sv.WorkerRecord(1, "web", 1, 1, start, 0.0)
    with pytest.raises(IllegalTransition):
        record.move(to)


# -- start, ready, routing ---------------------------------------------------------

def test_workers_boot_then_are_attached_when_ready():
    h = Harness()
    h.run(h.core.add_app(app_config(), identity="u"))
    spawned = of(h.take(), sv.Spawn)
    assert [s.index for s in spawned] == [1, 2]
    assert all(h.core.workers[s.key].state is State.BOOTING for s in spawned)
    assert not h.core.complete()
    h.event(sv.Ready(spawned[0].key))
    assert of(h.take(), sv.Attach) == [sv.Attach(spawned[0].key)]
    h.event(sv.Ready(spawned[1].key))
    assert h.core.complete()


def test_a_ready_for_an_unknown_or_draining_worker_changes_nothing():
    h = Harness()
    h.start()
    assert h.core.handle(sv.Ready(12345)) == []
    key = h.keys()[0]
    h.run(h.core.rescale("web", 1))
    h.take()
    assert h.core.handle(sv.Ready(h.keys(state=State.DRAINING)[0])) == []
    assert key in h.core.workers


# -- boot timeout ------------------------------------------------------------------

def test_boot_timeout_kills_the_worker_and_its_exit_is_a_failed_boot():
    h = Harness()
    h.run(h.core.add_app(app_config(workers=1), identity="u"))
    key = h.keys()[0]
    h.take()
    assert h.core.next_deadline() == h.clock.now + 10
    assert h.advance(9.9) == []
    actions = h.advance(0.2)
    assert of(actions, sv.Kill) == [sv.Kill(key, sv.SIGKILL)]
    assert "did not boot within 10s" in logs(actions, "error")[0]
    assert h.core.next_deadline() is None   # killed once, not again and again
    # It was the only app and it never booted: the master gives up.
    actions = h.event(sv.Exited(key, "killed by SIGKILL"))
    assert of(actions, sv.GiveUp) == [sv.GiveUp(1)]


def test_an_app_that_hangs_at_import_during_a_reload_is_dropped_while_the_old_generation_serves():
    h = Harness()
    h.start()
    old = h.keys(generation=1)
    h.core.note_reload()
    h.run(h.core.restart_app("web", app_config(), identity="u"))
    new = h.keys(generation=2)
    assert len(new) == 2 and not of(h.take(), sv.Detach)
    h.event(sv.Ready(new[0]))            # one imports, the other hangs
    assert not of(h.take(), sv.Attach)   # no switch with half a generation
    actions = h.advance(10.1)
    assert of(actions, sv.Kill) == [sv.Kill(new[1], sv.SIGKILL)]
    actions = h.event(sv.Exited(new[1], "killed by SIGKILL"))
    assert any("generation 2 dropped" in text for text in logs(actions, "error"))
    assert of(actions, sv.Notify)
    # The rest of the new generation goes at once; the old one was never touched.
    assert h.core.workers[new[0]].state is State.DRAINING
    assert of(h.advance(0), sv.Kill) == [sv.Kill(new[0], sv.SIGKILL)]
    assert all(h.core.workers[k].state is State.READY for k in old)
    assert h.core.apps["web"].current.number == 1 and h.core.apps["web"].next is None
    assert h.core.counters["generations_dropped"] == 1


# -- generations and rollback ------------------------------------------------------

def test_a_complete_new_generation_switches_routing_then_drains_the_old_with_handback():
    h = Harness()
    h.start()
    old = h.keys(generation=1)
    h.run(h.core.restart_app("web", app_config(), identity="u"))
    h.take()
    h.ready_all()
    actions = h.take()
    new = h.keys(generation=2)
    assert of(actions, sv.Attach) == [sv.Attach(k) for k in new]
    assert of(actions, sv.Detach) == [sv.Detach(k) for k in old]
    assert of(actions, sv.Stop) == [sv.Stop(k, handback=True) for k in old]
    # Attach the new before detaching the old: no instant without a worker.
    kinds = [type(a) for a in actions if isinstance(a, (sv.Attach, sv.Detach))]
    assert kinds.index(sv.Detach) > kinds.index(sv.Attach)
    assert h.core.apps["web"].current.number == 2
    assert h.core.counters["generation_switches"] == 1


def test_rollback_when_a_new_worker_fails_to_boot():
    h = Harness()
    h.start()
    h.run(h.core.restart_app("web", app_config(), identity="u"))
    new = h.keys(generation=2)
    h.take()
    h.event(sv.BootFailed(new[0], "Traceback: SyntaxError"))
    actions = h.event(sv.Exited(new[0], "failed to boot"))
    errors = logs(actions, "error")
    assert any("generation 2 failed to boot" in text and "SyntaxError" in text for text in errors)
    assert not of(actions, sv.Spawn) and not of(actions, sv.Detach)
    assert h.core.apps["web"].current.number == 1
    assert [w.state for w in map(h.core.workers.get, h.keys(generation=1))] == [State.READY] * 2


def test_a_fork_failure_in_a_new_generation_drops_it_and_leaves_nothing_behind():
    h = Harness()
    h.start()
    actions = h.core.restart_app("web", app_config(workers=3), identity="u")
    spawns = of(actions, sv.Spawn)
    h.run(h.core.handle(sv.Spawned(spawns[0].key, 5000)))
    actions = h.run(h.core.handle(sv.SpawnFailed(spawns[1].key, "Resource temporarily unavailable")))
    assert any("generation 2 dropped" in text for text in logs(actions, "error"))
    assert h.core.workers[spawns[0].key].state is State.DRAINING
    assert not h.core.wants_fork(spawns[2].key)   # the executor forks no more of it
    assert h.core.apps["web"].next is None
    assert of(h.advance(0), sv.Kill) == [sv.Kill(spawns[0].key, sv.SIGKILL)]


def test_a_newer_reload_supersedes_a_booting_generation():
    h = Harness()
    h.start()
    h.run(h.core.restart_app("web", app_config(), identity="u"))
    second = h.keys(generation=2)
    h.take()
    actions = h.run(h.core.restart_app("web", app_config(), identity="u"))
    assert any("superseded" in text for text in logs(actions))
    assert all(h.core.workers[k].state is State.DRAINING for k in second)
    assert len(h.keys(generation=3)) == 2


# -- draining ----------------------------------------------------------------------

def test_a_drain_that_expires_ends_with_sigkill():
    h = Harness()
    h.start(app_config(timeout=None))
    h.run(h.core.rescale("web", 1))
    draining = h.keys(state=State.DRAINING)
    assert of(h.take(), sv.Stop) == [sv.Stop(draining[0], handback=True)]
    assert h.advance(4.9) == []
    assert of(h.advance(0.2), sv.Kill) == [sv.Kill(draining[0], sv.SIGKILL)]
    assert h.advance(60) == []   # once
    actions = h.event(sv.Exited(draining[0], "killed by SIGKILL"))
    assert not of(actions, sv.Spawn)
    assert of(actions, sv.ReleaseSlot) == [sv.ReleaseSlot("web", 2)]


def test_an_apps_own_graceful_timeout_bounds_its_drain():
    h = Harness()
    h.start(app_config(graceful_timeout=1.5))
    h.run(h.core.stop(graceful=True))
    assert h.core.next_deadline() == h.clock.now + 1.5


# -- hung requests -----------------------------------------------------------------

def test_a_silent_worker_is_aborted_and_replaced():
    h = Harness()
    h.start(app_config(workers=1, timeout=3))   # heartbeats every 0.75 s
    key = h.keys()[0]
    assert h.advance(3.7) == []
    actions = h.advance(0.1)
    assert of(actions, sv.Kill) == [sv.Kill(key, sv.SIGABRT)]
    assert of(actions, sv.Detach) == [sv.Detach(key)]
    assert "silent for 3.8s" in logs(actions, "error")[0]
    assert len(of(actions, sv.Spawn)) == 1
    # SIGABRT gave it time to write its stacks; then SIGKILL.
    assert of(h.advance(sv.ABORT_GRACE_S), sv.Kill) == [sv.Kill(key, sv.SIGKILL)]
    assert h.core.counters["worker_timeouts"] == 1


def test_a_long_request_is_measured_from_its_start():
    h = Harness()
    h.start(app_config(workers=1, timeout=3))
    key = h.keys()[0]
    h.advance(1.0)
    h.event(sv.Heartbeat(key, requests=5, connections=1, busy=1, oldest_s=1.0))
    h.advance(1.0)
    h.event(sv.Heartbeat(key, requests=5, connections=1, busy=1, oldest_s=2.0))
    assert h.advance(0.9) == []          # the request is 2.9s old
    actions = h.advance(0.2)
    assert "a request running for 3.1s" in logs(actions, "error")[0]


def test_an_inline_call_within_its_timeout_is_never_cut_short():
    """Issue: the old rule measured silence from the last heartbeat, which may come up
    to one interval before an inline call starts: a 1.7 s call under timeout = 2 was
    aborted. Silence now gets the interval on top."""
    h = Harness()
    h.start(app_config(workers=1, timeout=2))   # heartbeats every 0.5 s
    key = h.keys()[0]
    h.event(sv.Heartbeat(key, requests=1, connections=1, busy=0, oldest_s=None))
    h.advance(0.5)                              # the call starts just before the next beat
    assert h.advance(1.99) == []                # ... and runs 1.99 s: within its timeout
    assert of(h.advance(0.02), sv.Kill) == [sv.Kill(key, sv.SIGABRT)]   # past 2 s + the interval


def test_heartbeats_keep_a_worker_alive():
    h = Harness()
    h.start(app_config(workers=1, timeout=3))
    key = h.keys()[0]
    for _ in range(10):
        assert h.advance(1.0) == []
        h.event(sv.Heartbeat(key, requests=1, connections=0, busy=0, oldest_s=None))


# -- recycling ---------------------------------------------------------------------

def test_recycling_after_max_requests_plus_jitter_replaces_before_retiring():
    h = Harness(seed=3)
    h.start(app_config(workers=1, max_requests=100, max_requests_jitter=10))
    key = h.keys()[0]
    jitter = h.core.workers[key].jitter
    assert jitter == random.Random(3).randint(0, 10)
    h.event(sv.Heartbeat(key, requests=100 + jitter - 1, connections=0, busy=0, oldest_s=None))
    assert not of(h.take(), sv.Spawn)
    actions = h.event(sv.Heartbeat(key, requests=100 + jitter, connections=0, busy=0, oldest_s=None))
    replacement = of(actions, sv.Spawn)[0]
    assert replacement.index == 1
    assert h.core.workers[key].state is State.READY   # still serving while its replacement boots
    h.take()
    h.event(sv.Heartbeat(key, requests=100 + jitter + 5, connections=0, busy=0, oldest_s=None))
    assert not of(h.take(), sv.Spawn)   # one replacement, not one per heartbeat
    actions = h.event(sv.Ready(replacement.key))
    assert of(actions, sv.Stop) == [sv.Stop(key, handback=True)]
    assert h.core.counters["worker_recycles"] == 1
    h.event(sv.Exited(key, "exit status 0"))
    assert h.core.apps["web"].retired_requests == 100 + jitter + 5


def test_recycling_on_resident_memory():
    h = Harness()
    h.start(app_config(workers=1, max_rss=100))
    key = h.keys()[0]
    h.event(sv.Heartbeat(key, requests=1, connections=0, busy=0, oldest_s=None, rss_kb=100 * 1024))
    assert not of(h.take(), sv.Spawn)
    actions = h.event(sv.Heartbeat(key, requests=1, connections=0, busy=0, oldest_s=None, rss_kb=101 * 1024))
    assert "resident memory 101 MB > 100 MB" in logs(actions)[0]


# -- crash loops -------------------------------------------------------------------

def test_crash_loop_backoff_grows_to_its_cap_and_resets_after_a_stable_run():
    h = Harness()
    h.start(app_config(name="other", workers=1))   # keeps the master from giving up
    h.start(app_config(workers=1))
    delays = []
    for _ in range(6):
        key = h.keys(state=State.READY)[0]
        h.take()
        actions = h.event(sv.Exited(key, "exit status 1"))
        backing_off = h.keys(state=State.BACKOFF)
        if of(actions, sv.Spawn):
            delays.append(0.0)
        else:
            record = h.core.workers[backing_off[0]]
            delays.append(round(record.respawn_at - h.clock.now, 3))
            assert h.advance(record.respawn_at - h.clock.now - 0.001) == []
            assert len(of(h.advance(0.002), sv.Spawn)) == 1
        h.ready_all()
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    # A worker that served for longer than stable_after_s resets the count.
    key = h.keys(state=State.READY)[0]
    h.advance(6)
    h.take()
    assert of(h.event(sv.Exited(key, "exit status 1")), sv.Spawn)
    assert h.core.counters["worker_restarts"] == 7


@pytest.mark.parametrize("change", ["shrink", "stop"])
def test_a_slot_in_backoff_is_dropped_when_the_app_shrinks_or_the_master_stops(change):
    h = Harness()
    h.start(app_config(name="other", workers=1))
    h.start(app_config(workers=2, timeout=None))
    h.event(sv.Exited(h.keys()[1], "exit status 1"))   # index 2 crashes
    assert h.keys(state=State.BACKOFF)
    if change == "shrink":
        h.run(h.core.rescale("web", 1))
    else:
        h.run(h.core.stop(graceful=True))
    assert not h.keys(state=State.BACKOFF)
    h.take()
    h.advance(60)
    assert not of(h.take(), sv.Spawn)


def test_no_app_can_boot_at_start_gives_up_but_not_after_a_reload():
    h = Harness()
    h.run(h.core.add_app(app_config(workers=1), identity="u"))
    key = h.keys()[0]
    h.event(sv.BootFailed(key, "ImportError: no module named app"))
    actions = h.event(sv.Exited(key, "failed to boot"))
    assert of(actions, sv.GiveUp) == [sv.GiveUp(1)]
    assert any("ImportError" in text for text in logs(actions, "error"))

    h = Harness()
    h.core.note_reload()
    h.run(h.core.add_app(app_config(workers=1), identity="u"))
    key = h.keys()[0]
    h.event(sv.BootFailed(key, "ImportError"))
    actions = h.event(sv.Exited(key, "failed to boot"))
    assert not of(actions, sv.GiveUp) and of(actions, sv.Spawn) == [] and h.keys(state=State.BACKOFF)


# -- stopping ----------------------------------------------------------------------

def test_a_graceful_stop_drains_the_balancer_and_kills_it_past_its_deadline():
    h = Harness()
    h.event(sv.SidecarStarted("balancer"))
    h.event(sv.SidecarStarted("watcher"))
    h.start()
    actions = h.run(h.core.stop(graceful=True))
    assert of(actions, sv.DrainBalancer) == [sv.DrainBalancer()]
    assert of(actions, sv.SignalSidecar) == [sv.SignalSidecar("watcher", sv.SIGTERM)]
    assert of(actions, sv.Stop) == [sv.Stop(k, handback=False) for k in h.keys()]
    for key in h.keys():
        h.event(sv.Exited(key, "exit status 0"))
    assert h.core.idle()
    assert h.advance(5 + sv.QUICK_STOP_GRACE_S - 0.01) == []
    assert of(h.advance(0.02), sv.SignalSidecar) == [sv.SignalSidecar("balancer", sv.SIGKILL)]
    assert h.advance(60) == []


def test_a_quick_stop_sends_sigquit_then_sigkill():
    h = Harness()
    h.start()
    actions = h.run(h.core.stop(graceful=False))
    assert of(actions, sv.Kill) == [sv.Kill(k, sv.SIGQUIT) for k in h.keys()]
    assert of(h.advance(sv.QUICK_STOP_GRACE_S), sv.Kill) == [sv.Kill(k, sv.SIGKILL) for k in h.keys()]


def test_nothing_is_respawned_while_stopping():
    h = Harness()
    h.start()
    h.run(h.core.stop(graceful=True))
    key = h.keys()[0]
    assert not of(h.event(sv.Exited(key, "killed by SIGKILL")), sv.Spawn)
    assert h.core.rescale("web", 5) == [] and h.core.restart_app("web", app_config(), "u") == []


# -- sidecars ----------------------------------------------------------------------

@pytest.mark.parametrize("lived_s, pause_s", [(0.2, sv.SIDECAR_RESTART_PAUSE_S), (30.0, 0.0)])
def test_a_sidecar_that_dies_is_restarted_after_a_pause_if_it_died_young(lived_s, pause_s):
    h = Harness()
    h.event(sv.SidecarStarted("balancer"))
    h.advance(lived_s)
    actions = h.event(sv.SidecarExited("balancer", "killed by SIGKILL"))
    assert "balancer exited: killed by SIGKILL; restarting it" in logs(actions, "warning")
    if pause_s:
        assert h.advance(pause_s - 0.01) == []
    assert of(h.advance(0.02), sv.StartSidecar) == [sv.StartSidecar("balancer")]
    h.event(sv.SidecarStarted("balancer"))
    assert h.core.next_deadline() is None


# -- deadlines agree ---------------------------------------------------------------

def test_next_deadline_is_exactly_when_tick_first_acts():
    """The one-rule promise: for a mix of states, the reported deadline is the first
    instant at which tick() does anything."""
    h = Harness()
    h.event(sv.SidecarStarted("balancer"))
    h.start(app_config(workers=2, timeout=4))
    h.run(h.core.restart_app("web", app_config(workers=1, timeout=4), identity="u"))
    h.take()
    while h.core.next_deadline() is not None:
        deadline = h.core.next_deadline()
        h.clock.now = deadline - 0.001
        assert h.run(h.core.tick()) == []
        h.clock.now = deadline
        assert h.run(h.core.tick()) != []
        for action in h.take():
            if isinstance(action, sv.Kill) and action.signal == sv.SIGKILL:
                h.event(sv.Exited(action.key, "killed by SIGKILL"))
        if h.clock.now > 1000:
            break


def test_a_removed_apps_workers_drain_within_its_own_graceful_timeout():
    h = Harness()
    h.start(app_config(graceful_timeout=1.5, timeout=None))
    actions = h.run(h.core.remove_app("web"))
    assert of(actions, sv.Stop) == [sv.Stop(k, handback=False) for k in h.keys()]
    assert h.core.next_deadline() == h.clock.now + 1.5   # not the master's 5 s
