"""The command line as a user runs it: check, --version, --help, serve, ctl."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import REPO, get_json, http_request, wait_for

from supervisor import __version__, cli


def baton(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("command", [[], ["serve"], ["ctl"]])
def test_version(command):
    result = baton(*command, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"baton {__version__}"


@pytest.mark.parametrize("command", [[], ["run"], ["check"], ["serve"]])
def test_every_subcommand_has_help(command):
    result = baton(*command, "--help")
    assert result.returncode == 0
    assert "usage: baton" in result.stdout


def test_check_accepts_the_demo_config(tmp_path):
    config = "etc/baton.toml"
    if os.geteuid() != 0:
        # As scripts/run does: without root every app runs as us, so its user lines go.
        text = (REPO / config).read_text()
        config = tmp_path / "baton.toml"
        config.write_text("\n".join(line for line in text.splitlines() if not line.startswith("user =")))
    result = baton("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "ok (5 apps, 4 listeners)" in result.stdout


def test_check_prints_every_problem_and_exits_1(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent("""
        [listeners.web]
        bind = "127.0.0.1:99999"

        [apps.blog]
        module = "blog"
        listeners = ["web"]
        wokers = 2
    """))
    result = baton("check", "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert any("listeners.web.bind" in line for line in lines)
    assert any("apps.blog.module" in line for line in lines)
    assert any("apps.blog.wokers: unknown key" in line and "did you mean 'workers'" in line for line in lines)


def test_serve_runs_one_app_without_a_config_file(port):
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "serve", "tests.apps.probe:app",
                             "--bind", f"127.0.0.1:{port}", "--workers", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        info = wait_for(lambda: _try_json(port), message="baton serve to answer")
        assert info["path"] == "/"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _try_json(port):
    try:
        return get_json(port)
    except OSError:
        return None


# -- baton serve, as a gunicorn user types it ------------------------------------------


class Serve:
    """A real `baton serve` master, its output in a file, its control socket in `runtime`."""

    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None, cwd: Path | None = None,
                 error_log: Path | None = None):
        self.runtime = tmp_path / "xdg"
        self.env = {name: value for name, value in os.environ.items() if name != "BATON_CMD_ARGS"}
        self.env.update(PYTHONUNBUFFERED="1", XDG_RUNTIME_DIR=str(self.runtime), **(env or {}))
        self.cwd = cwd or tmp_path
        self.log_path = tmp_path / "serve.log"
        self.error_log = error_log   # where the master's log goes, if not to its stderr
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "serve", *args], cwd=self.cwd,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        if self.error_log is not None and self.error_log.exists():
            text += self.error_log.read_text(errors="replace")
        return text

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        """`baton ctl ARGS` run where the master runs: no etc/baton.toml there, same runtime dir."""
        return subprocess.run([sys.executable, "-m", "supervisor", "ctl", *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=60)

    def status(self) -> dict:
        result = self.ctl("status", "--json")
        assert result.returncode == 0, result.stderr + self.log()
        return json.loads(result.stdout)

    def wait_ready(self, port: int, workers: int, answer=None):
        """Wait until `workers` are ready and `answer(port)` (probe's JSON) is truthy; return it."""
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"baton serve exited {self.proc.returncode}:\n{self.log()}")
            if self.log().count(") ready") < workers:
                return None
            return (answer or _try_json)(port)
        return wait_for(ready, message=lambda: f"baton serve to answer; log:\n{self.log()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"baton serve did not exit; log:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve(tmp_path):
    started: list[Serve] = []

    def start(*args: str, **kwargs) -> Serve:
        started.append(Serve(tmp_path, *args, **kwargs))
        return started[-1]
    yield start
    for instance in started:
        instance.close()


def test_serve_module_alone_and_ctl_finds_its_socket(serve, port, tmp_path):
    """`baton serve tests.apps.probe` is tests.apps.probe:application; the flags reach
    the master and the app; `baton ctl` with no -c or --socket finds the master."""
    pidfile, access, errors = tmp_path / "baton.pid", tmp_path / "access.log", tmp_path / "error.log"
    master = serve("tests.apps.probe", "--bind", f"127.0.0.1:{port}", "-w", "2", "--chdir", str(REPO),
                   "-e", "PROBE_VALUE=from-flag", "--pid", str(pidfile), "--access-logfile", str(access),
                   "--error-logfile", str(errors), "--mode", "share", error_log=errors)
    info = master.wait_ready(port, 2)
    assert (info["env"], info["cwd"]) == ("from-flag", str(REPO))
    socket_path = master.runtime / "baton" / f"serve-{port}.ctl"
    assert f"control socket at {socket_path}" in errors.read_text()
    assert pidfile.read_text().strip() == str(master.proc.pid)
    wait_for(lambda: access.exists() and '"GET / HTTP/1.1" 200' in access.read_text(), message="an access line")

    status = master.status()
    assert [(app["name"], app["target"], len(app["workers"])) for app in status["apps"]] == [("app", 2, 2)]
    assert [(listener["address"], listener["mode"]) for listener in status["listeners"]] == [
        (f"127.0.0.1:{port}", "share")]
    for argv in (["--socket", str(socket_path), "stats", "--json"], ["--json", "stats"],
                 ["stats", "--json", "--timeout", "5"], ["--socket", str(socket_path), "--json", "stats"]):
        result = master.ctl(*argv)
        assert result.returncode == 0, (argv, result.stderr)
        answer = json.loads(result.stdout)
        assert answer["ok"] is True and "reloads" in answer["counters"], argv
    assert master.stop() == 0
    assert not pidfile.exists() and not socket_path.exists()


def test_serve_settings_come_from_file_then_env_then_flags(serve, port, tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(f"""
        [serve]
        module = "tests.apps.probe"
        bind = "127.0.0.1:{port}"
        chdir = "{REPO}"
        workers = 3
        user = "www-data"
        env = {{ PROBE_VALUE = "from-file" }}
    """.replace("\n        ", "\n"))
    master = serve("-c", str(config), "-e", "PROBE_VALUE=from-flag",
                   env={"BATON_CMD_ARGS": "--workers 2 -e PROBE_VALUE=from-env --mode share"})
    info = master.wait_ready(port, 2)
    assert info["env"] == "from-flag"
    assert info["uid"] == pwd_uid("www-data")
    status = master.status()
    assert status["apps"][0]["target"] == 2 and status["apps"][0]["user"] == "www-data"
    assert status["listeners"][0]["mode"] == "share"
    assert master.stop() == 0


def pwd_uid(name: str) -> int:
    import pwd
    return pwd.getpwnam(name).pw_uid


def test_serve_reload_restarts_the_app_when_its_code_changes(serve, port, scratch):
    app = scratch / "reloadme.py"
    app.write_text(_versioned_app("one"))
    app.chmod(0o644)
    master = serve("reloadme", "--reload", "--chdir", str(scratch), "-b", f"127.0.0.1:{port}")
    assert master.wait_ready(port, 1, answer=_body) == b"one"
    app.write_text(_versioned_app("two"))
    wait_for(lambda: _body(port) == b"two", message=lambda: f"the new code to serve; log:\n{master.log()}")
    assert master.status()["apps"][0]["generation"] == 2
    assert master.stop() == 0


def test_serve_hup_restarts_the_app_with_its_new_code_and_loses_no_request(serve, port, scratch):
    """gunicorn restarts its workers on HUP; `baton serve` has no file to re-read, so
    HUP rolls a new generation of its app, zero downtime, the code imported afresh."""
    app = scratch / "hupme.py"
    app.write_text(_versioned_app("one"))
    app.chmod(0o644)
    master = serve("hupme", "--chdir", str(scratch), "-b", f"127.0.0.1:{port}", "-w", "2")
    assert master.wait_ready(port, 2, answer=_body) == b"one"
    failures, bodies, stop = [], set(), threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, _, body = http_request(port, timeout=10.0)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if status != 200:
                failures.append(f"status {status}")
            bodies.add(body)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Another size: a .pyc written in the same second still reads as stale.
        app.write_text(_versioned_app("two, hup"))
        master.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b"two, hup" in bodies, timeout=30, message=lambda: f"the new code to serve; log:\n{master.log()}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert failures == []
    assert "nothing to reload" not in master.log()
    assert master.status()["apps"][0]["generation"] == 2
    assert master.stop() == 0


def _versioned_app(version: str) -> str:
    return (f"def application(environ, start_response):\n"
            f"    start_response('200 OK', [('Content-Length', '{len(version)}')])\n"
            f"    return [b'{version}']\n")


def _body(port):
    try:
        return http_request(port, timeout=2.0)[2]
    except OSError:
        return None


def test_gunicorn_flag_in_a_real_run_exits_2_with_one_line():
    result = baton("serve", "tests.apps.probe", "--worker-class", "gevent")
    assert result.returncode == 2
    assert result.stderr == ("baton serve: --worker-class (gunicorn): Baton has one worker kind: a process with "
                             "threads; use --threads N (and -w N)\n")


# -- baton ctl's command line ------------------------------------------------------------


def test_ctl_reload_help_says_every_app_restarts(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["ctl", "reload", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "restart every app as a new generation" in text
    assert "like SIGHUP" in text and "restarts only the apps whose settings changed" in text


def test_ctl_takes_its_flags_after_the_action(tmp_path, capsys):
    path = str(tmp_path / "none.ctl")
    assert cli.main(["ctl", "status", "--socket", path, "--json", "--timeout", "1"]) == 2
    assert capsys.readouterr().err == f"baton: is the master running? no control socket at {path}\n"
    assert cli.main(["ctl", "-c", str(tmp_path / "x.toml"), "status", "--socket", path]) == 2
    assert "give either -c/--config or --socket, not both" in capsys.readouterr().err
