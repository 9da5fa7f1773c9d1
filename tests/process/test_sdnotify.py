"""sd_notify: messages on real datagram sockets, and what a real master tells systemd."""
from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import pytest
from conftest import REPO, answers

from supervisor.system import sdnotify
from supervisor.system.sdnotify import Notifier


@pytest.fixture
def manager(tmp_path):
    """A stand-in for systemd's notify socket, bound in a temp dir: (NOTIFY_SOCKET, socket)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield str(path), sock


@pytest.fixture
def abstract_manager():
    name = f"baton-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield "@" + name, sock


def receive(sock: socket.socket, timeout_s: float = 10.0) -> dict[str, str]:
    """The next message's fields; waits at most `timeout_s` for it to arrive."""
    sock.settimeout(timeout_s)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        raise AssertionError(f"no sd_notify message within {timeout_s}s") from None
    text = data.decode()
    assert text.endswith("\n"), text
    return dict(line.split("=", 1) for line in text.splitlines())


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- the environment ---------------------------------------------------------------

@pytest.mark.parametrize("value, address", [
    (None, None),
    ("", None),
    ("run/notify", None),                      # relative: not something systemd sets
    ("@", None),                               # an abstract socket needs a name
    ("vsock:2:1234", None),                    # systemd 254+ for VMs: not supported, so silent
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@/org/freedesktop/systemd1/notify", "\0/org/freedesktop/systemd1/notify"),
])
def test_from_environ(value, address):
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    notifier = Notifier.from_environ(environ)
    assert (notifier.address, notifier.enabled) == (address, address is not None)


def test_without_a_socket_every_call_is_a_no_op():
    notifier = Notifier.from_environ({})
    assert not any([notifier.ready("up"), notifier.reloading(), notifier.stopping(), notifier.status("x"),
                    notifier.mainpid(1), notifier.send(READY=1)])


def test_scrub_removes_what_systemd_set_and_nothing_else():
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "LISTEN_FDS": "1", "LISTEN_PID": "42",
               "LISTEN_FDNAMES": "web", "PATH": "/bin", "LISTEN_FDS_EXTRA": "x"}
    sdnotify.scrub(environ)
    assert environ == {"PATH": "/bin", "LISTEN_FDS_EXTRA": "x"}
    sdnotify.scrub(environ)  # twice is fine


