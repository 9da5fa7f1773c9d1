"""Lifecycle hooks (issue 13 item 10) through real workers: each runs in the worker, as
the app's user, at its moment; a broken init hook is a boot failure like an import
error; a broken pre_request costs its request a 500, never the worker."""
from __future__ import annotations

import pwd
import signal
import textwrap

import pytest
from conftest import REPO, http_request, wait_for

NOBODY = pwd.getpwnam("nobody").pw_uid
HOOKS = "tests.apps.lifecycle"


def hooks_config(port, log, fail=""):
    return f"""
        [master]
        graceful_timeout = 5
        boot_timeout = 10

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.life]
        module = "tests.apps.lifecycle_app:app"
        listeners = ["web"]
        chdir = "{REPO}"
        user = "nobody"
        env = {{ HOOK_LOG = "{log}", HOOK_FAIL = "{fail}" }}
        post_fork = "{HOOKS}:post_fork"
        post_worker_init = "{HOOKS}:post_worker_init"
        worker_exit = "{HOOKS}:worker_exit"
        pre_request = "{HOOKS}:pre_request"
        post_request = "{HOOKS}:post_request"
    """


def notes(log) -> list[list[str]]:
    """The hook log's lines, split: [hook, pid, uid, detail...]."""
    try:
        return [line.split() for line in log.read_text().splitlines()]
    except FileNotFoundError:
        return []


@pytest.mark.timeout(60)
def test_each_hook_runs_in_the_worker_as_the_apps_user_at_its_moment(baton, port, scratch):
    log = scratch / "hooks.log"
    master = baton(hooks_config(port, log))
    (worker,) = master.wait_workers(1)
    assert http_request(port, "/one")[0] == 200
    status, _, body = http_request(port, "/stream")
    assert (status, body) == (200, str(worker).encode())
    wait_for(lambda: len(notes(log)) >= 8, message=lambda: f"8 notes in {notes(log)}")
    assert [(n[0], n[3:]) for n in notes(log)] == [
        ("post_fork", ["life#1", "app-imported=False"]),
        ("post_worker_init", ["life#1", "app-imported=True"]),
        ("pre_request", ["/one"]), ("app", ["/one"]), ("post_request", ["/one", "200", "OK", "True"]),
        ("pre_request", ["/stream"]), ("app", ["/stream"]), ("post_request", ["/stream", "200", "OK", "True"]),
    ]
    # In the worker itself, as nobody: the file is nobody's too.
    assert {(int(n[1]), int(n[2])) for n in notes(log)} == {(worker, NOBODY)}
    assert log.stat().st_uid == NOBODY
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert notes(log)[-1] == ["worker_exit", str(worker), str(NOBODY), "life#1", f"pid={worker}"]


@pytest.mark.timeout(60)
def test_a_raising_pre_request_costs_that_request_a_500_and_the_worker_serves_on(baton, port, scratch):
    log = scratch / "hooks.log"
    master = baton(hooks_config(port, log))
    (worker,) = master.wait_workers(1)
    status, _, body = http_request(port, "/pre-fails")
    assert status == 500 and body == b"Internal Server Error\n"
    master.wait_log("pre_request hook failed for GET /pre-fails; answering 500")
    assert "RuntimeError: pre_request fails on purpose" in master.log()
    assert "app /pre-fails" not in log.read_text()      # the app was not called
    status, _, body = http_request(port, "/after")
    assert (status, body) == (200, str(worker).encode())
    assert master.workers() == [worker]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hook", ["post_fork", "post_worker_init"])
def test_a_raising_init_hook_fails_the_boot_and_a_reload_keeps_the_old_generation(baton, port, scratch, hook):
    log = scratch / "hooks.log"
    master = baton(hooks_config(port, log))
    (worker,) = master.wait_workers(1)
    master.config.write_text(textwrap.dedent(hooks_config(port, log, fail=hook)))
    master.signal(signal.SIGHUP)
    master.wait_log("generation 2 dropped", timeout=20)
    assert f"RuntimeError: {hook} fails on purpose" in master.log()
    assert "failed to boot" in master.log()
    wait_for(lambda: master.workers() == [worker],
             message=lambda: f"the failed generation gone; workers {master.workers()}, log:\n{master.log()}")
    status, _, body = http_request(port, "/")
    assert (status, body) == (200, str(worker).encode())


@pytest.mark.timeout(60)
def test_a_hook_that_cannot_be_imported_fails_the_boot(baton, port, scratch):
    log = scratch / "hooks.log"
    master = baton(hooks_config(port, log).replace(f'"{HOOKS}:pre_request"', f'"{HOOKS}:no_such_hook"'))
    master.wait_log("failed to boot", timeout=20)
    assert f"pre_request: module '{HOOKS}' has no attribute 'no_such_hook'" in master.log()
