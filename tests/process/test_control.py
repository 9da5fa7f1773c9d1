"""The control socket: request parsing, a real ControlServer on a real event loop that
the test runs (no threads: clients that must be another process or another user are
forked children), SO_PEERCRED checks with real users, deadlines on a fake clock, and
`baton ctl`'s exit statuses and tables."""
from __future__ import annotations

import contextlib
import grp
import io
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import tempfile
import time

import pytest

from supervisor import cli
from supervisor.master.control import (
    COMMANDS,
    MAX_CLIENTS,
    MAX_CLIENTS_PER_USER,
    MAX_REQUEST_BYTES,
    REFUSAL_LOG_INTERVAL_S,
    REQUIRED,
    RESERVED_CLIENTS,
    ControlClient,
    ControlError,
    ControlServer,
    ControlUnreachable,
    admission,
    check_arguments,
    decode_request,
    parse_request,
    peer_allowed,
)
from supervisor.system import users
from supervisor.system.loop import READ, Loop

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a client running as another user needs root")

WAIT_S = 10.0   # upper bound on any wait below; each wait ends on an event, not on time
LOG = "test.control"

STATUS = {
    "ok": True,
    "master": {"pid": 1, "config": "/etc/baton.toml", "uptime_s": 12.5, "reloads": 0, "generation_switches": 0},
    "apps": [{"name": "hello", "generation": 2, "target": 2, "user": "www-data",
              "workers": [{"pid": 10, "index": 1, "generation": 2, "state": "ready", "requests": 120,
                           "connections": 3, "busy": 0, "rss_kb": 20480, "uptime_s": 10.1},
                          {"pid": 11, "index": 2, "generation": 2, "state": "booting", "requests": 0,
                           "connections": 0, "busy": 0, "rss_kb": 512, "uptime_s": 0.2}]}],
    "listeners": [{"name": "web", "address": "127.0.0.1:8000", "mode": "balance", "queue": 0},
                  {"name": "local", "address": "unix:/run/web.sock", "mode": "share", "queue": 17}],
}


# -- parse_request -----------------------------------------------------------------

GOOD = [
    ({"command": "status"}, ("status", {})),
    ({"command": "stats"}, ("stats", {})),
    ({"command": "reload"}, ("reload", {})),
    ({"command": "upgrade"}, ("upgrade", {})),
    ({"command": "restart", "app": "blog"}, ("restart", {"app": "blog"})),
    ({"command": "scale", "app": "blog", "workers": 4}, ("scale", {"app": "blog", "workers": 4})),
    ({"command": "scale", "app": "blog", "workers": 1024}, ("scale", {"app": "blog", "workers": 1024})),
    ({"command": "stop"}, ("stop", {"now": False})),
    ({"command": "stop", "now": True}, ("stop", {"now": True})),
]


@pytest.mark.parametrize("request_, expected", GOOD, ids=[json.dumps(g[0]) for g in GOOD])
def test_parse_request_accepts(request_, expected):
    assert parse_request(request_) == expected
    assert decode_request(json.dumps(request_).encode()) == expected


BAD = [
    # (request, fragments of the one error)
    ([], ["expected a JSON object, found an array"]),
    ("status", ["expected a JSON object, found string 'status'"]),
    ({}, ["expected a 'command'", "found nothing"]),
    ({"command": "explode"}, ["expected 'command' to be one of 'status'", "found string 'explode'"]),
    ({"command": 3}, ["found number 3"]),
    ({"command": "restart"}, ["restart: expected 'app', found nothing (it is required)"]),
    ({"command": "restart", "app": ""}, ["restart: 'app': expected an app name, found an empty string"]),
    ({"command": "restart", "app": 7}, ["restart: 'app': expected an app name, found number 7"]),
    ({"command": "scale", "app": "blog"}, ["scale: expected 'workers'"]),
    ({"command": "scale", "app": "blog", "workers": 0}, ["scale: 'workers': expected an integer from 1 to 1024, found number 0"]),
    ({"command": "scale", "app": "blog", "workers": "4"}, ["expected an integer from 1 to 1024, found string '4'"]),
    ({"command": "scale", "app": "blog", "workers": True}, ["expected an integer from 1 to 1024, found true"]),
    ({"command": "scale", "app": "blog", "workers": 2.0}, ["expected an integer from 1 to 1024, found number 2.0"]),
    ({"command": "scale", "app": "blog", "workers": 1025}, ["expected an integer from 1 to 1024, found number 1025"]),
    ({"command": "stop", "now": "yes"}, ["stop: 'now': expected true or false, found string 'yes'"]),
    ({"command": "stop", "now": None}, ["expected true or false, found null"]),
    ({"command": "status", "verbose": True}, ["status: unknown argument 'verbose' (it takes no arguments)"]),
    ({"command": "restart", "app": "x", "workers": 2}, ["restart: unknown argument 'workers' (it takes 'app')"]),
]


