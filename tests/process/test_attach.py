"""Attach sockets (`attach = "unix:PATH"`): workers started elsewhere, as other users and
in their own namespaces, serve an app's clients through its master. Real masters and
real attached worker processes: who may attach (the socket file's permissions, then
SO_PEERCRED against `attach_allow`), what a refused peer and the master's log say, and
what `baton ctl status` lists."""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, children_of, get_json, probe_config, wait_for
from test_operations import ctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run workers as other users")

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
WWW_DATA = ["setpriv", "--reuid=www-data", "--regid=www-data", "--clear-groups"]
# A network, mount and PID namespace of its own: it shares nothing with the master but
# the attach socket's file.
NAMESPACES = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc"]


def attach_config(port: int, path: Path, app: str = "", workers: int = 0) -> str:
    """The probe app with attached workers (nobody's) and `workers` of its own (0: only
    attached ones serve)."""
    return probe_config(port, f"""
        workers = {workers}
        attach = "unix:{path}"
        attach_group = "nogroup"
        attach_allow = ["nobody"]
        {app}
    """)


class Worker:
    """One `baton worker --attach` process, started through `prefix` (setpriv, unshare)."""

    def __init__(self, prefix: list[str], path: Path, tag: str):
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "supervisor", "worker", "--attach", str(path), "--tag", tag,
             "tests.apps.probe:app"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def host_pid(self) -> int:
        """Its pid as the master sees it: unshare --fork's child, else the process itself."""
        if self.proc.args[0] != "unshare":
            return self.proc.pid
        return wait_for(lambda: next(iter(children_of(self.proc.pid)), None), message="unshare's child")

    def finish(self, timeout=15.0) -> tuple[int, str]:
        """Wait for its exit (it is not killed): its status and its stderr."""
        _, stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            # unshare's child is PID 1 of its namespace: its end takes the namespace down.
            for pid in children_of(self.proc.pid) if self.proc.args[0] == "unshare" else ():
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def workers():
    """Factory: workers(prefix, path, tag) -> a started Worker; each is killed at teardown."""
    started: list[Worker] = []

    def start(prefix: list[str], path: Path, tag: str = "v1") -> Worker:
        started.append(Worker(prefix, path, tag))
        return started[-1]
    yield start
    for worker in started:
        worker.stop()


def status(master) -> dict:
    result = ctl(master, "--json", "status")
    assert result.returncode == 0, result.stderr
    (app,) = json.loads(result.stdout)["apps"]
    return app


