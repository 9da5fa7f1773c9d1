"""`isolate = ["network"]`: an app's workers (and its template) run in a new, empty
network namespace. Real masters and workers: the app serves its clients through the
sockets the master bound (every listener mode), yet cannot connect to a port this test
listens on, on 127.0.0.1; without `isolate` the same app can."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, children_of, cmdline, get_json

NETNS_MEANS = 'workers run in an empty network namespace: no outbound connections'


def _config(port: int, mode: str, app: str = "") -> str:
    return f"""
        [master]
        graceful_timeout = 5

        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "{mode}"

        [apps.out]
        module = "tests.apps.outbound:app"
        listeners = ["web"]
        chdir = "{REPO}"
        workers = 2
        {app}
    """


@pytest.fixture
def target():
    """A listener on 127.0.0.1 for the app to try; the test checks it was (not) reached."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def _accepted(sock: socket.socket) -> int:
    """How many connections reached `sock` (taken from its accept queue, and closed).
    The app answers only after its connect() returned, so any connection it made is
    queued by the time its answer is read."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.mark.parametrize("mode", ["balance", "share", "reuseport"])
def test_an_isolated_app_serves_but_cannot_connect_out(baton, port, target, mode):
    master = baton(_config(port, mode, 'isolate = ["network"]'))
    workers = master.wait_workers(2)
    answer = get_json(port, f"/connect?port={target.getsockname()[1]}")
    assert answer["pid"] in workers
    assert answer["connect"] != "connected" and answer["connect"].startswith("OSError"), answer
    assert _accepted(target) == 0
    assert answer["netns"] == _netns(answer["pid"]) != _netns(master.pid)
    assert {_netns(pid) for pid in workers}.isdisjoint({_netns(master.pid)})
    assert master.log().count(f"app 'out': {NETNS_MEANS}") == 1


@pytest.mark.parametrize("mode", ["balance", "share"])
def test_without_isolate_the_same_app_connects(baton, port, target, mode):
    master = baton(_config(port, mode))
    master.wait_workers(2)
    answer = get_json(port, f"/connect?port={target.getsockname()[1]}")
    assert answer["connect"] == "connected", answer
    assert _accepted(target) == 1
    assert answer["netns"] == _netns(master.pid)
    assert NETNS_MEANS not in master.log()


def test_a_preloaded_apps_template_and_its_workers_are_isolated(baton, port, target):
    master = baton(_config(port, "balance", 'preload = true\nisolate = ["network"]'))
    workers = master.wait_workers(2, timeout=30)
    templates = [pid for pid in children_of(master.pid) if cmdline(pid).startswith("baton: template")]
    assert len(templates) == 1
    # One namespace, the template's, which its forked workers inherited.
    assert {_netns(pid) for pid in [*templates, *workers]} == {_netns(templates[0])} != {_netns(master.pid)}
    for _ in workers:
        answer = get_json(port, f"/connect?port={target.getsockname()[1]}")
        assert answer["pid"] in workers
        assert answer["connect"].startswith("OSError"), answer
    assert _accepted(target) == 0


def test_a_master_that_cannot_make_the_namespace_says_why_and_exits(tmp_path, port):
    """Root without CAP_SYS_ADMIN (as in many containers): every worker fails to boot,
    saying what isolate needs, and a master none of whose apps can boot exits."""
    config = tmp_path / "baton.toml"
    config.write_text(_config(port, "balance", 'isolate = ["network"]'))
    log_path = tmp_path / "baton.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--",
             sys.executable, "-m", "supervisor", "run", "-c", str(config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.wait(30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log_path.read_text(errors="replace")
    assert "app out: could not create a new network namespace" in text, text
    assert "CAP_SYS_ADMIN" in text and "no app could boot" in text, text


@pytest.mark.parametrize("as_nobody", [False, True])
def test_baton_check_says_up_front_that_isolate_needs_root(scratch, port, as_nobody):
    config = scratch / "baton.toml"
    config.write_text(_config(port, "balance", 'isolate = ["network"]'))
    config.chmod(0o644)
    become = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] if as_nobody else []
    result = subprocess.run([*become, sys.executable, "-m", "supervisor", "check", "-c", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    if as_nobody:
        assert result.returncode == 1
        assert result.stderr.startswith(f"{config}: apps.out.isolate: expected a master running as root"), \
            result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "ok (1 app, 1 listener)" in result.stdout