@pytest.mark.parametrize("request_, fragments", BAD, ids=[json.dumps(b[0]) for b in BAD])
def test_parse_request_refuses(request_, fragments):
    with pytest.raises(ControlError) as info:
        parse_request(request_)
    assert len(info.value.errors) == 1, info.value.errors
    assert all(fragment in info.value.errors[0] for fragment in fragments), info.value.errors


def test_parse_request_lists_every_problem():
    with pytest.raises(ControlError) as info:
        parse_request({"command": "scale", "app": 1, "workers": -1, "extra": 0})
    assert len(info.value.errors) == 3


# -- check_arguments: one command's arguments against its spec -------------------------

def _delta(value):
    if value in (-1, 1) and not isinstance(value, bool):
        return value
    raise ValueError("1 or -1")


def _quiet(value):
    if isinstance(value, bool):
        return value
    raise ValueError("true or false")


# A command the control socket does not offer, as the master's signals add them.
NUDGE = {"delta": (_delta, REQUIRED), "quiet": (_quiet, False)}

CHECKED = [
    # (command, spec, args, the arguments returned)
    ("nudge", NUDGE, {"delta": 1}, {"delta": 1, "quiet": False}),
    ("nudge", NUDGE, {"delta": -1, "quiet": True}, {"delta": -1, "quiet": True}),
    ("stop", COMMANDS["stop"], {}, {"now": False}),
    ("status", COMMANDS["status"], {}, {}),
    ("scale", COMMANDS["scale"], {"app": "blog", "workers": 2}, {"app": "blog", "workers": 2}),
]


@pytest.mark.parametrize("command, spec, args, expected", CHECKED, ids=[f"{c[0]}-{json.dumps(c[2])}" for c in CHECKED])
def test_check_arguments_fills_in_defaults(command, spec, args, expected):
    given = dict(args)
    assert check_arguments(command, spec, args) == expected
    assert args == given   # the caller's dict is left alone


REFUSED = [
    # (command, spec, args, every error, in order)
    ("nudge", NUDGE, {}, ["nudge: expected 'delta', found nothing (it is required)"]),
    ("nudge", NUDGE, {"delta": "1"}, ["nudge: 'delta': expected 1 or -1, found string '1'"]),
    ("nudge", NUDGE, {"delta": True}, ["nudge: 'delta': expected 1 or -1, found true"]),
    ("nudge", NUDGE, {"delta": 1, "loud": True}, ["nudge: unknown argument 'loud' (it takes 'delta', 'quiet')"]),
    ("status", COMMANDS["status"], {"x": 1}, ["status: unknown argument 'x' (it takes no arguments)"]),
    ("nudge", NUDGE, {"quiet": "no", "loud": 1}, ["nudge: expected 'delta', found nothing (it is required)",
                                                 "nudge: 'quiet': expected true or false, found string 'no'",
                                                 "nudge: unknown argument 'loud' (it takes 'delta', 'quiet')"]),
]


@pytest.mark.parametrize("command, spec, args, errors", REFUSED, ids=[f"{r[0]}-{json.dumps(r[2])}" for r in REFUSED])
def test_check_arguments_lists_every_problem(command, spec, args, errors):
    with pytest.raises(ControlError) as info:
        check_arguments(command, spec, args)
    assert info.value.errors == errors


@pytest.mark.parametrize("request_, expected", GOOD, ids=[json.dumps(g[0]) for g in GOOD])
def test_parse_request_is_check_arguments_on_the_rest(request_, expected):
    command, args = expected
    rest = {name: value for name, value in request_.items() if name != "command"}
    assert check_arguments(command, COMMANDS[command], rest) == args


@pytest.mark.parametrize("line, fragment", [
    (b"", "expected one JSON object on one line"),
    (b"{", "expected one JSON object on one line"),
    (b'{"command": "status"} {}', "expected one JSON object on one line"),
    (b"\xff", "expected UTF-8 text"),
])
def test_decode_request_refuses(line, fragment):
    with pytest.raises(ControlError, match=fragment):
        decode_request(line)


# -- who may ask (pure) ------------------------------------------------------------------

def test_peer_allowed_root_and_the_master_user():
    nobody = pwd.getpwnam("nobody")
    assert peer_allowed(0, 0, (), master_uid=1234)
    assert peer_allowed(1234, 1234, (), master_uid=1234)
    assert not peer_allowed(nobody.pw_uid, nobody.pw_gid, (), master_uid=0)


