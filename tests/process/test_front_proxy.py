"""Behind nginx, as a gunicorn user sets it up on day one: the client's address from
X-Forwarded-For (never the part a client wrote), UNIX listeners the proxy's user can
connect to, and log lines that say what happened."""
from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys

import pytest
from conftest import REPO, answers, free_port, http_request, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (sockets for www-data and nobody)")


def echo_config(port: int, listeners: str, app_listeners: str = '"web", "local"') -> str:
    return f"""
        [master]
        graceful_timeout = 5

        [listeners.web]
        bind = "127.0.0.1:{port}"
{listeners}

        [apps.echo]
        module = "tests.apps.client_echo:app"
        listeners = [{app_listeners}]
        chdir = "{REPO}"
        user = "www-data"
    """


def unix_request(path: str, headers: dict[str, str]) -> dict:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(f"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{head}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return json.loads(body)


def connect_as(user: str, path: str) -> int:
    """Try to connect to the UNIX socket at `path` as `user` (a forked child that drops
    to it): 0 if it could, else the errno."""
    entry = pwd.getpwnam(user)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.connect(path)
                    code = 0
                except OSError as exc:
                    code = exc.errno or 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_client_is_the_rightmost_untrusted_address_over_tcp_and_unix(baton, scratch) -> None:
    port = free_port()
    sock_path = f"{scratch}/web.sock"
    master = baton(echo_config(port, f'''
        [listeners.local]
        bind = "unix:{sock_path}"
    '''))
    wait_for(lambda: answers(port), message=lambda: master.log())
    nginx = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7", "X-Forwarded-Proto": "https"}
    _, _, body = http_request(port, headers=nginx)
    assert json.loads(body) == {"remote_addr": "203.0.113.7", "remote_port": None, "scheme": "https",
                                "host": f"127.0.0.1:{port}"}
    _, _, body = http_request(port, headers={"X-Forwarded-For": "not-an-ip"})
    got = json.loads(body)
    assert got["remote_addr"] == "127.0.0.1" and got["remote_port"] is not None and got["scheme"] == "http"
    # nginx over the UNIX socket: its peer is trusted, its file mode chose who connects.
    got = unix_request(sock_path, nginx)
    assert (got["remote_addr"], got["scheme"]) == ("203.0.113.7", "https")
    got = unix_request(sock_path, {"X-Forwarded-For": "203.0.113.7, junk"})
    assert got["remote_addr"] == ""


def test_a_peer_outside_forwarded_allow_ips_changes_nothing(baton) -> None:
    port = free_port()
    master = baton(echo_config(port, "", app_listeners='"web"') + '        forwarded_allow_ips = ["10.0.0.0/8"]\n')
    wait_for(lambda: answers(port), message=lambda: master.log())
    _, _, body = http_request(port, headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    got = json.loads(body)
    assert (got["remote_addr"], got["scheme"]) == ("127.0.0.1", "http")


def test_default_unix_socket_lets_www_data_connect_and_not_nobody(baton, scratch) -> None:
    port = free_port()
    sock_path = f"{scratch}/web.sock"
    made_dir = f"{scratch}/run"
    master = baton(echo_config(port, f'''
        [listeners.local]
        bind = "unix:{sock_path}"

        [listeners.made]
        bind = "unix:{made_dir}/made.sock"
        socket_dir_mode = "0750"
    ''', app_listeners='"web", "local", "made"'))
    wait_for(lambda: answers(port), message=lambda: master.log())
    st = os.lstat(sock_path)
    www = pwd.getpwnam("www-data")
    assert stat.S_IMODE(st.st_mode) == 0o660 and (st.st_uid, st.st_gid) == (0, www.pw_gid)
    assert connect_as("www-data", sock_path) == 0
    assert connect_as("nobody", sock_path) == errno.EACCES
    # The directory it was asked to create: the socket's group may enter, nobody may not.
    st = os.lstat(made_dir)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == www.pw_gid
    assert connect_as("www-data", f"{made_dir}/made.sock") == 0
    assert connect_as("nobody", f"{made_dir}/made.sock") == errno.EACCES
    master.wait_log(f"listening on unix:{sock_path} (local): mode 0660, owner root, group www-data "
                    "(group www-data: the default under a root master")


def test_explicit_mode_owner_group_and_a_live_change_by_reload(baton, scratch) -> None:
    port = free_port()
    sock_path = f"{scratch}/web.sock"
    listener = f'''
        [listeners.local]
        bind = "unix:{sock_path}"
        mode = "share"
        socket_mode = "{{mode}}"
        socket_owner = "nobody"
        socket_group = "nogroup"
    '''
    master = baton(echo_config(port, listener.format(mode="0600")))
    wait_for(lambda: answers(port), message=lambda: master.log())
    st = os.lstat(sock_path)
    nobody = pwd.getpwnam("nobody")
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert connect_as("nobody", sock_path) == 0
    assert connect_as("www-data", sock_path) == errno.EACCES
    master.wait_log("is watching for changes")
    master.config.write_text(echo_config(port, listener.format(mode="0666")))   # the watcher reloads
    master.wait_log("reload: socket of listener local now mode 0666")
    after = os.lstat(sock_path)
    assert after.st_ino == st.st_ino and stat.S_IMODE(after.st_mode) == 0o666   # the same socket, not rebound
    assert connect_as("www-data", sock_path) == 0
    assert "reload: restart app" not in master.log()   # a file mode restarts no app


@pytest.mark.parametrize(("line", "key", "words"), [
    ('socket_mode = "0999"', "listeners.local.socket_mode", 'expected an octal string like "0660"'),
    ("socket_mode = 4095", "listeners.local.socket_mode", "or an integer from 0 to 0o777"),
    ('socket_owner = "no-such-user-x"', "listeners.local.socket_owner", "which this system does not know"),
    ('socket_group = "no-such-group-x"', "listeners.local.socket_group", "which this system does not know"),
    ('socket_dir_mode = "rwx"', "listeners.local.socket_dir_mode", 'expected an octal string like "0750"'),
])
def test_baton_check_names_a_bad_socket_key(tmp_path, line, key, words) -> None:
    config = tmp_path / "baton.toml"
    config.write_text(echo_config(free_port(), f'''
        [listeners.local]
        bind = "unix:{tmp_path}/web.sock"
        {line}
    '''))
    done = subprocess.run([sys.executable, "-m", "supervisor", "check", "-c", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"{config}: {key}: " in done.stderr + done.stdout and words in done.stderr + done.stdout


def test_socket_keys_need_a_unix_bind(tmp_path) -> None:
    config = tmp_path / "baton.toml"
    config.write_text(echo_config(free_port(), '        socket_mode = "0660"', app_listeners='"web"'))
    done = subprocess.run([sys.executable, "-m", "supervisor", "check", "-c", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert "listeners.web.socket_mode: applies to a 'unix:PATH' bind only" in done.stderr + done.stdout


def test_every_listener_is_logged_and_the_stop_says_how_long_it_drained(baton) -> None:
    port, files_port = free_port(), free_port()
    master = baton(f"""
        [master]
        graceful_timeout = 5

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [listeners.files]
        bind = "127.0.0.1:{files_port}"
        mode = "reuseport"

        [apps.app]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        chdir = "{REPO}"

        [apps.files]
        module = "tests.apps.probe:app"
        listeners = ["files"]
        chdir = "{REPO}"
        user = "www-data"
    """)
    wait_for(lambda: answers(port) and answers(files_port), message=lambda: master.log())
    master.wait_log(f"listening on http://127.0.0.1:{port} (web)")
    master.wait_log(f"listening on http://127.0.0.1:{files_port} (files; reuseport: one socket per worker)")
    master.wait_log("app 'app' names no user; its workers run as nobody")
    assert "app app names" not in master.log()
    subprocess.run([sys.executable, "-m", "supervisor", "ctl", "-c", str(master.config), "scale", "app", "1"],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    master.wait_log("scaled app 'app' to 1 worker\n")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    last = master.log().rstrip("\n").rsplit("\n", 1)[-1]
    assert "master stopped after a " in last and last.endswith(" s drain"), master.log()
