"""Real masters on free ports, and the polling helpers that wait for them.

Nothing here sleeps to synchronise: every wait polls a condition until a deadline.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def wait_for(condition, timeout=10.0, interval=0.02, message="condition"):
    """Poll `condition` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(port, path="/", method="GET", headers=None, body=None, timeout=10.0, host="127.0.0.1"):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def pidfd_count(pid: int) -> int:
    """How many pidfds process `pid` holds: one per process it watches (a master: its
    children; a balancer: its linked workers), so a count that matches says the process
    has caught up with every exit."""
    found = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:
            pass   # closed meanwhile
    return found


def get_json(port, path="/"):
    status, _, body = http_request(port, path)
    assert status == 200, body
    return json.loads(body)


def answers(port, path="/"):
    try:
        return http_request(port, path, timeout=2.0)[0] == 200
    except OSError:
        return False


def probe_config(port: int, app: str = "") -> str:
    """The config many process tests start from: the `probe` app (tests/apps/probe.py)
    on one balance listener, `app` adding lines (unindented) to its table."""
    return f"""
        [master]
        graceful_timeout = 5

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.probe]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        chdir = "{REPO}"
{textwrap.indent(textwrap.dedent(app).strip(), " " * 8)}
    """


@pytest.fixture
def harnesses():
    """Factory: harnesses(**kwargs) -> a balancer in this process on its own loop
    (tests/core/test_balancer_shell.py's Harness), closed at teardown."""
    from test_balancer_shell import Harness
    made = []

    def make(**kwargs):
        harness = Harness(**kwargs)
        made.append(harness)
        return harness
    yield make
    for harness in made:
        harness.close()


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone, even while we read
        return False
    return state != "Z"


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _title_starts(pid: int, *prefixes: str) -> bool:
    try:
        return cmdline(pid).startswith(prefixes)
    except (FileNotFoundError, ProcessLookupError):
        return False


def _is_balancer(pid: int) -> bool:
    return _title_starts(pid, "baton: balancer")


def listening_inode(port):
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return f"socket:[{fields[9]}]"
    raise AssertionError(f"nothing listens on {port}")



class Baton:
    """A real `baton run` master started on a temp config."""

    def __init__(self, tmp_path: Path, toml: str):
        self.dir = tmp_path
        self.config = tmp_path / "baton.toml"
        self.config.write_text(textwrap.dedent(toml))
        self.log_path = tmp_path / "baton.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> "Baton":
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "-c", str(self.config), *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout=10.0, count=1) -> None:
        wait_for(lambda: self.log().count(text) >= count, timeout,
                 message=lambda: f"{text!r} x{count} in log:\n{self.log()}")

    def workers(self) -> list[int]:
        """The master's worker processes (its children, less the balancer, the watcher
        and preloaded apps' templates)."""
        return [pid for pid in children_of(self.pid)
                if not _title_starts(pid, "baton: balancer", "baton: watcher", "baton: master", "baton: template")]

    def balancer(self) -> int:
        return wait_for(lambda: next((pid for pid in children_of(self.pid) if _is_balancer(pid)), None),
                        message=lambda: f"the balancer; log:\n{self.log()}")

    def wait_workers(self, count: int, timeout=10.0, exclude=()) -> list[int]:
        """Wait until exactly `count` workers are READY (as logged) and alive."""
        def ready():
            pids = [p for p in self.workers() if p not in exclude and alive(p)]
            logged = [p for p in pids if f"(pid {p}) ready" in self.log()]
            return logged if len(logged) == count and len(pids) == count else None
        return wait_for(ready, timeout, message=lambda: f"{count} ready workers; log:\n{self.log()}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout=15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"master did not exit; log:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc:
            self._log.close()


@pytest.fixture
def baton(tmp_path):
    """Factory: baton(toml) -> started master; every master is killed at teardown."""
    started: list[Baton] = []

    def start(toml: str, *args: str) -> Baton:
        instance = Baton(tmp_path, toml).start(*args)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.close()


@pytest.fixture
def scratch():
    """A directory that workers running as other users (nobody, www-data) can write to."""
    path = Path(tempfile.mkdtemp(prefix="baton-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def port():
    return free_port()


@pytest.fixture
def attach_dir():
    """A directory other users may traverse, for attach sockets (pytest's tmp_path is
    root's, 0700, and a worker running as nobody must reach the socket)."""
    path = Path(tempfile.mkdtemp(prefix="baton-attach-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