def test_peer_allowed_users_and_groups():
    www = pwd.getpwnam("www-data")
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(www.pw_gid).gr_name
    assert peer_allowed(www.pw_uid, www.pw_gid, ("www-data",), master_uid=0)
    assert peer_allowed(www.pw_uid, www.pw_gid, (str(www.pw_uid),), master_uid=0)
    assert peer_allowed(www.pw_uid, www.pw_gid, (f"@{group}",), master_uid=0)
    assert not peer_allowed(nobody.pw_uid, nobody.pw_gid, ("www-data", f"@{group}"), master_uid=0)
    # The gid the kernel reports counts, even when the user database disagrees.
    assert peer_allowed(nobody.pw_uid, www.pw_gid, (f"@{group}",), master_uid=0)
    # Names that no longer resolve are skipped, not fatal.
    assert not peer_allowed(nobody.pw_uid, nobody.pw_gid, ("no-such-user-x", "@no-such-group-x"), master_uid=0)
    # A uid the passwd database does not know is judged by its gid alone.
    assert not peer_allowed(54321, 54321, (f"@{group}",), master_uid=0)


def test_peer_allowed_by_supplementary_group():
    member = _supplementary_member()
    if member is None:
        pytest.skip("no user on this system is a supplementary member of a group")
    user, group = member
    entry = pwd.getpwnam(user)
    assert peer_allowed(entry.pw_uid, entry.pw_gid, (f"@{group}",), master_uid=0)


def _supplementary_member() -> tuple[str, str] | None:
    for group in grp.getgrall():
        for user in group.gr_mem:
            try:
                if pwd.getpwnam(user).pw_gid != group.gr_gid:
                    return user, group.gr_name
            except KeyError:
                continue
    return None


# -- a real server -----------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Master:
    """Stands in for Master.command: records calls, answers from a table."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.answers: dict[str, dict] = {"status": STATUS}

    def command(self, name: str, args: dict) -> dict:
        self.calls.append((name, args))
        answer = self.answers.get(name, {"ok": True, "echo": [name, args]})
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def control_dir():
    """A directory every user can traverse (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="baton-ctl-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_loop():
    """make_loop(clock) -> a Loop, closed at teardown (after the servers on it)."""
    loops: list[Loop] = []

    def make(clock=time.monotonic) -> Loop:
        loop = Loop(clock)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


@pytest.fixture
def make_server(control_dir, make_loop):
    """make_server(...) -> a ControlServer on a loop of its own (`server.loop`), on the
    real clock unless given one; closed at teardown."""
    servers: list[ControlServer] = []

    def make(admins=(), master=None, clock=time.monotonic, name="baton.ctl", timeout_s=5.0) -> ControlServer:
        server = ControlServer(os.path.join(control_dir, name), admins=tuple(admins),
                               handle=(master or Master()).command, log=logging.getLogger(LOG),
                               loop=make_loop(clock), timeout_s=timeout_s)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def drive(loop: Loop, done, timeout_s=WAIT_S) -> None:
    """Run the loop as the master would, until `done()`; the wait is bounded by real
    time, so a test that waits for what never comes fails instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while not done():
        remaining = deadline - time.monotonic()
        assert remaining > 0, "timed out driving the control server"
        loop.run_once(max_wait_s=remaining)


def in_child(server: ControlServer, work, *, user: str | None = None):
    """Fork; the child becomes `user` (if given), runs `work()` and sends back its JSON
    result (or the exception it raised) while this process runs the server's loop."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            if user is not None:
                entry = pwd.getpwnam(user)
                os.setgroups([])
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)
            try:
                result = {"result": work()}
            except Exception as exc:
                result = {"raised": type(exc).__name__, "message": str(exc)}
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(json.dumps(result).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    output = bytearray()
    finished = []

    def on_pipe():
        chunk = os.read(read_end, 1 << 16)
        output.extend(chunk)
        if not chunk:
            finished.append(True)

    server.loop.register(read_end, on_pipe)
    try:
        drive(server.loop, lambda: finished)
    finally:
        server.loop.unregister(read_end)
        os.close(read_end)
        if not finished:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(output)


def call(path, command, **args):
    """A child's work: one ControlClient call."""
    return lambda: ControlClient(path, timeout_s=WAIT_S).call(command, **args)


def test_socket_is_created_0600_and_removed_on_close(make_server):
    server = make_server()
    info = os.lstat(server.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    server.close()
    assert not os.path.exists(server.path)


def test_socket_with_admins_is_0666_so_they_can_connect(make_server):
    server = make_server(admins=("www-data",))
    assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o666


def test_umask_is_restored(make_server):
    old = os.umask(0o022)
    try:
        make_server()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)


def test_a_stale_socket_file_is_replaced(make_server, control_dir):
    path = os.path.join(control_dir, "baton.ctl")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)   # bound, never listening: what a killed master leaves
    server = make_server()
    assert in_child(server, call(path, "reload")) == {"result": {"ok": True, "echo": ["reload", {}]}}


def test_a_live_socket_is_not_stolen(make_server):
    first = make_server()
    with pytest.raises(ControlError, match="another master answers"):
        make_server()
    assert stat.S_ISSOCK(os.lstat(first.path).st_mode)