def _namespace(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_a_worker_in_its_own_namespaces_serves_the_masters_port(baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    master = baton(attach_config(port, path))
    master.wait_log(f"app probe: workers may attach at {path}")
    worker = workers([*NAMESPACES, *NOBODY], path)
    pid = worker.host_pid()
    master.wait_log(f"worker attached probe tag v1 (pid {pid}, uid 65534) ready, serving")

    for kind in ("net", "pid", "mnt"):
        assert _namespace(pid, kind) != _namespace(master.pid, kind), kind
    answers = [get_json(port) for _ in range(8)]
    assert {answer["uid"] for answer in answers} == {65534}
    # The pid it reports is its own in its PID namespace (1: it is that namespace's
    # first process), not the master's view of it, nor any child of the master's.
    assert {answer["pid"] for answer in answers} == {1}
    assert not {answer["pid"] for answer in answers} & {pid, *children_of(master.pid)}

    app = status(master)
    (entry,) = app["attached"]
    assert (entry["pid"], entry["uid"], entry["gid"], entry["tag"], entry["state"]) == (
        pid, 65534, 65534, "v1", "serving")
    assert app["live_tag"] == "v1" and app["workers"] == []
    # Its figures come with its heartbeats.
    wait_for(lambda: status(master)["attached"][0]["requests"] == 8, message="its 8 requests in ctl status")
    table = ctl(master, "status")
    assert table.returncode == 0, table.stderr
    assert re.search(rf"^probe +{pid} +65534 +v1 +serving ", table.stdout, re.M), table.stdout


def test_a_uid_not_allowed_is_refused_and_served_nothing(baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    # One worker of its own, so requests have somewhere to go but the refused peer.
    master = baton(attach_config(port, path, workers=1))
    (own,) = master.wait_workers(1)
    path.chmod(0o666)   # the file lets www-data in: attach_allow must keep it out
    worker = workers(WWW_DATA, path)
    code, stderr = worker.finish()
    why = "uid 33 (gid 33) is not in attach_allow ['nobody']"
    assert code == 2, stderr
    assert stderr.startswith("baton worker: ") and why in stderr, stderr
    master.wait_log(f"app probe: refused a worker on the attach socket (pid {worker.proc.pid}, uid 33, "
                    f"gid 33): {why}")
    assert "attached; booting" not in master.log()
    assert {get_json(port)["pid"] for _ in range(4)} == {own}
    assert status(master)["attached"] == []


def test_a_peer_the_socket_file_keeps_out_gets_permission_denied(baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    master = baton(attach_config(port, path, workers=1))
    master.wait_log(f"app probe: workers may attach at {path} (mode 0660, group nogroup; allowed: nobody)")
    code, stderr = workers(WWW_DATA, path).finish()   # neither root nor of group nogroup
    assert code == 2, stderr
    assert stderr.strip() == f"baton worker: cannot connect to the attach socket {path}: Permission denied"
    assert "on the attach socket (" not in master.log()


def test_ids_only_the_workers_side_knows_may_own_and_use_the_socket(baton, port, attach_dir, workers):
    # As with a container whose image has users the master's does not: numbers suffice.
    known = {entry.pw_uid for entry in pwd.getpwall()} | {entry.gr_gid for entry in grp.getgrall()}
    unknown = next(number for number in range(4000, 60000) if number not in known)
    path = attach_dir / "probe.sock"
    master = baton(probe_config(port, f"""
        workers = 0
        attach = "unix:{path}"
        attach_group = "{unknown}"
        attach_allow = [{unknown}]
    """))
    master.wait_log(f"app probe: workers may attach at {path} (mode 0660, group {unknown}; allowed: {unknown})")
    assert path.stat().st_gid == unknown
    worker = workers(["setpriv", f"--reuid={unknown}", f"--regid={unknown}", "--clear-groups"], path)
    master.wait_log(f"worker attached probe tag v1 (pid {worker.proc.pid}, uid {unknown}) ready, serving")
    assert get_json(port)["uid"] == unknown


@pytest.mark.parametrize("mode, warning", [
    (0o777, "is in a world-writable directory: anyone may replace it"),
    (0o1777, "is in a world-writable directory (sticky): anyone may squat the name"),
])
def test_an_attach_socket_in_a_world_writable_directory_is_warned_of(baton, port, attach_dir, mode, warning):
    shared = attach_dir / "shared"
    shared.mkdir()
    shared.chmod(mode)   # not mkdir's mode: the umask would take the world's write bit away
    path = shared / "probe.sock"
    master = baton(attach_config(port, path, workers=1))
    master.wait_workers(1)
    master.wait_log(f"app probe: workers may attach at {path}")
    assert f"app probe: attach socket {path} {warning}" in master.log()


def test_an_attach_socket_in_a_directory_of_its_own_draws_no_warning(baton, port, attach_dir):
    path = attach_dir / "probe.sock"
    master = baton(attach_config(port, path, workers=1))
    master.wait_workers(1)
    master.wait_log(f"app probe: workers may attach at {path}")
    assert "world-writable" not in master.log()


def test_a_reload_applies_attach_settings_without_a_restart_and_dropping_attach_drops_them(
        baton, port, attach_dir, workers):
    path = attach_dir / "probe.sock"
    master = baton(attach_config(port, path, workers=1))
    (own,) = master.wait_workers(1)
    attached = workers(NOBODY, path)
    pid = attached.host_pid()
    master.wait_log(f"worker attached probe tag v1 (pid {pid}, uid 65534) ready, serving")
    # A new policy and mode: applied by the master, no app restarts, the worker stays.
    master.config.write_text(textwrap.dedent(attach_config(port, path, "attach_promote = 2\nattach_mode = \"0600\"",
                                                            workers=1)))
    master.wait_log(f"app probe: workers may attach at {path} (mode 0600", timeout=15)
    assert "generation 2" not in master.log() and master.workers() == [own]
    assert [(w["pid"], w["state"]) for w in status(master)["attached"]] == [(pid, "serving")]
    assert "left:" not in master.log()
    # No attach any more: the attached worker is dropped (it hears its channel end and exits).
    master.config.write_text(textwrap.dedent(probe_config(port, "workers = 1")))
    master.wait_log(f"worker attached probe tag v1 (pid {pid}, uid 65534): its app takes no attached workers now; "
                    "dropping it", timeout=15)
    code, _ = attached.finish()
    assert code == 0
    assert not path.exists()
    assert {get_json(port)["pid"] for _ in range(4)} == {own}
    assert status(master)["attached"] == []
