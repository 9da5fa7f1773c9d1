"""Socket activation: reading LISTEN_*, adopting the sockets, and a real master on them."""
from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys

import pytest
from conftest import REPO, Baton, get_json, listening_inode, wait_for

from supervisor.config.model import ListenerConfig
from supervisor.config.reader import BindAddress
from supervisor.system import activation, listeners
from supervisor.system.activation import ActivationError, parse_listen_env
from supervisor.system.listeners import ListenerError

PID = 4242


def env(**values) -> dict[str, str]:
    return {f"LISTEN_{key}": value for key, value in values.items()}


# -- reading the environment ---------------------------------------------------------

@pytest.mark.parametrize("environ, expected", [
    ({}, []),
    (env(FDS="2", FDNAMES="web:api"), []),                              # no LISTEN_PID: not for us
    (env(PID="4243", FDS="2", FDNAMES="web:api"), []),                  # another process's
    (env(PID="4243", FDS="nonsense"), []),                              # ... so not ours to judge
    (env(PID=str(PID)), []),                                            # no LISTEN_FDS
    (env(PID=str(PID), FDS="0"), []),
    (env(PID=str(PID), FDS="0", FDNAMES=""), []),
    (env(PID=str(PID), FDS="1"), [(3, "unknown")]),                     # no names: systemd says "unknown"
    (env(PID=str(PID), FDS="2"), [(3, "unknown"), (4, "unknown")]),
    (env(PID=str(PID), FDS="1", FDNAMES="web"), [(3, "web")]),
    (env(PID=str(PID), FDS="2", FDNAMES="web:api"), [(3, "web"), (4, "api")]),
    (env(PID=str(PID), FDS="3", FDNAMES="web::api"), [(3, "web"), (4, "unknown"), (5, "api")]),
    (env(PID=str(PID), FDS="1", FDNAMES=""), [(3, "unknown")]),
    (env(PID=str(PID), FDS="2", FDNAMES="web:web"), [(3, "web"), (4, "web")]),  # one unit, two Listen* lines
    (env(PID=str(PID), FDS="1", FDNAMES="baton.socket"), [(3, "baton.socket")]),  # the default name
])
def test_parse_listen_env(environ, expected):
    assert parse_listen_env(environ, PID) == expected


@pytest.mark.parametrize("environ, problem", [
    (env(PID=""), "expected LISTEN_PID to be a number from 1 to 4194304, found ''"),
    (env(PID="abc"), "found 'abc'"),
    (env(PID="-1"), "found '-1'"),
    (env(PID="+4242"), "found '+4242'"),
    (env(PID=" 4242"), "found ' 4242'"),
    (env(PID="0"), "found '0'"),
    (env(PID="9" * 5000), "expected LISTEN_PID to be a number"),
    (env(PID=str(PID), FDS=""), "expected LISTEN_FDS to be a number from 0 to 65536, found ''"),
    (env(PID=str(PID), FDS="1.0"), "found '1.0'"),
    (env(PID=str(PID), FDS="-1"), "found '-1'"),
    (env(PID=str(PID), FDS="1_0"), "found '1_0'"),
    (env(PID=str(PID), FDS="\u0663"), "found '\u0663'"),           # a digit, but not an ASCII one
    (env(PID=str(PID), FDS="99999999"), "found '99999999'"),
    (env(PID=str(PID), FDS="2", FDNAMES="web"), "LISTEN_FDNAMES='web' names 1 sockets, but LISTEN_FDS=2 were passed"),
    (env(PID=str(PID), FDS="1", FDNAMES="web:api"), "names 2 sockets, but LISTEN_FDS=1"),
    (env(PID=str(PID), FDS="0", FDNAMES="web"), "names 1 sockets, but LISTEN_FDS=0"),
    (env(PID=str(PID), FDS="2", FDNAMES=""), "names 1 sockets, but LISTEN_FDS=2"),
])
def test_parse_listen_env_refuses(environ, problem):
    with pytest.raises(ActivationError) as info:
        parse_listen_env(environ, PID)
    assert problem in str(info.value)
    assert isinstance(info.value, ListenerError)  # the CLI reports it as it reports a bind failure


def test_by_name_keeps_the_first_of_a_name():
    assert activation.by_name([(3, "web"), (4, "api"), (5, "web")]) == {"web": 3, "api": 4}