def test_a_file_that_is_not_a_socket_is_never_removed(make_server, control_dir):
    path = os.path.join(control_dir, "baton.ctl")
    with open(path, "w") as file:
        file.write("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        make_server()
    with open(path) as file:
        assert file.read() == "precious"


def test_a_missing_directory_is_a_clear_error(control_dir, make_loop):
    with pytest.raises(ControlError, match="cannot bind the control socket .*No such file or directory"):
        ControlServer(os.path.join(control_dir, "nope", "baton.ctl"), admins=(), handle=Master().command,
                      log=logging.getLogger(LOG), loop=make_loop())


def test_root_is_answered_by_handle(make_server):
    master = Master()
    server = make_server(master=master)
    answer = in_child(server, call(server.path, "scale", app="blog", workers=3))
    assert answer == {"result": {"ok": True, "echo": ["scale", {"app": "blog", "workers": 3}]}}
    assert master.calls == [("scale", {"app": "blog", "workers": 3})]


def test_a_bad_request_never_reaches_handle(make_server):
    master = Master()
    server = make_server(master=master)
    answer = in_child(server, call(server.path, "scale", app="blog", workers=0))
    assert answer["result"]["ok"] is False
    assert answer["result"]["errors"] == ["scale: 'workers': expected an integer from 1 to 1024, found number 0"]
    assert master.calls == []


def test_a_large_answer_is_buffered_until_the_client_takes_it(make_server):
    master = Master()
    big = {"ok": True, "blob": "x" * (4 << 20)}   # far beyond any socket buffer
    master.answers["status"] = big
    server = make_server(master=master)
    assert in_child(server, call(server.path, "status")) == {"result": big}


def test_handle_raising_is_an_internal_error_and_the_server_lives_on(make_server, caplog):
    master = Master()
    master.answers["reload"] = RuntimeError("boom")
    master.answers["upgrade"] = {"no": "ok"}
    server = make_server(master=master)
    answer = in_child(server, call(server.path, "reload"))["result"]
    assert answer == {"ok": False, "errors": ["internal error: RuntimeError: boom"]}
    assert "control socket: reload failed" in caplog.text
    answer = in_child(server, call(server.path, "upgrade"))["result"]
    assert answer["ok"] is False and "internal error" in answer["errors"][0]
    assert in_child(server, call(server.path, "stats"))["result"]["ok"] is True


# -- SO_PEERCRED with real users ----------------------------------------------------------

@needs_root
def test_nobody_is_refused_and_logged(make_server, caplog):
    master = Master()
    server = make_server(admins=(), master=master)
    os.chmod(server.path, 0o666)   # let the connect succeed: the peer check must be what refuses
    nobody = pwd.getpwnam("nobody")
    answer = in_child(server, lambda: (os.getpid(), ControlClient(server.path, timeout_s=WAIT_S).call("stop")),
                      user="nobody")
    child_pid, response = answer["result"]
    assert response == {"ok": False, "errors": ["permission denied"]}
    assert master.calls == []
    refusals = [r.getMessage() for r in caplog.records if "permission denied" in r.getMessage()]
    assert len(refusals) == 1
    assert f"uid {nobody.pw_uid} (nobody)" in refusals[0] and f"pid {child_pid}" in refusals[0]


@needs_root
def test_peer_credentials_are_the_connecting_process_as_the_kernel_saw_it(control_dir):
    path = os.path.join(control_dir, "peer.sock")
    uid, gid = 65534, 1   # different numbers, so a swapped uid and gid shows
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(1)
        listener.settimeout(WAIT_S)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(path)
                    sock.recv(1)   # holds on until the parent has looked and closed
                status = 0
            finally:
                os._exit(status)
        try:
            conn, _ = listener.accept()
            with conn:
                assert users.peer_credentials(conn) == (pid, uid, gid)
        finally:
            _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@needs_root
def test_without_admins_other_users_cannot_even_connect(make_server):
    server = make_server()
    answer = in_child(server, call(server.path, "status"), user="nobody")
    assert answer["raised"] == "ControlUnreachable"
    assert "permission denied connecting to" in answer["message"]


@needs_root
def test_a_user_in_admins_is_allowed(make_server):
    master = Master()
    server = make_server(admins=("www-data",), master=master)
    answer = in_child(server, call(server.path, "restart", app="blog"), user="www-data")
    assert answer == {"result": {"ok": True, "echo": ["restart", {"app": "blog"}]}}
    assert master.calls == [("restart", {"app": "blog"})]
    # ... and nobody, who is not, is still refused on the same socket.
    assert in_child(server, call(server.path, "status"), user="nobody")["result"]["errors"] == ["permission denied"]


@needs_root
def test_a_group_admin_is_allowed(make_server):
    group = grp.getgrgid(pwd.getpwnam("www-data").pw_gid).gr_name
    master = Master()
    server = make_server(admins=(f"@{group}",), master=master)
    assert in_child(server, call(server.path, "stats"), user="www-data")["result"]["ok"] is True
    assert in_child(server, call(server.path, "stats"), user="nobody")["result"]["ok"] is False
    assert master.calls == [("stats", {})]


@needs_root
def test_admins_may_change_while_the_server_runs(make_server):
    server = make_server(admins=("nobody",))
    assert in_child(server, call(server.path, "stats"), user="www-data")["result"]["ok"] is False
    server.admins = ("www-data",)
    assert in_child(server, call(server.path, "stats"), user="www-data")["result"]["ok"] is True


# -- a client cannot hold the master -------------------------------------------------------

@pytest.fixture
def connect():
    """connect(path) -> a non-blocking client socket, closed at teardown."""
    opened: list[socket.socket] = []

    def open_(path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(sock)
        sock.connect(path)
        sock.setblocking(False)
        return sock

    yield open_
    for sock in opened:
        sock.close()


def test_a_slow_client_does_not_block_another_and_is_dropped_at_its_deadline(make_server, connect, caplog):
    clock = FakeClock()
    master = Master()
    server = make_server(clock=clock, master=master)
    loop = server.loop
    accepted_at = clock.now
    slow = connect(server.path)
    slow.send(b'{"command": "sta')     # and never the rest
    drive(loop, lambda: loop.next_deadline() is not None)
    clock.now += 3
    fast = connect(server.path)
    fast.send(b'{"command": "reload"}\n')
    answer = bytearray()

    def on_fast():
        chunk = fast.recv(1 << 16)
        answer.extend(chunk if chunk else b"<eof>")

    loop.register(fast, on_fast)
    drive(loop, lambda: answer.endswith(b"<eof>"))
    assert json.loads(answer[:-len(b"<eof>")]) == {"ok": True, "echo": ["reload", {}]}
    assert master.calls == [("reload", {})]
    loop.unregister(fast)
    fast.close()

    # The slow one is still connected, unanswered, until its own deadline.
    with pytest.raises(BlockingIOError):
        slow.recv(1)
    assert loop.next_deadline() == accepted_at + 5.0
    clock.now = accepted_at + 4.9
    loop.run_once(max_wait_s=0)
    with pytest.raises(BlockingIOError):
        slow.recv(1)
    clock.now = accepted_at + 5.0
    loop.run_once(max_wait_s=0)
    line, _, rest = slow.recv(1 << 16).partition(b"\n")
    assert json.loads(line) == {"ok": False, "errors": ["timed out after 5s waiting for the request line"]}
    assert rest == b"" and slow.recv(1) == b""
    slow.close()
    assert loop.next_deadline() is None
    assert "no complete request within 5s" in caplog.text


def test_a_client_that_never_reads_its_answer_is_dropped_at_its_deadline(make_server, connect):
    clock = FakeClock()
    master = Master()
    master.answers["status"] = {"ok": True, "blob": "x" * (4 << 20)}
    server = make_server(clock=clock, master=master)
    loop = server.loop
    lazy = connect(server.path)
    lazy.send(b'{"command": "status"}\n')
    drive(loop, lambda: master.calls)              # answered, most of it still buffered
    assert loop.next_deadline() == clock.now + 5.0
    loop.run_once(max_wait_s=0)                     # nothing more can be written: returns at once
    clock.now += 5.0
    loop.run_once(max_wait_s=0)
    assert loop.next_deadline() is None
    lazy.settimeout(WAIT_S)
    received = 0
    while chunk := lazy.recv(1 << 20):              # what was sent, then the end: no newline
        received += len(chunk)
    assert 0 < received < 4 << 20
    lazy.close()


def test_an_oversized_request_is_refused(make_server, caplog):
    master = Master()
    server = make_server(master=master)

    def flood():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT_S)
            sock.connect(server.path)
            try:
                sock.sendall(b'{"command": "status", "pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}\n')
            except BrokenPipeError:
                pass
            return sock.makefile("rb").readline().decode()

    line = in_child(server, flood)["result"]
    assert json.loads(line) == {"ok": False, "errors": [f"request longer than {MAX_REQUEST_BYTES} bytes"]}
    assert master.calls == []
    assert f"refused a request over {MAX_REQUEST_BYTES} bytes" in caplog.text


class RecordingLoop(Loop):
    """A Loop that knows which fds are registered on it, to show what a server left."""

    def __init__(self, clock=time.monotonic):
        super().__init__(clock)
        self.fds: set[int] = set()

    def register(self, fileobj, handler, events=READ):
        super().register(fileobj, handler, events)
        self.fds.add(fileobj if type(fileobj) is int else fileobj.fileno())

    def unregister(self, fileobj):
        super().unregister(fileobj)
        self.fds.discard(fileobj if type(fileobj) is int else fileobj.fileno())


@pytest.fixture
def recording_loop():
    loop = RecordingLoop(FakeClock())
    yield loop
    loop.close()


def test_close_sends_what_is_pending_and_leaves_nothing_on_the_loop(control_dir, recording_loop, connect):
    master = Master()
    master.answers["status"] = {"ok": True, "blob": "x" * (4 << 20)}
    loop = recording_loop
    server = ControlServer(os.path.join(control_dir, "baton.ctl"), admins=(), handle=master.command,
                           log=logging.getLogger(LOG), loop=loop)
    lazy = connect(server.path)
    lazy.send(b'{"command": "status"}\n')
    drive(loop, lambda: master.calls)              # answered, most of it still buffered
    quiet = connect(server.path)                    # connected, has not said anything yet
    drive(loop, lambda: len(loop.fds) == 3)         # the listener, lazy and quiet
    before = 0
    with contextlib.suppress(BlockingIOError):
        while chunk := lazy.recv(1 << 20):          # take what the socket buffers held
            before += len(chunk)
    server.close()
    assert loop.fds == set() and loop.next_deadline() is None
    assert not os.path.exists(server.path)
    lazy.settimeout(WAIT_S)
    after = 0
    while chunk := lazy.recv(1 << 20):              # the one last send, then the end
        after += len(chunk)
    assert after > 0 and before + after < 4 << 20
    quiet.settimeout(WAIT_S)
    assert quiet.recv(1) == b""
    server.close()                                  # twice is harmless


def test_handle_that_closes_the_server_still_answers_once(control_dir, recording_loop, connect):
    master = Master()
    loop = recording_loop
    server = ControlServer(os.path.join(control_dir, "baton.ctl"), admins=(), handle=master.command,
                           log=logging.getLogger(LOG), loop=loop)

    def stop_and_close(name, args):
        server.close()   # what `handle` must not do; the server survives it
        return {"ok": True}

    server.handle = stop_and_close
    sock = connect(server.path)
    sock.send(b'{"command": "stop"}\n')
    drive(loop, lambda: not loop.fds)
    assert loop.next_deadline() is None
    sock.settimeout(WAIT_S)
    assert sock.makefile("rb").read() == b'{"ok":true}\n'


def test_a_request_of_exactly_the_limit_is_read(make_server):
    server = make_server()
    padding = MAX_REQUEST_BYTES - len(b'{"command":"status","x":""}')

    def exact():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT_S)
            sock.connect(server.path)
            sock.sendall(b'{"command":"status","x":"' + b"x" * padding + b'"}\n')
            return json.loads(sock.makefile("rb").readline())

    # Read whole, then judged: the unknown argument is the only complaint.
    assert in_child(server, exact)["result"] == {
        "ok": False, "errors": ["status: unknown argument 'x' (it takes no arguments)"]}


