"""Issue #13 item 11: etc/baton.service and etc/baton.socket.

`systemd-analyze verify` judges the units as systemd would load them (the ExecStart=
paths pointed at this venv's `baton`); the sandbox the service sets is checked with
`systemd-analyze security --offline`; and a real master runs with exactly the
capabilities and the no-new-privileges flag the unit gives it (`setpriv`), switching
users, binding a port under 1024, chowning a UNIX socket and signalling its workers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, http_request, wait_for

UNITS = ("baton.service", "baton.socket")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def settings(unit: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, by key, in order (comments left out)."""
    found: dict[str, list[str]] = {}
    for line in (REPO / "etc" / unit).read_text().splitlines():
        match = re.match(r"([A-Za-z]+)=(.*)", line)
        if match:
            found.setdefault(match[1], []).append(match[2])
    return found


@pytest.fixture
def units(tmp_path) -> Path:
    """The units, copied, with ExecStart= and friends pointing at this venv's baton."""
    baton = Path(sys.executable).parent / "baton"
    assert baton.exists(), baton
    for unit in UNITS:
        text = (REPO / "etc" / unit).read_text().replace("/path/to/venv/bin/baton", str(baton))
        (tmp_path / unit).write_text(text)
    return tmp_path


@needs_analyze
def test_the_units_verify_clean(units):
    result = subprocess.run([ANALYZE, "verify", *(str(units / unit) for unit in UNITS)], cwd=units,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_analyze
def test_the_service_is_sandboxed(units):
    result = subprocess.run([ANALYZE, "security", "--offline=yes", "--json=short", str(units / "baton.service")],
                            cwd=units, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    checks = {entry["name"]: entry["set"] for entry in json.loads(result.stdout)}
    for name in ("NoNewPrivileges=", "PrivateTmp=", "ProtectKernelTunables=", "ProtectControlGroups=",
                 "CapabilityBoundingSet=~CAP_SYS_ADMIN", "CapabilityBoundingSet=~CAP_SYS_PTRACE",
                 "CapabilityBoundingSet=~CAP_NET_ADMIN", "RestrictSUIDSGID="):
        assert checks[name] is True, name


def test_the_socket_is_optional_and_the_runtime_directory_holds_the_control_socket():
    service = settings("baton.service")
    assert "baton.socket" not in " ".join(service.get("Requires", []) + service.get("Wants", []))
    assert service["RuntimeDirectory"] == ["baton"]
    text = (REPO / "etc" / "baton.service").read_text()
    assert 'control_socket = "/run/baton/baton.ctl"' in text
    assert '# control_socket = "/run/baton/baton.ctl"' in (REPO / "etc" / "baton.toml").read_text()


def _free_low_port() -> int:
    for port in range(1000, 900, -1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port under 1024")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_master_runs_with_just_the_units_capabilities(tmp_path, scratch):
    caps = settings("baton.service")["CapabilityBoundingSet"][0].split()
    bounding = "-all," + ",".join("+" + cap.removeprefix("CAP_").lower() for cap in caps)
    port = _free_low_port()
    # A socket directory to create and hand to its owner (CAP_CHOWN, then CAP_FOWNER
    # for its mode); a config only its owner may read (CAP_DAC_READ_SEARCH).
    sock_path = scratch / "run" / "web.sock"
    private = scratch / "deploy"
    private.mkdir(mode=0o700)
    config = private / "baton.toml"
    config.write_text(textwrap.dedent(f"""
        [master]
        graceful_timeout = 5
        control_socket = "{scratch}/baton.ctl"

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [listeners.local]
        bind = "unix:{sock_path}"
        socket_owner = "www-data"
        socket_mode = "0660"
        socket_dir_mode = "0750"

        [apps.probe]
        module = "tests.apps.probe:app"
        listeners = ["web"]
        chdir = "{REPO}"
        user = "www-data"

        [apps.other]
        module = "tests.apps.probe:app"
        listeners = ["local"]
        chdir = "{REPO}"
    """))
    config.chmod(0o600)
    os.chown(config, 33, 33)
    os.chown(private, 33, 33)
    log_path = tmp_path / "master.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all",
             sys.executable, "-m", "supervisor", "run", "-c", str(config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_for(lambda: proc.poll() is not None or log_path.read_text().count(") ready") >= 2,
                 timeout=30, message=lambda: f"two ready workers; log:\n{log_path.read_text()}")
        assert proc.poll() is None, log_path.read_text()
        status, _, body = wait_for(lambda: _get(port), timeout=10, message="the app on the low port")
        assert status == 200 and json.loads(body)["uid"] == 33
        assert sock_path.stat().st_uid == 33 and sock_path.parent.stat().st_uid == 33
        # A quick stop signals every worker, each under another uid (CAP_KILL).
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _get(port):
    try:
        return http_request(port, "/", timeout=5)
    except OSError:
        return None
