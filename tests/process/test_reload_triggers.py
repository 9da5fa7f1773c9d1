"""What starts a reload, and what a reload may change: includes, code, listeners."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

from conftest import (
    REPO,
    alive,
    answers,
    children_of,
    cmdline,
    free_port,
    get_json,
    http_request,
    listening_inode,
    wait_for,
)


def main_config(port, include=False):
    return f"""
        [master]
        graceful_timeout = 5
        {'include = ["apps.d/*.toml"]' if include else ''}

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.probe]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        chdir = "{REPO}"
        env = {{ PROBE_VALUE = "main" }}
    """


def included_app(port):
    return textwrap.dedent(f"""
        [listeners.extra]
        bind = "127.0.0.1:{port}"

        [apps.extra]
        module = "tests.apps.probe:app"
        listeners = ["extra"]
        chdir = "{REPO}"
        env = {{ PROBE_VALUE = "included" }}
    """)


def test_an_included_file_adds_and_its_removal_retires_an_app(baton, port, tmp_path):
    (tmp_path / "apps.d").mkdir()
    master = baton(main_config(port, include=True))
    master.wait_workers(1)
    master.wait_log("is watching for changes")
    extra_port = free_port()
    (tmp_path / "apps.d" / "extra.toml").write_text(included_app(extra_port))
    wait_for(lambda: answers(extra_port), message=lambda: f"the included app; log:\n{master.log()}")
    assert get_json(extra_port)["env"] == "included"
    master.wait_log("is watching for changes", count=2)  # the watcher now also watches extra.toml
    (tmp_path / "apps.d" / "extra.toml").unlink()
    wait_for(lambda: not answers(extra_port), message="the included app to be retired")
    master.wait_workers(1)
    assert get_json(port)["env"] == "main"


def test_a_change_to_reload_on_files_restarts_just_that_app(baton, port, scratch):
    code = scratch / "code"
    shutil.copytree(REPO / "tests" / "apps", code / "probeapp")
    other_port = free_port()
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"

        [listeners.other]
        bind = "127.0.0.1:{other_port}"

        [apps.watched]
        module = "probeapp.probe:app"
        listeners = ["web"]
        chdir = "{code}"
        reload_on = ["probeapp/**/*.py"]

        [apps.other]
        module = "tests.apps.probe:app"
        listeners = ["other"]
        chdir = "{REPO}"
    """)
    master.wait_workers(2)
    master.wait_log("is watching for changes")
    watched, other = get_json(port)["pid"], get_json(other_port)["pid"]
    module = code / "probeapp" / "probe.py"
    module.write_text(module.read_text().replace('"path": environ["PATH_INFO"],',
                                                 '"path": environ["PATH_INFO"], "edited": True,'))
    master.wait_log("app watched: generation 2 serving")
    after = get_json(port)
    assert after["pid"] != watched and after.get("edited") is True
    assert get_json(other_port)["pid"] == other


def test_a_new_address_is_bound_before_the_switch_and_the_old_one_closes(baton, port):
    master = baton(main_config(port))
    master.wait_workers(1)
    master.wait_log("is watching for changes")
    new_port = free_port()
    master.config.write_text(textwrap.dedent(main_config(new_port)))
    wait_for(lambda: answers(new_port), message=lambda: f"the new address; log:\n{master.log()}")
    wait_for(lambda: not answers(port), message="the old address to close")


def test_a_listener_that_cannot_be_bound_is_a_reload_error_not_a_crash(baton, port):
    master = baton(main_config(port))
    master.wait_workers(1)
    master.wait_log("is watching for changes")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        master.config.write_text(textwrap.dedent(main_config(busy_port)))
        master.wait_log("reload rejected; the running config stays")
        assert "Address already in use" in master.log()
        inode = listening_inode(port)
        assert get_json(port)["env"] == "main"
        os.kill(master.pid, signal.SIGHUP)  # the file is still the bad one: rejected again
        master.wait_log("reload rejected; the running config stays", count=2)
    assert listening_inode(port) == inode
    assert http_request(port)[0] == 200


def _balancers(master) -> list[int]:
    def is_balancer(pid):
        try:
            return alive(pid) and cmdline(pid).startswith("baton: balancer")
        except (FileNotFoundError, ProcessLookupError):
            return False
    return [pid for pid in children_of(master.pid) if is_balancer(pid)]


def test_values_that_would_end_the_master_later_are_a_reload_error(baton, port):
    # Each of these passed `baton check` and the reload: the timeout then overflowed
    # epoll's int of milliseconds in the loop's wait, and the unknown balancer_user
    # ended the master at the balancer's next start.
    master = baton(main_config(port))
    workers = master.wait_workers(1)
    master.wait_log("is watching for changes")
    (balancer,) = wait_for(lambda: _balancers(master), message="the balancer")
    bad = (textwrap.dedent(main_config(port))
           .replace("graceful_timeout = 5", 'graceful_timeout = 2200000\nbalancer_user = "baton-no-such-user"')
           .replace("env = {", "keepalive = 3000000.5\nenv = {"))
    master.config.write_text(bad)
    master.wait_log("reload rejected; the running config stays")
    problems = [
        (f"{master.config}: master.graceful_timeout: expected a number of seconds from 0 to 86400, "
         "found integer 2200000"),
        (f"{master.config}: master.balancer_user: expected an existing user, found 'baton-no-such-user', "
         "which this system does not know"),
        (f"{master.config}: apps.probe.keepalive: expected a number of seconds from 0 to 86400, "
         "found float 3000000.5"),
    ]
    for problem in problems:
        assert problem in master.log()
    check = subprocess.run([sys.executable, "-m", "supervisor", "check", "-c", str(master.config)],
                           cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert (check.returncode, check.stderr.splitlines()) == (1, problems)
    # The running config stays: the same worker serves, and a balancer started now
    # becomes the running config's user, so the master outlives its restart.
    assert master.workers() == workers and get_json(port)["env"] == "main"
    os.kill(balancer, signal.SIGKILL)
    wait_for(lambda: [pid for pid in _balancers(master) if pid != balancer],
             message=lambda: f"a new balancer; log:\n{master.log()}")
    wait_for(lambda: answers(port), message=lambda: f"the app through the new balancer; log:\n{master.log()}")
    assert master.proc.poll() is None
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log()