def test_a_client_that_hangs_up_early_is_forgotten(make_server, connect):
    server = make_server()
    sock = connect(server.path)
    sock.send(b'{"comm')
    drive(server.loop, lambda: server.loop.next_deadline() is not None)
    sock.close()
    drive(server.loop, lambda: server.loop.next_deadline() is None)


def test_a_dropped_client_leaves_no_timer_behind(make_server, connect, caplog):
    clock = FakeClock()
    master = Master()
    server = make_server(clock=clock, master=master)
    loop = server.loop
    answered = connect(server.path)
    answered.send(b'{"command": "reload"}\n')
    drive(loop, lambda: master.calls)              # accepted, answered in full, dropped
    line, _, _ = answered.recv(1 << 16).partition(b"\n")
    assert json.loads(line) == {"ok": True, "echo": ["reload", {}]}
    assert loop.next_deadline() is None
    clock.now += 3
    waiting = connect(server.path)
    drive(loop, lambda: loop.next_deadline() is not None)
    assert loop.next_deadline() == clock.now + 5.0   # its own deadline, not a stale one
    waiting.close()
    drive(loop, lambda: loop.next_deadline() is None)   # hung up: dropped, and its timer with it
    clock.now += 60
    loop.run_once(max_wait_s=0)
    assert "dropped" not in caplog.text


