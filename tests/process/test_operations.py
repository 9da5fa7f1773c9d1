"""Running Baton for years: ctl, health and metrics, hung and bloated workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import REPO, free_port, get_json, http_request, wait_for
from test_reload import Clients


def ops_config(port, *, workers=2, app_extra="", master_extra=""):
    return f"""
        [master]
        graceful_timeout = 10
        {master_extra}

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.probe]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        workers = {workers}
        keepalive = 60
        chdir = "{REPO}"
        {app_extra}
    """


def ctl(master, *args, user=None):
    command = [sys.executable, "-m", "supervisor", "ctl", "-c", str(master.config), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30, user=user)


def test_ctl_status_as_a_table_and_as_json(baton, port):
    master = baton(ops_config(port))
    pids = set(master.wait_workers(2))
    get_json(port)
    result = ctl(master, "--json", "status")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["master"]["pid"] == master.pid
    (app,) = status["apps"]
    assert app["name"] == "probe" and app["target"] == 2
    assert {w["pid"] for w in app["workers"]} == pids
    assert all(w["state"] == "ready" and w["rss_kb"] > 0 for w in app["workers"])
    assert status["listeners"][0]["mode"] == "balance"
    table = ctl(master, "status")
    assert table.returncode == 0
    for pid in pids:
        assert str(pid) in table.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_ctl_refuses_a_user_who_is_not_an_admin(baton, port, scratch):
    path = scratch / "baton.ctl"  # where other users can reach it
    master = baton(ops_config(port, master_extra=f'admins = ["www-data"]\ncontrol_socket = "{path}"'))
    master.wait_workers(2)
    wait_for(path.exists, message="the control socket")
    refused = ctl_socket(path, "status", user="nobody")
    allowed = ctl_socket(path, "status", user="www-data")
    assert refused.returncode == 1 and "permission denied" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    master.wait_log("control socket: permission denied to uid")


def ctl_socket(path, *args, user=None):
    command = [sys.executable, "-m", "supervisor", "ctl", "--socket", str(path), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30, user=user)


@pytest.mark.timeout(120)
def test_scale_and_restart_under_load_fail_no_request(baton, port):
    master = baton(ops_config(port))
    first = set(master.wait_workers(2))
    with Clients(port) as clients:
        assert ctl(master, "scale", "probe", "4").returncode == 0
        master.wait_workers(4)
        assert ctl(master, "scale", "probe", "1").returncode == 0
        master.wait_workers(1)
        assert ctl(master, "restart", "probe").returncode == 0
        master.wait_log("app probe: generation 2 serving")
        (new,) = master.wait_workers(1)
        assert new not in first
        wait_for(lambda: any(new in t.pids for t in clients.threads), message="the new generation to answer")
    clients.assert_nothing_lost()
    failed = ctl(master, "scale", "nosuchapp", "2")
    assert failed.returncode == 1 and "no app named 'nosuchapp'" in failed.stderr


def test_healthz_turns_503_while_a_graceful_stop_drains(baton, port, scratch):
    health = free_port()
    master = baton(ops_config(port, workers=1, app_extra="threads = 2",
                              master_extra=f'health = "127.0.0.1:{health}"'))
    master.wait_workers(1)
    assert http_request(health, "/healthz")[0] == 200
    get_json(port)
    metrics = wait_for(lambda: (lambda body: body if b'baton_requests_total{app="probe"}' in body else None)(
        http_request(health, "/metrics")[2]), message="the request count in /metrics")
    assert b"# TYPE baton_handoffs_total counter" in metrics
    mark = scratch / "running"
    slow = threading.Thread(target=lambda: http_request(port, f"/?sleep=3&mark={mark}"))
    slow.start()
    wait_for(mark.exists, message="the slow request to start")
    master.signal(signal.SIGTERM)
    wait_for(lambda: http_request(health, "/healthz")[0] == 503, message="/healthz to say draining")
    slow.join(10)
    assert master.wait_exit() == 0


def test_a_hung_request_is_aborted_at_timeout_with_its_stack_in_the_log(baton, port, scratch):
    master = baton(ops_config(port, workers=1, app_extra="timeout = 1"))
    (hung,) = master.wait_workers(1)
    mark = scratch / "hung"
    threading.Thread(target=lambda: _ignore_errors(http_request, port, f"/?sleep=30&mark={mark}"),
                     daemon=True).start()
    wait_for(mark.exists, message="the hung request to start")
    master.wait_log("timed out", timeout=15)
    (replacement,) = master.wait_workers(1, exclude=(hung,))
    log = master.log()
    assert f"(pid {hung}) timed out" in log
    assert "time.sleep" in log or "in _app" in log  # faulthandler's dump of the stuck frame
    assert get_json(port)["pid"] == replacement


def _ignore_errors(function, *args):
    try:
        function(*args)
    except OSError:
        pass


@pytest.mark.timeout(120)
def test_max_requests_recycles_workers_with_no_failed_request(baton, port):
    master = baton(ops_config(port, app_extra="max_requests = 200\nmax_requests_jitter = 20"))
    first = set(master.wait_workers(2))
    with Clients(port, count=8) as clients:
        master.wait_log("recycling it", count=2, timeout=30)
        wait_for(lambda: not (set(master.workers()) & first), timeout=30, message="both workers recycled")
    clients.assert_nothing_lost()


@pytest.mark.timeout(120)
def test_max_rss_recycles_a_bloated_worker_with_no_failed_request(baton, port):
    master = baton(ops_config(port, workers=1, app_extra="max_rss = 1"))  # 1 MB: always exceeded
    (first,) = master.wait_workers(1)
    with Clients(port, count=4) as clients:
        master.wait_log("resident memory", timeout=30)
        wait_for(lambda: first not in master.workers(), timeout=30, message="the bloated worker to leave")
    clients.assert_nothing_lost()


def _pid_in(path):
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


@pytest.fixture
def successors():
    """New masters started by an upgrade outlive the test's master: kill them at the end."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(120)
