"""Preload (`preload = true`): one template per generation imports the app and forks
its workers. Real masters, templates and workers: the workers share one import, a
reload imports the new code, a broken import or a killed template costs no request.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import (
    REPO,
    alive,
    children_of,
    cmdline,
    http_request,
    proc_status,
    wait_for,
)

from supervisor.master.control import ControlClient

IMPORT_MB = 60   # the synthetic app's import: big enough to see, small enough for CI


def _config(port: int, directory: Path, module: str, extra: str = "", workers: int = 3) -> str:
    return f"""
        [master]
        graceful_timeout = 5
        control_socket = "{directory}/baton.ctl"

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.big]
        module = "{module}"
        listeners = ["web"]
        chdir = "{directory}"
        pythonpath = ["{REPO}"]
        workers = {workers}
        preload = true
        env = {{ BIGAPP_MB = "{IMPORT_MB}", BIGAPP_IMPORTS = "{directory}/imports.log" }}
        {extra}
    """


def _write_app(directory: Path, version: str, broken: bool = False) -> None:
    """The app's own module, in a directory its user can read: the synthetic big app
    answering with `version` (or, `broken`, a module that cannot be imported)."""
    text = ("from tests.apps.bigapp import make_app\n"
            f"app = make_app({version!r})\n")
    if broken:
        text += "def broken(:\n"
    path = directory / "preloaded.py"
    path.write_text(text)
    path.chmod(0o644)


@pytest.fixture
def preloaded(baton, port, scratch):
    """A master serving the preloaded app from `scratch` (3 workers), every worker ready."""
    _write_app(scratch, "v1")
    imports = scratch / "imports.log"
    imports.write_text("")
    imports.chmod(0o666)
    master = baton(_config(port, scratch, "preloaded:app"))
    master.wait_workers(3, timeout=30)
    return master


def _status(directory: Path) -> dict:
    return ControlClient(str(directory / "baton.ctl")).call("status")


def _templates(master) -> list[int]:
    return [pid for pid in children_of(master.pid) if cmdline(pid).startswith("baton: template")]


def _imports(directory: Path) -> list[int]:
    """The pids that imported the app (the import log's other lines are the hook's)."""
    return [int(line) for line in (directory / "imports.log").read_text().splitlines() if line.isdigit()]


def _answers(port: int, want: int) -> dict[int, dict]:
    """Ask until `want` distinct workers answered: pid -> its answer."""
    seen: dict[int, dict] = {}

    def enough():
        status, _, body = http_request(port)
        assert status == 200, body
        answer = json.loads(body)
        seen[answer["pid"]] = answer
        return len(seen) >= want
    wait_for(enough, timeout=20, message=lambda: f"{want} workers to answer, saw {sorted(seen)}")
    return seen


def _private_dirty_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError(f"no Private_Dirty for pid {pid}")


class Load:
    """A few keep-alive clients asking without pause; every error and non-200 counts."""

    def __init__(self, port: int, clients: int = 3):
        self.port = port
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self.requests = 0
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                continue
            if response.status != 200:
                self.failures.append(f"status {response.status}: {body[:200]!r}")
                continue
            self.versions.add(json.loads(body)["version"])
            self.requests += 1
        conn.close()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        wait_for(lambda: self.requests >= len(self.threads), message="the clients' first answers")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


def test_the_workers_share_one_import_made_by_the_template_as_the_apps_user(preloaded, port, scratch):
    answers = _answers(port, 3)
    assert len({answer["id"] for answer in answers.values()}) == 1   # the same object in every worker
    assert {answer["uid"] for answer in answers.values()} == {65534}
    [template] = _templates(preloaded)
    # Imported once, by the template, as the app's user; never by the master.
    assert _imports(scratch) == [template]
    assert proc_status(template)["Uid"].split()[0] == "65534"
    assert preloaded.pid not in _imports(scratch)
    for pid in answers:
        assert int(proc_status(pid)["PPid"]) == preloaded.pid   # the master's children, re-parented
        # Its private memory is far below the import: the import's pages are the template's, shared.
        assert _private_dirty_kb(pid) < IMPORT_MB * 1024 / 4, f"worker {pid}"
    # ctl status lists the template beside its workers, with memory.
    [app] = _status(scratch)["apps"]
    [entry] = app["templates"]
    assert entry["pid"] == template and entry["state"] == "ready" and entry["pss_kb"] > 0
    assert all(worker["private_dirty_kb"] is not None for worker in app["workers"])


def test_recycled_and_added_workers_are_forked_from_the_template(baton, port, scratch):
    _write_app(scratch, "v1")
    (scratch / "imports.log").write_text("")
    (scratch / "imports.log").chmod(0o666)
    extra = 'max_requests = 3\n        preload_hook = "tests.apps.bigapp:on_preload"'
    master = baton(_config(port, scratch, "preloaded:app", extra=extra, workers=1))
    first = master.wait_workers(1, timeout=30)
    for _ in range(4):
        assert http_request(port)[0] == 200
    master.wait_log("recycling it")
    master.wait_workers(1, exclude=first, timeout=20)
    master.signal(signal.SIGTTIN)
    master.wait_log("scaled up")
    answers = _answers(port, 2)
    assert len({answer["id"] for answer in answers.values()}) == 1
    assert len(_imports(scratch)) == 1   # three workers, one import
    [template] = _templates(master)
    hooks = [line for line in (scratch / "imports.log").read_text().splitlines() if line.startswith("hook")]
    assert hooks == [f"hook {template} 0"]   # the preload_hook ran once, in the template


def test_a_code_change_and_a_reload_serve_the_new_code_with_no_failed_request(preloaded, port, scratch):
    [old_template] = _templates(preloaded)
    with Load(port) as load:
        _write_app(scratch, "v2")
        preloaded.signal(signal.SIGHUP)
        wait_for(lambda: "v2" in load.versions, timeout=30, message=lambda: f"v2 served; log:\n{preloaded.log()}")
        preloaded.wait_log("generation 2 serving")
        wait_for(lambda: not alive(old_template), message="the old template to exit")
    assert load.failures == []
    answers = _answers(port, 3)
    assert {answer["version"] for answer in answers.values()} == {"v2"}
    [new_template] = _templates(preloaded)
    assert _imports(scratch) == [old_template, new_template]   # imported afresh, once


def test_a_template_that_cannot_import_leaves_the_old_generation_serving(preloaded, port, scratch):
    [template] = _templates(preloaded)
    workers = sorted(preloaded.workers())
    with Load(port) as load:
        _write_app(scratch, "v2", broken=True)
        preloaded.signal(signal.SIGHUP)
        preloaded.wait_log("generation 2 dropped", timeout=30)
    assert load.failures == [] and load.versions == {"v1"}
    assert "SyntaxError" in preloaded.log()
    assert sorted(preloaded.workers()) == workers and _templates(preloaded) == [template]
    # The old template still forks: a TTIN adds a worker of the old code.
    preloaded.signal(signal.SIGTTIN)
    preloaded.wait_workers(4, timeout=20)
    assert {answer["version"] for answer in _answers(port, 4).values()} == {"v1"}


def test_a_killed_template_fails_no_request_and_is_replaced(preloaded, port, scratch):
    [template] = _templates(preloaded)
    workers = sorted(preloaded.workers())
    with Load(port) as load:
        os.kill(template, signal.SIGKILL)
        preloaded.wait_log("template big gen 1", count=3, timeout=30)   # ready, exited, ready again
        wait_for(lambda: len(_templates(preloaded)) == 1 and _templates(preloaded) != [template],
                 message=lambda: f"a new template; log:\n{preloaded.log()}")
        assert sorted(preloaded.workers()) == workers   # they served on
        preloaded.signal(signal.SIGTTIN)
        added = preloaded.wait_workers(4, timeout=20)
    assert load.failures == []
    assert set(added) - set(workers)
    assert not [pid for pid in children_of(preloaded.pid) if not alive(pid)]   # no zombie left


def test_a_preloaded_app_that_cannot_import_at_start_ends_the_master_with_its_traceback(baton, port, scratch):
    _write_app(scratch, "v1", broken=True)
    (scratch / "imports.log").write_text("")
    master = baton(_config(port, scratch, "preloaded:app"))
    assert master.wait_exit(timeout=30) == 1
    assert "SyntaxError" in master.log() and "no app could boot" in master.log()