def test_inherited_is_empty_for_another_process():
    assert activation.inherited({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == {}
    assert activation.inherited({}, pid=os.getpid()) == {}


# -- adopting a socket ---------------------------------------------------------------

WEB = ListenerConfig("web", BindAddress("systemd", fdname="web"))


@pytest.fixture
def passed():
    """A listening TCP socket, as systemd would have bound it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_open_listener_adopts_a_dup_of_the_passed_socket(passed):
    sock = listeners.open_listener(WEB, inherited={"api": 99, "web": passed.fileno()})
    with sock:
        assert sock.fileno() != passed.fileno()
        assert os.fstat(sock.fileno()).st_ino == os.fstat(passed.fileno()).st_ino
        assert sock.getsockname() == passed.getsockname()
        assert not sock.getblocking()
        assert not os.get_inheritable(sock.fileno())
    # Ours closed, systemd's copy still listens: a later connection waits in its queue.
    with socket.create_connection(passed.getsockname(), timeout=5):
        pass


def test_open_all_passes_the_mapping_on(passed, tmp_path):
    configs = {"web": WEB, "local": ListenerConfig("local", BindAddress("unix", path=str(tmp_path / "l.sock")))}
    opened = listeners.open_all(configs, inherited={"web": passed.fileno()})
    try:
        assert listeners.describe(opened["web"]) == "http://127.0.0.1:%d" % passed.getsockname()[1]
    finally:
        listeners.close_all(opened, configs)


def test_closing_an_adopted_unix_socket_leaves_systemds_file(tmp_path):
    path = tmp_path / "web.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen()
        opened = listeners.open_all({"web": WEB}, inherited={"web": sock.fileno()})
        assert listeners.describe(opened["web"]) == f"unix:{path}"
        listeners.close_all(opened, {"web": WEB})
        assert path.exists()


@pytest.mark.parametrize("inherited, problem", [
    ({"api": 3, "admin": 4},
     "listener 'web': no socket named 'web' was passed by systemd (LISTEN_FDNAMES=api:admin)"),
    ({}, "listener 'web': no socket named 'web' was passed by systemd (none were passed: was baton started "
         "through its .socket unit?)"),
    (None, "(none were passed"),
])
def test_a_name_systemd_did_not_pass(inherited, problem):
    with pytest.raises(ListenerError) as info:
        listeners.open_listener(WEB, inherited=inherited)
    assert problem in str(info.value)


def test_open_all_closes_what_it_opened_when_a_name_is_missing(passed):
    configs = {"first": ListenerConfig("first", BindAddress("tcp", host="127.0.0.1", port=0)), "web": WEB}
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ListenerError, match="no socket named 'web'"):
        listeners.open_all(configs, inherited={"api": passed.fileno()})
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("make", [
    lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),    # ListenDatagram=
    lambda: socket.socket(),                                      # never listen()ed
    lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
])
def test_only_a_listening_stream_socket_is_adopted(make):
    with make() as sock:
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ListenerError) as info:
            listeners.open_listener(WEB, inherited={"web": sock.fileno()})
        assert str(info.value) == (f"listener 'web' (systemd:web): fd {sock.fileno()} is not a listening stream "
                                   "socket (use ListenStream= and Accept=no)")
        assert set(os.listdir("/proc/self/fd")) == before


def test_a_passed_fd_that_is_not_a_socket(tmp_path):
    with open(tmp_path / "file", "w") as file:
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ListenerError, match=r"^listener 'web' \(systemd:web\): Socket operation on non-socket"):
            listeners.open_listener(WEB, inherited={"web": file.fileno()})
        assert set(os.listdir("/proc/self/fd")) == before


# -- in a process systemd started ------------------------------------------------------

# Stands in for systemd between fork and exec: the socket to fd 3, LISTEN_PID to the
# pid that exec keeps (or another one), then exec the command.
SHIM = """
import os, sys
fd, listen_pid, *command = sys.argv[1:]
if int(fd) != 3:
    os.dup2(int(fd), 3)
    os.close(int(fd))
os.environ["LISTEN_PID"] = str(os.getpid()) if listen_pid == "self" else listen_pid
os.execv(sys.executable, [sys.executable, *command])
"""


def activated(sock: socket.socket, command: list[str], *, names: str | None = "web", listen_pid: str = "self",
              count: int = 1, **popen) -> subprocess.Popen:
    environ = dict(os.environ, PYTHONUNBUFFERED="1", LISTEN_FDS=str(count))
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    return subprocess.Popen([sys.executable, "-c", SHIM, str(sock.fileno()), listen_pid, *command],
                            pass_fds=[sock.fileno()], env=environ, cwd=REPO, **popen)


INSPECT = """
import fcntl, json, os
from supervisor.system import activation
found = activation.inherited()
print(json.dumps({"found": found, "pid": os.getpid(), "listen_pid": os.environ["LISTEN_PID"],
                  "cloexec": {name: bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                              for name, fd in found.items()}}))
"""


def test_inherited_in_an_activated_process_marks_the_fds_close_on_exec(passed):
    proc = activated(passed, ["-c", INSPECT], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    result = json.loads(out)
    assert result["found"] == {"web": 3} and result["cloexec"] == {"web": True}
    assert result["listen_pid"] == str(result["pid"])


def test_inherited_refuses_an_fd_that_was_not_passed(passed):
    script = "from supervisor.system import activation\nactivation.inherited()"
    proc = activated(passed, ["-c", script], names="web:api", count=2, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert b"ActivationError: LISTEN_FDS=2: fd 4 ('api') was to be passed by systemd, but Bad file descriptor" in err


CONFIG = f"""
    [master]
    graceful_timeout = 5
    boot_timeout = 10

    [listeners.web]
    bind = "systemd:web"

    [apps.probe]
    module = "tests.apps.probe:app"
    listeners = ["web"]
    workers = 2
    chdir = "{REPO}"
"""


@pytest.fixture
def activated_baton(tmp_path):
    """Factory: a real `baton run` started as systemd starts it, with `sock` as fd 3."""
    started: list[Baton] = []

    def start(sock: socket.socket, toml: str = CONFIG, **options) -> Baton:
        master = Baton(tmp_path, toml)
        master._log = open(master.log_path, "wb")  # what Baton.close() closes
        master.proc = activated(sock, ["-m", "supervisor", "run", "-c", str(master.config)],
                                stdout=master._log, stderr=subprocess.STDOUT, **options)
        started.append(master)
        return master

    yield start
    for master in started:
        master.close()


def test_a_master_serves_on_the_socket_systemd_passed(activated_baton, passed):
    # Wired in master.py: Master.run reads activation.inherited(), scrubs the
    # environment, and opens listeners with open_all(..., inherited=...).
    port = passed.getsockname()[1]
    master = activated_baton(passed)
    master.wait_workers(2)
    assert get_json(port, "/via-systemd")["path"] == "/via-systemd"
    assert listening_inode(port) == f"socket:[{os.fstat(passed.fileno()).st_ino}]"  # nothing else bound
    assert "(web)" in master.log()
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log()
    # The master closed its copies; the socket systemd holds still listens.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


@pytest.mark.parametrize("names, listen_pid, problem", [
    ("api", "self", "baton: listener 'web': no socket named 'web' was passed by systemd (LISTEN_FDNAMES=api)"),
    (None, "self", "(LISTEN_FDNAMES=unknown)"),
    ("web", "1", "(none were passed: was baton started through its .socket unit?)"),  # LISTEN_PID is not the master's
])
def test_a_master_without_the_named_socket_exits_1_saying_so(activated_baton, passed, names, listen_pid,
                                                              problem):
    master = activated_baton(passed, names=names, listen_pid=listen_pid)
    assert master.wait_exit() == 1
    wait_for(lambda: problem in master.log(), message=lambda: f"{problem!r} in log:\n{master.log()}")


def test_tcp_listeners_defer_accept_and_pass_nodelay_to_their_connections(passed, tmp_path):
    """Set on the listener, TCP_NODELAY is on every accepted socket with no setsockopt;
    TCP_DEFER_ACCEPT holds a connection back until its first bytes arrive."""
    configs = {"web": dataclasses.replace(WEB, mode="share"),
               "tcp": ListenerConfig("tcp", BindAddress("tcp", host="127.0.0.1", port=0), mode="share"),
               "balanced": ListenerConfig("balanced", BindAddress("tcp", host="127.0.0.1", port=0)),
               "local": ListenerConfig("local", BindAddress("unix", path=str(tmp_path / "l.sock")))}
    opened = listeners.open_all(configs, inherited={"web": passed.fileno()})
    try:
        for name in ("web", "tcp"):
            sock = opened[name]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
            with socket.create_connection(sock.getsockname(), timeout=5) as client:
                client.sendall(b"GET / HTTP/1.1\r\n")
                wait_for(lambda s=sock: select.select([s], [], [], 0)[0], message="a connection to accept")
                accepted, _ = sock.accept()
                with accepted:
                    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # The balancer passes connections on unread: there it would only cost.
        assert not opened["balanced"].getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
        assert opened["balanced"].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listeners.close_all(opened, configs)