def test_an_upgrade_under_keep_alive_load_loses_nothing(baton, port, tmp_path, successors):
    pidfile = tmp_path / "baton.pid"
    master = baton(ops_config(port, master_extra=f'pidfile = "{pidfile}"'))
    old_workers = set(master.wait_workers(2))
    with Clients(port) as clients:
        master.signal(signal.SIGUSR2)
        master.wait_log("took over; draining into it", timeout=30)
        new_master = wait_for(lambda: (lambda pid: pid if pid and pid != master.pid else None)(_pid_in(pidfile)),
                              message="the pidfile to name the new master")
        successors.append(new_master)
        assert master.wait_exit(timeout=30) == 0
        wait_for(lambda: any(t.pids - old_workers for t in clients.threads), message="the new workers to answer")
    clients.assert_nothing_lost()
    assert get_json(port)["pid"] not in old_workers
    result = subprocess.run([sys.executable, "-m", "supervisor", "ctl", "-c", str(master.config), "--json", "status"],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert json.loads(result.stdout)["master"]["pid"] == new_master


def test_a_failing_upgrade_leaves_the_old_master_serving(baton, port, successors):
    master = baton(ops_config(port))
    workers = set(master.wait_workers(2))
    # The new master reads the config afresh: this one names an app that cannot boot.
    master.wait_log("is watching for changes")
    master.config.write_text(master.config.read_text().replace("tests.apps.probe:app", "tests.apps.broken:app"))
    master.wait_log("generation 2 dropped")  # the watcher's reload is refused first
    master.signal(signal.SIGUSR2)
    master.wait_log("upgrade failed", timeout=30)
    wait_for(lambda: set(master.workers()) == workers, message="only the serving generation")
    assert http_request(port)[0] == 200
    assert ctl(master, "status").returncode == 0


@pytest.mark.timeout(120)
def test_a_master_started_by_anyone_takes_over_through_the_takeover_socket(baton, port, tmp_path, successors):
    master = baton(ops_config(port))
    old_workers = set(master.wait_workers(2))
    takeover = tmp_path / "baton.ctl.takeover"
    wait_for(takeover.exists, message="the takeover socket")
    log = open(tmp_path / "new-master.log", "wb")
    new = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(master.config),
                            "--takeover", str(takeover)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    successors.append(new.pid)
    try:
        with Clients(port, count=8) as clients:
            assert master.wait_exit(timeout=30) == 0
            wait_for(lambda: any(t.pids - old_workers for t in clients.threads), message="the new workers")
        clients.assert_nothing_lost()
        assert "took over: this master" in (tmp_path / "new-master.log").read_text()
    finally:
        new.terminate()
        new.wait(30)
        log.close()


def test_usr1_reopens_the_log_files_in_every_process(baton, port, tmp_path):
    access, error = tmp_path / "access.log", tmp_path / "error.log"
    master = baton(ops_config(port, workers=1, master_extra=f'access_log = "{access}"\nerror_log = "{error}"'))
    wait_for(lambda: "ready" in error.read_text() if error.exists() else False, message="the error log")
    http_request(port, "/before")
    wait_for(lambda: "/before" in access.read_text(), message="the first access line")
    access.rename(tmp_path / "access.log.1")  # what logrotate does
    error.rename(tmp_path / "error.log.1")
    master.signal(signal.SIGUSR1)
    wait_for(lambda: error.exists() and "reopened 2 log files" in error.read_text(), message="the reopen")
    http_request(port, "/after")
    wait_for(lambda: access.exists() and "/after" in access.read_text(), message="the worker writing the new file")
    assert "/after" not in (tmp_path / "access.log.1").read_text()
    line = access.read_text().splitlines()[0]
    tag, _, line = line.partition(": ")   # the master says whose line it is
    assert tag.startswith("probe[") and line.startswith("127.0.0.1 - - [") and '"GET /after HTTP/1.1" 200' in line


def test_json_logs(baton, port, tmp_path):
    error = tmp_path / "error.log"
    master = baton(ops_config(port, workers=1, master_extra=f'error_log = "{error}"\nlog_format = "json"'))
    wait_for(lambda: error.exists() and "ready" in error.read_text(), message="a worker ready in the log")
    assert master.workers()
    records = [json.loads(line) for line in error.read_text().splitlines()]
    assert {"time", "level", "pid", "message"} <= set(records[0])
    assert any("ready" in record["message"] for record in records)
