"""A preloaded app's template in the supervision core (supervisor.master.supervision),
on a fake clock: when templates start, stop and are replaced, when their workers are
asked for, and what a template's failure does to its generation.
"""
from __future__ import annotations

import pytest
from test_supervision import Harness, app_config, logs, of

from supervisor.master import supervision as sv
from supervisor.master.lifecycle import State


class Preloaded(Harness):
    """The fake executor, for preloaded apps: a Spawn is confirmed (the worker's HELLO)
    only while `confirm` holds."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.confirm = True

    def run(self, actions):
        for action in actions:
            self.actions.append(action)
            if isinstance(action, sv.Spawn) and self.confirm:
                self.run(self.core.handle(sv.Spawned(action.key, next(self.pids))))
        return actions

    def template_up(self, generation=1, app="web"):
        self.event(sv.TemplateStarted(app, generation, next(self.pids)))
        return self.event(sv.TemplateReady(app, generation))

    def template_state(self, generation=1, app="web"):
        record = self.core.templates.get((app, generation))
        return record.state if record is not None else None

    def start_preloaded(self, workers=2):
        self.run(self.core.add_app(app_config(workers=workers, preload=True), identity="www-data"))
        self.template_up()
        self.ready_all()
        return self.take()


def test_workers_are_asked_of_the_template_once_it_is_ready():
    h = Preloaded()
    actions = h.run(h.core.add_app(app_config(workers=3, preload=True), identity="www-data"))
    assert [type(a) for a in actions if not isinstance(a, sv.Log)] == [sv.StartTemplate]
    assert of(actions, sv.StartTemplate)[0].generation.number == 1
    assert len(h.keys(state=State.SPAWNED)) == 3 and h.template_state() == "booting"
    spawns = of(h.template_up(), sv.Spawn)
    assert sorted(a.index for a in spawns) == [1, 2, 3] and h.template_state() == "ready"
    h.ready_all()
    assert len(of(h.take(), sv.Attach)) == 3 and h.core.complete()


def test_an_app_without_preload_has_no_template():
    h = Harness()
    actions = h.start()
    assert not of(actions, sv.StartTemplate) and not h.core.templates


def test_a_template_that_cannot_import_at_startup_ends_the_master():
    h = Preloaded()
    h.run(h.core.add_app(app_config(preload=True), identity="www-data"))
    h.event(sv.TemplateStarted("web", 1, 50))
    h.event(sv.TemplateBootFailed("web", 1, "Traceback...\nImportError: no module named app"))
    actions = h.event(sv.TemplateExited("web", 1, "failed to boot"))
    assert of(actions, sv.GiveUp) == [sv.GiveUp(1)]
    assert any("ImportError: no module named app" in line for line in logs(actions, "error"))


def test_a_template_that_cannot_import_on_reload_drops_its_generation_and_the_old_one_serves():
    h = Preloaded()
    h.start_preloaded()
    old = h.keys(state=State.READY)
    h.run(h.core.restart_app("web", app_config(preload=True), identity="www-data"))
    assert of(h.take(), sv.StartTemplate)[0].generation.number == 2
    assert len(h.keys(state=State.SPAWNED, generation=2)) == 2
    h.event(sv.TemplateBootFailed("web", 2, "SyntaxError: invalid syntax"))
    actions = h.event(sv.TemplateExited("web", 2, "failed to boot"))
    assert not of(actions, sv.Stop) and not of(actions, sv.Kill) and not of(actions, sv.GiveUp)
    assert any("generation 2 dropped" in line for line in logs(actions, "error"))
    assert any("SyntaxError" in line for line in logs(actions, "error"))
    assert h.keys(state=State.READY) == old and not h.keys(generation=2)
    assert h.core.apps["web"].next is None and h.template_state(2) is None
    assert h.template_state(1) == "ready"


def test_a_generation_switch_stops_the_old_template_and_its_exit_changes_nothing():
    h = Preloaded()
    h.start_preloaded()
    h.run(h.core.restart_app("web", app_config(preload=True), identity="www-data"))
    h.template_up(generation=2)
    h.ready_all()
    actions = h.take()
    assert of(actions, sv.StopTemplate) == [sv.StopTemplate("web", 1)]
    assert len(of(actions, sv.Stop)) == 2   # the old workers drain, with hand-back
    assert h.template_state(1) == "stopping"
    actions = h.event(sv.TemplateExited("web", 1, "exit status 0"))
    assert [a for a in actions if not isinstance(a, sv.Log)] == [] and h.template_state(1) is None


def test_a_template_that_dies_is_replaced_and_its_workers_serve_on():
    h = Preloaded()
    h.start_preloaded()
    serving = h.keys(state=State.READY)
    h.clock.now += 10   # it ran a while: replaced at once (a young one waits: the crash-loop backoff)
    actions = h.event(sv.TemplateExited("web", 1, "killed by SIGKILL"))
    assert of(actions, sv.StartTemplate) and not of(actions, sv.Kill) and not of(actions, sv.Stop)
    assert h.keys(state=State.READY) == serving
    # TTIN while the new template boots: the worker waits for it.
    actions = h.run(h.core.rescale("web", 3))
    assert not of(actions, sv.Spawn) and len(h.keys(state=State.SPAWNED)) == 1
    assert [a.index for a in of(h.template_up(), sv.Spawn)] == [3]


def test_a_template_crash_loop_backs_off():
    h = Preloaded()
    h.start_preloaded()
    delays = []
    for _ in range(4):
        h.event(sv.TemplateStarted("web", 1, next(h.pids)))
        h.take()
        actions = h.event(sv.TemplateExited("web", 1, "exit status 1"))
        record = h.core.templates[("web", 1)]
        if of(actions, sv.StartTemplate):
            delays.append(0.0)
            continue
        delays.append(record.restart_at - h.clock.now)
        assert h.template_state() == "backoff"
        assert of(h.advance(record.restart_at - h.clock.now), sv.StartTemplate)
    assert delays == [pytest.approx(d) for d in (0.1, 0.2, 0.4, 0.8)]


def test_a_template_that_outstays_the_boot_timeout_is_killed():
    h = Preloaded()
    h.run(h.core.add_app(app_config(preload=True), identity="www-data"))
    h.event(sv.TemplateStarted("web", 1, 50))
    h.take()
    assert h.core.next_deadline() == pytest.approx(h.clock.now + 10)
    actions = h.advance(10)
    assert of(actions, sv.KillTemplate) == [sv.KillTemplate("web", 1, sv.SIGKILL)]
    assert any("did not import the app within 10s" in line for line in logs(actions, "error"))
    assert of(h.advance(100), sv.KillTemplate) == []   # once


def test_a_template_that_does_not_fork_an_asked_worker_is_killed():
    h = Preloaded()
    h.start_preloaded(workers=1)
    h.confirm = False
    h.run(h.core.rescale("web", 2))
    h.take()
    [key] = h.keys(state=State.SPAWNED)
    actions = h.advance(10)
    assert of(actions, sv.KillTemplate) == [sv.KillTemplate("web", 1, sv.SIGKILL)]
    assert of(h.advance(1), sv.KillTemplate) == []   # once
    # The spawn it owed fails as it goes; the slot waits for the next template.
    h.event(sv.SpawnFailed(key, "its template did not start it"))
    h.event(sv.TemplateExited("web", 1, "killed by SIGKILL"))
    assert len(h.keys(state=State.READY)) == 1
    waiting = [w for w in h.core.workers.values() if w.index == 2]
    assert len(waiting) == 1 and waiting[0].state in (State.BACKOFF, State.SPAWNED) and waiting[0].asked_at is None


@pytest.mark.parametrize("then", ["spawned", "spawn_failed"])
def test_a_worker_retired_while_its_template_forks_it_is_stopped_when_it_starts(then):
    h = Preloaded()
    h.start_preloaded(workers=1)
    h.confirm = False
    h.run(h.core.rescale("web", 2))
    [key] = h.keys(state=State.SPAWNED)
    actions = h.run(h.core.rescale("web", 1))
    record = h.core.workers[key]
    assert record.state is State.DRAINING and of(actions, sv.Stop) == [sv.Stop(key, True)]
    if then == "spawned":
        h.event(sv.Spawned(key, 4242))
        assert record.state is State.DRAINING and record.pid == 4242
        assert of(h.advance(5), sv.Kill) == [sv.Kill(key, sv.SIGKILL)]   # the drain deadline still holds
        h.event(sv.Exited(key, "exit status 0"))
    else:
        h.event(sv.SpawnFailed(key, "its template did not start it"))
    assert key not in h.core.workers and len(h.keys(state=State.READY)) == 1


def test_a_worker_not_yet_asked_is_just_dropped():
    h = Preloaded()
    h.run(h.core.add_app(app_config(workers=2, preload=True), identity="www-data"))
    h.run(h.core.rescale("web", 1))
    assert len(h.keys()) == 1


def test_a_stop_stops_every_template_and_waits_for_them():
    h = Preloaded()
    h.start_preloaded()
    actions = h.run(h.core.stop(graceful=True))
    assert of(actions, sv.StopTemplate) == [sv.StopTemplate("web", 1)]
    for key in h.keys():
        h.event(sv.Exited(key, "exit status 0"))
    assert not h.core.idle()
    assert of(h.advance(sv.QUICK_STOP_GRACE_S), sv.KillTemplate) == [sv.KillTemplate("web", 1, sv.SIGKILL)]
    h.event(sv.TemplateExited("web", 1, "killed by SIGKILL"))
    assert h.core.idle()


def test_removing_an_app_stops_its_template():
    h = Preloaded()
    h.start_preloaded()
    assert of(h.run(h.core.remove_app("web")), sv.StopTemplate) == [sv.StopTemplate("web", 1)]


# -- the config keys ------------------------------------------------------------------


def test_preload_and_its_hook_are_read(tmp_path):
    from test_config import document, write

    from supervisor.config.reader import load
    config = load(write(tmp_path, document(app='preload = true\npreload_hook = "blog.hooks:warm"')))
    assert config.apps["blog"].preload is True and config.apps["blog"].preload_hook == "blog.hooks:warm"
    assert load(write(tmp_path, document())).apps["blog"].preload is False


@pytest.mark.parametrize("line, fragment", [
    ('preload = "yes"', "apps.blog.preload"),
    ('preload_hook = "not a hook"', "apps.blog.preload_hook"),
])
def test_a_bad_preload_setting_is_named(tmp_path, line, fragment):
    from test_config import document, problems
    _, found = problems(tmp_path, document(app=line))
    assert len(found) == 1 and fragment in found[0]


def test_turning_preload_on_restarts_the_app(tmp_path):
    from test_config import document, write

    from supervisor.config import plan
    from supervisor.config.reader import load
    old = load(write(tmp_path, document(), "old.toml"))
    new = load(write(tmp_path, document(app="preload = true"), "new.toml"))
    result = plan.diff(old, new)
    assert result.apps_restart == ("blog",) and result.reasons["app blog"] == ("preload",)
