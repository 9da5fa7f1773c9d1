"""The master and its workers as real processes: users, titles, signals, supervision."""
from __future__ import annotations

import os
import pwd
import signal
import threading
from pathlib import Path

import pytest
from conftest import (
    REPO,
    alive,
    answers,
    cmdline,
    free_port,
    get_json,
    http_request,
    listening_inode,
    proc_status,
    wait_for,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="switching users needs root")


def config(port, *, workers=1, extra_app="", extra_master="", module="tests.apps.probe:app"):
    return f"""
        [master]
        graceful_timeout = 5
        boot_timeout = 10
        {extra_master}

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.probe]
        module = "{module}"
        listeners = ["web"]
        workers = {workers}
        chdir = "{REPO}"
        {extra_app}
    """


def test_serves_requests_with_app_settings_applied(baton, port):
    master = baton(config(port, extra_app='env = { PROBE_VALUE = "forty-two" }\numask = "027"'))
    master.wait_workers(1)
    info = get_json(port, "/hello")
    assert info["env"] == "forty-two"
    assert info["umask"] == 0o027
    assert info["cwd"] == str(REPO)
    assert info["path"] == "/hello"


def test_factory_module_spec(baton, port):
    master = baton(config(port, module="tests.apps.probe:create_app()"))
    master.wait_workers(1)
    assert get_json(port)["path"] == "/"


@needs_root
def test_workers_run_as_the_configured_user_with_its_groups_only(baton, port):
    master = baton(config(port, workers=2, extra_app='user = "www-data"'))
    pids = master.wait_workers(2)
    www = pwd.getpwnam("www-data")
    for pid in pids:
        status = proc_status(pid)
        assert status["Uid"].split() == [str(www.pw_uid)] * 4
        assert status["Gid"].split() == [str(www.pw_gid)] * 4
        assert "0" not in status["Groups"].split()  # root's groups never leak
    assert get_json(port)["uid"] == www.pw_uid


@needs_root
def test_app_without_user_runs_as_nobody_and_the_log_says_so(baton, port):
    master = baton(config(port))
    (pid,) = master.wait_workers(1)
    assert int(proc_status(pid)["Uid"].split()[0]) == pwd.getpwnam("nobody").pw_uid
    assert "app 'probe' names no user; its workers run as nobody" in master.log()


def test_process_titles_tell_master_and_workers_apart(baton, port):
    master = baton(config(port, workers=2))
    pids = master.wait_workers(2)
    assert cmdline(master.pid) == f"baton: master [{master.config}]"
    titles = sorted(cmdline(pid) for pid in pids)
    user = "nobody" if ROOT else pwd.getpwuid(os.geteuid()).pw_name
    assert titles == [f"baton: worker probe#1 gen 1 ({user})", f"baton: worker probe#2 gen 1 ({user})"]


def test_a_killed_worker_is_replaced(baton, port):
    master = baton(config(port, workers=2))
    first = master.wait_workers(2)
    os.kill(first[0], signal.SIGKILL)
    after = master.wait_workers(2, exclude=(first[0],))
    assert first[1] in after
    assert answers(port)


def test_broken_app_backs_off_without_touching_a_healthy_one(baton, port):
    other = free_port()
    master = baton(config(port) + f"""
        [listeners.other]
        bind = "127.0.0.1:{other}"

        [apps.broken]
        module = "tests.apps.broken:app"
        listeners = ["other"]
        chdir = "{REPO}"
    """)
    master.wait_log("crash loop backoff", count=3)
    delays = [float(line.split("next worker in ")[1].split("s")[0])
              for line in master.log().splitlines() if "next worker in" in line]
    assert delays == sorted(delays) and delays[-1] > delays[0]
    assert "broken on purpose" in master.log()
    assert answers(port)


def test_master_exits_nonzero_with_the_traceback_when_no_app_can_boot(baton, port):
    master = baton(config(port, module="tests.apps.broken:app"))
    assert master.wait_exit() == 1
    log = master.log()
    assert "RuntimeError: broken on purpose" in log
    assert "no app could boot" in log
    assert not master.workers()


def test_term_finishes_the_in_flight_request_then_exits_zero(baton, port, scratch):
    master = baton(config(port, extra_app="threads = 2"))
    master.wait_workers(1)
    mark = scratch / "running"
    result = {}

    def slow_request():
        result["response"] = http_request(port, f"/?sleep=1&mark={mark}")

    client = threading.Thread(target=slow_request)
    client.start()
    wait_for(mark.exists, message="the slow request to start")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    client.join(10)
    assert result["response"][0] == 200
    assert not answers(port)


def test_int_stops_quickly(baton, port):
    master = baton(config(port, workers=2))
    pids = master.wait_workers(2)
    master.signal(signal.SIGINT)
    assert master.wait_exit(timeout=5) == 0
    wait_for(lambda: not any(alive(pid) for pid in pids), message="workers gone")


def test_ttin_and_ttou_add_and_remove_a_worker(baton, port):
    master = baton(config(port, workers=2))
    pids = master.wait_workers(2)
    master.signal(signal.SIGTTIN)
    grown = master.wait_workers(3)
    assert set(pids) < set(grown)
    master.signal(signal.SIGTTOU)
    shrunk = master.wait_workers(2)
    assert set(shrunk) == set(pids)
    assert answers(port)


def test_no_orphans_after_the_master_is_sigkilled(baton, port):
    master = baton(config(port, workers=3))
    pids = master.wait_workers(3)
    master.signal(signal.SIGKILL)
    master.wait_exit()
    wait_for(lambda: not any(alive(pid) for pid in pids), message="workers to die with the master")


def _fds(pid):
    """What kinds of fd `pid` holds, how many of each: the numbers may be reused in
    another order (a worker's fds are opened and closed in several steps)."""
    kinds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kinds.append(os.readlink(f"/proc/{pid}/fd/{fd}").split(":[")[0])
        except FileNotFoundError:   # the listdir's own fd
            pass
    return sorted(kinds)


def test_no_zombie_or_fd_growth_after_50_worker_restarts(baton, port):
    master = baton(config(port, workers=2, extra_master="crash_backoff_max = 0.05"))
    pids = master.wait_workers(2)
    fds_before = _fds(master.pid)
    for _ in range(50):
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        pids = master.wait_workers(2, exclude=(victim,))
    assert _fds(master.pid) == fds_before
    states = [Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] for pid in master.workers()]
    assert "Z" not in states
    assert answers(port)


def _socket_inodes(pid):
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return {link for link in links if link.startswith("socket:")}


def test_worker_keeps_only_its_own_fds(baton, port):
    other = free_port()
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        mode = "share"

        [listeners.other]
        bind = "127.0.0.1:{other}"
        mode = "share"

        [apps.first]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        chdir = "{REPO}"

        [apps.second]
        module = "tests.apps.probe:app"
        listeners = ["other"]
        chdir = "{REPO}"
    """)
    pids = master.wait_workers(2)
    first, second = sorted(pids, key=lambda pid: cmdline(pid))
    in_master = _socket_inodes(master.pid)
    # Of everything the master holds, a worker keeps only its own listener: not the
    # other app's, not the master's ends of any channel.
    assert _socket_inodes(first) & in_master == {listening_inode(port)}
    assert _socket_inodes(second) & in_master == {listening_inode(other)}
    assert not _socket_inodes(first) & _socket_inodes(second)
