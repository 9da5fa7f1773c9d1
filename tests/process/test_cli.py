"""The command line as a user runs it: check, --version, --help, serve."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, get_json, wait_for

from supervisor import __version__


def baton(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, **kwargs)


def test_version():
    result = baton("--version")
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