def test_scrub_of_os_environ_reaches_exec_children(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LISTEN_PID", "1")
    sdnotify.scrub()
    assert "NOTIFY_SOCKET" not in os.environ and "LISTEN_PID" not in os.environ


# -- encoding ----------------------------------------------------------------------

@pytest.mark.parametrize("fields, data", [
    ({"READY": 1}, b"READY=1\n"),
    ({"READY": True, "STATUS": "serving 2 apps"}, b"READY=1\nSTATUS=serving 2 apps\n"),
    ({"STATUS": "line one\nline two\r"}, b"STATUS=line one line two \n"),  # one message, one line
    ({"STATUS": "caf\u00e9"}, "STATUS=caf\u00e9\n".encode()),
    ({"MAINPID": 1234, "STATUS": ""}, b"MAINPID=1234\nSTATUS=\n"),
    ({}, b""),
])
def test_encode(fields, data):
    assert sdnotify.encode(fields) == data


@pytest.mark.parametrize("key", ["ready", "READY=1", "", "STATUS\n", "1READY"])
def test_encode_refuses_a_key_that_is_not_a_field_name(key):
    with pytest.raises(ValueError, match="expected an upper-case sd_notify field name"):
        sdnotify.encode({key: 1})


# -- sending -----------------------------------------------------------------------

def test_messages_on_a_socket_in_a_directory(manager):
    address, sock = manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.ready(status="serving: web 2/2")
    assert receive(sock) == {"READY": "1", "STATUS": "serving: web 2/2"}
    assert notifier.ready()
    assert receive(sock) == {"READY": "1"}
    before = monotonic_usec()
    assert notifier.reloading(status="reloading")
    message = receive(sock)
    assert (message["RELOADING"], message["STATUS"]) == ("1", "reloading")
    assert before <= int(message["MONOTONIC_USEC"]) <= monotonic_usec()
    assert notifier.stopping()
    assert receive(sock) == {"STOPPING": "1"}
    assert notifier.status("draining 3 workers")
    assert receive(sock) == {"STATUS": "draining 3 workers"}
    assert notifier.mainpid(4321)
    assert receive(sock) == {"MAINPID": "4321"}
    assert notifier.send(WATCHDOG=1, STATUS="ok")
    assert receive(sock) == {"WATCHDOG": "1", "STATUS": "ok"}


def test_messages_on_an_abstract_socket(abstract_manager):
    address, sock = abstract_manager
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.ready(status="up")
    assert receive(sock) == {"READY": "1", "STATUS": "up"}


def test_each_message_is_sent_from_a_socket_that_is_closed_after(manager):
    address, sock = manager
    before = set(os.listdir("/proc/self/fd"))
    assert Notifier(address).status("x")
    assert set(os.listdir("/proc/self/fd")) == before
    receive(sock)


@pytest.mark.parametrize("address", ["/nonexistent/notify", "\0baton-test-nobody-listens"])
def test_a_missing_manager_is_false_not_an_exception(address):
    assert Notifier(address).ready() is False


def test_a_socket_file_nobody_reads_any_more_is_false(manager, tmp_path):
    address, sock = manager
    sock.close()
    assert Notifier(address).ready() is False


def test_a_stream_socket_is_false(tmp_path):
    path = str(tmp_path / "stream")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen()
        assert Notifier(path).ready() is False


def test_a_manager_that_stopped_reading_never_blocks_the_master(manager, monkeypatch):
    address, _ = manager
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT_S", 0.01)
    notifier = Notifier(address)
    # The queue fills (net.unix.max_dgram_qlen, or the receive buffer); then False, not a hang.
    sent = 0
    while notifier.status("x" * 1000):
        sent += 1
        assert sent < 100_000, "the queue never filled"
    assert sent > 0


def test_a_message_too_big_for_a_datagram_is_false(manager):
    address, _ = manager
    assert Notifier(address).status("x" * 16_000_000) is False


# -- a real master -----------------------------------------------------------------

def config(port: int, workers: int = 2) -> str:
    return f"""
        [master]
        graceful_timeout = 5
        boot_timeout = 10

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.probe]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        workers = {workers}
        chdir = "{REPO}"
    """


def next_with(sock: socket.socket, field: str, seen: list[dict[str, str]]) -> dict[str, str]:
    """Read messages (STATUS lines may come between) until one carries `field`."""
    while True:
        message = receive(sock)
        seen.append(message)
        if field in message:
            return message


def test_a_real_master_says_ready_reloading_and_stopping(baton, port, manager, monkeypatch):
    # Wired in master.py: READY once every app has a ready worker, RELOADING then READY
    # around a SIGHUP reload, STOPPING at SIGTERM; only the master ever sends.
    address, sock = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    master = baton(config(port))
    seen: list[dict[str, str]] = []
    ready = next_with(sock, "READY", seen)
    assert answers(port), master.log()
    assert "STATUS" in ready
    assert master.log().count(") ready") == 2, master.log()

    master.signal(signal.SIGHUP)
    reloading = next_with(sock, "RELOADING", seen)
    assert "READY" not in reloading and int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    next_with(sock, "READY", seen)
    assert "generation 2 serving" in master.log(), master.log()
    assert answers(port)

    master.signal(signal.SIGTERM)
    next_with(sock, "STOPPING", seen)
    assert master.wait_exit() == 0
    # Workers were forked after the master scrubbed NOTIFY_SOCKET: nobody else spoke.
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)
    assert not any(set(message) - {"READY", "RELOADING", "MONOTONIC_USEC", "STOPPING", "STATUS"}
                   for message in seen), seen


def test_a_rejected_reload_still_ends_with_ready(baton, port, manager, monkeypatch):
    # systemd waits for READY=1 after RELOADING=1 whether the reload worked or not.
    address, sock = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    master = baton(config(port, workers=1))
    seen: list[dict[str, str]] = []
    next_with(sock, "READY", seen)
    master.config.write_text("this is not TOML")
    master.signal(signal.SIGHUP)
    next_with(sock, "RELOADING", seen)
    ready = next_with(sock, "READY", seen)
    assert "reload rejected" in ready.get("STATUS", ""), seen
    assert answers(port)