# -- no user can lock root out ---------------------------------------------------------------

@contextlib.contextmanager
def holding(server: ControlServer, count: int, *, uid: int, gid: int):
    """A child running as uid:gid opens `count` connections to the server and holds them,
    silent, until the block ends. The block starts once every connect() has returned:
    the kernel queues connections in order, so a client that connects inside the block
    is accepted after all of them."""
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(ready_r)
            os.close(release_w)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            held = []
            for _ in range(count):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(server.path)   # blocking: a full backlog waits for accept (a timeout would fail)
                held.append(sock)
            os.write(ready_w, b"x")
            os.read(release_r, 1)   # until the parent closes its end
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(release_r)
    said = bytearray()
    server.loop.register(ready_r, lambda: said.extend(os.read(ready_r, 1) or b"<eof>"))
    try:
        drive(server.loop, lambda: said)   # the loop runs: connects past the backlog wait for accept
        server.loop.unregister(ready_r)
        assert said == b"x", "the holding child failed"
        yield
    finally:
        if server.loop.registered(ready_r):
            server.loop.unregister(ready_r)
        os.close(ready_r)
        os.close(release_w)
        if said != b"x":
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@needs_root
def test_connections_one_user_holds_open_lock_out_neither_root_nor_an_admin(make_server, caplog):
    # With admins set the socket is 0666: before, 32 silent connections from anyone
    # filled every slot, and root's `baton ctl` was closed without an answer.
    clock = FakeClock()   # no deadline passes unless the test moves it
    master = Master()
    server = make_server(admins=("www-data",), master=master, clock=clock,
                         timeout_s=REFUSAL_LOG_INTERVAL_S * 2)
    nobody = pwd.getpwnam("nobody")
    opened = MAX_CLIENTS + 8
    with holding(server, opened, uid=nobody.pw_uid, gid=nobody.pw_gid):
        assert in_child(server, call(server.path, "status"))["result"]["ok"] is True
        assert in_child(server, call(server.path, "stats"), user="www-data")["result"]["ok"] is True
        busy = (f"busy: uid {nobody.pw_uid} holds {MAX_CLIENTS_PER_USER} control connections already "
                f"(at most {MAX_CLIENTS_PER_USER} at once)")
        assert in_child(server, call(server.path, "status"), user="nobody") == {
            "result": {"ok": False, "errors": [busy]}}
        assert master.calls == [("status", {}), ("stats", {})]
        # Refused over and over, logged once per uid per interval ...
        refusals = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refusals) == 1, refusals
        assert f"uid {nobody.pw_uid} (nobody)" in refusals[0] and busy[len("busy: "):] in refusals[0]
        # ... and once the interval is over, the next refusal says how many went unsaid.
        clock.now += REFUSAL_LOG_INTERVAL_S
        in_child(server, call(server.path, "status"), user="nobody")
        refusals = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
        unsaid = opened - MAX_CLIENTS_PER_USER   # refused while held, plus one call, less the one logged
        assert len(refusals) == 2 and f"{unsaid} more refused since" in refusals[1], refusals


@needs_root
def test_root_keeps_a_share_of_the_slots_however_many_users_hold_some(make_server):
    clock = FakeClock()
    master = Master()
    server = make_server(admins=("www-data",), master=master, clock=clock)
    holders = MAX_CLIENTS // MAX_CLIENTS_PER_USER + 1   # between them, more than every slot
    with contextlib.ExitStack() as stack:
        for n in range(holders):   # uids the passwd database need not know
            stack.enter_context(holding(server, MAX_CLIENTS_PER_USER, uid=61000 + n, gid=61000 + n))
        assert in_child(server, call(server.path, "status"))["result"]["ok"] is True
        shared = in_child(server, call(server.path, "stats"), user="www-data")["result"]
        assert shared["ok"] is False and shared["errors"][0].startswith("busy: ")
    assert master.calls == [("status", {})]


ADMISSION = [
    # (uid, connections it holds, connections open, None to serve it or what the refusal says)
    (0, 0, 0, None),
    (0, 20, MAX_CLIENTS - 1, None),                       # root may use every slot
    (1000, 20, MAX_CLIENTS - 1, None),                    # and so may the master's own user
    (0, 0, MAX_CLIENTS, f"{MAX_CLIENTS} control connections are open already"),
    (2000, 0, 0, None),
    (2000, MAX_CLIENTS_PER_USER - 1, 10, None),
    (2000, MAX_CLIENTS_PER_USER, 10, f"uid 2000 holds {MAX_CLIENTS_PER_USER} control connections already"),
    (2000, 0, MAX_CLIENTS - RESERVED_CLIENTS - 1, None),
    (2000, 0, MAX_CLIENTS - RESERVED_CLIENTS,
     f"the {MAX_CLIENTS - RESERVED_CLIENTS} control connections other users may hold are open already"),
]


@pytest.mark.parametrize("uid, held, total, refusal", ADMISSION, ids=[f"uid{a[0]}-{a[1]}-of-{a[2]}" for a in ADMISSION])
def test_admission(uid, held, total, refusal):
    found = admission(uid, held, total, master_uid=1000)
    assert found == refusal if refusal is None else found.startswith(refusal), found


# -- the client's errors --------------------------------------------------------------------

def test_client_names_a_missing_socket(control_dir):
    path = os.path.join(control_dir, "none.ctl")
    with pytest.raises(ControlUnreachable, match=f"is the master running\\? no control socket at {path}"):
        ControlClient(path).call("status")


def test_client_names_a_stale_socket(control_dir):
    path = os.path.join(control_dir, "stale.ctl")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
        with pytest.raises(ControlUnreachable, match="nothing answers on"):
            ControlClient(path).call("status")


def test_client_gives_up_after_its_timeout(control_dir):
    path = os.path.join(control_dir, "mute.ctl")
    with socket.socket(socket.AF_UNIX) as mute:   # listens, never answers
        mute.bind(path)
        mute.listen()
        with pytest.raises(ControlUnreachable, match="no answer from the master on .* within 0.05s"):
            ControlClient(path, timeout_s=0.05).call("status")


# -- baton ctl ---------------------------------------------------------------------------------

def test_status_is_formatted_as_tables():
    text = cli.format_status(STATUS)
    lines = text.splitlines()
    assert lines[0] == "master pid 1, config /etc/baton.toml, up 12s, 0 reloads, 0 generation switches"
    assert lines[2:] == [
        "APP    GEN  WORKERS  USER",
        "hello    2  2/2      www-data",
        "",
        "APP    PID  #  GEN  STATE    REQUESTS  CONNS  BUSY  RSS    UP",
        "hello   10  1    2  ready         120      3     0  20.0M  10s",
        "hello   11  2    2  booting         0      0     0  512K   0s",
        "",
        "LISTENER  ADDRESS             MODE     QUEUE",
        "web       127.0.0.1:8000      balance      0",
        "local     unix:/run/web.sock  share       17",
    ]


def test_status_tolerates_missing_fields():
    text = cli.format_status({"ok": True, "apps": [{"name": "x", "workers": [{"pid": 5}]}]})
    assert "master pid -, config -, up -" in text
    assert "x      5  -  -    -      -         -      -     -    -" in text.splitlines()


def test_stats_are_sorted_name_value_lines():
    assert cli.format_stats({"ok": True, "counters": {"reloads": 2, "accepted": 10, "bytes_out": 1.5}}) == (
        "accepted   10\nbytes_out  1.5\nreloads    2")


def test_ctl_unreachable_exits_2(control_dir, capsys):
    path = os.path.join(control_dir, "none.ctl")
    assert cli.main(["ctl", "--socket", path, "status"]) == 2
    assert capsys.readouterr().err == f"baton: is the master running? no control socket at {path}\n"


def test_ctl_finds_the_socket_from_the_config(tmp_path, capsys):
    config = tmp_path / "site.toml"
    config.write_text('[master]\ncontrol_socket = "run/m.ctl"\n[apps.x]\nuser = "only-root-may-be-this"\n')
    assert cli.main(["ctl", "-c", str(config), "status"]) == 2
    assert f"no control socket at {tmp_path}/run/m.ctl" in capsys.readouterr().err
    config.write_text("[master]\n")
    assert cli.main(["ctl", "-c", str(config), "reload"]) == 2
    assert f"no control socket at {tmp_path}/site.ctl" in capsys.readouterr().err


def test_ctl_with_an_unreadable_config_exits_2(tmp_path, capsys):
    assert cli.main(["ctl", "-c", str(tmp_path / "missing.toml"), "status"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the config file" in err and "give --socket PATH" in err


def run_cli(*argv):
    """A child's work: `baton ctl ...`, returning (status, stdout, stderr)."""
    def work():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["ctl", *argv])
        return [status, out.getvalue(), err.getvalue()]
    return work


def test_ctl_prints_status_as_a_table_and_exits_0(make_server):
    server = make_server()
    status, out, err = in_child(server, run_cli("--socket", server.path, "status"))["result"]
    assert (status, err) == (0, "")
    assert out == cli.format_status(STATUS) + "\n"


def test_ctl_json_prints_the_raw_answer(make_server):
    server = make_server()
    status, out, _ = in_child(server, run_cli("--socket", server.path, "--json", "scale", "blog", "2"))["result"]
    assert status == 0
    assert json.loads(out) == {"ok": True, "echo": ["scale", {"app": "blog", "workers": 2}]}


def test_ctl_refused_prints_errors_and_exits_1(make_server):
    master = Master()
    master.answers["restart"] = {"ok": False, "errors": ["unknown app 'nope'", "did you mean 'blog'?"]}
    server = make_server(master=master)
    status, out, err = in_child(server, run_cli("--socket", server.path, "restart", "nope"))["result"]
    assert (status, out, err) == (1, "", "unknown app 'nope'\ndid you mean 'blog'?\n")
    status, out, err = in_child(server, run_cli("--socket", server.path, "stop", "--now"))["result"]
    assert (status, out, err) == (0, "ok\n", "")
    assert master.calls[-1] == ("stop", {"now": True})


def test_ctl_has_help_for_every_command(capsys):
    for command in ([], ["status"], ["scale"], ["stop"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["ctl", *command, "--help"])
        assert info.value.code == 0
    assert "usage: baton ctl" in capsys.readouterr().out
