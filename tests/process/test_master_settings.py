"""[master] settings changed by a reload: applied live where that is possible, and
said plainly where they wait for `baton ctl upgrade` (a real master, real files)."""
from __future__ import annotations

import json

from conftest import free_port, get_json, wait_for
from test_operations import ctl, ops_config


def _pid_in(path):
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_a_reload_applies_live_master_settings_and_names_the_ones_that_wait(baton, port, tmp_path):
    first_pid, second_pid = tmp_path / "first.pid", tmp_path / "second.pid"
    first_ctl, second_ctl = tmp_path / "first.ctl", tmp_path / "second.ctl"
    health_port = free_port()

    def config(pidfile, control, health_line=""):
        return ops_config(port, workers=1, master_extra=(
            f'pidfile = "{pidfile}"\ncontrol_socket = "{control}"\n'
            f'crash_backoff_max = 7\n{health_line}'))

    master = baton(config(first_pid, first_ctl))
    master.wait_workers(1)
    master.wait_log("is watching for changes")
    assert _pid_in(first_pid) == master.pid
    master.config.write_text(config(second_pid, second_ctl, f'health = "127.0.0.1:{health_port}"')
                             .replace("graceful_timeout = 10", "graceful_timeout = 3"))
    master.wait_log("[master] health changed: takes effect after `baton ctl upgrade`")
    # Live: the pidfile moved, the control socket moved (and `baton ctl -c` finds it).
    wait_for(lambda: _pid_in(second_pid) == master.pid, message="the new pidfile")
    assert not first_pid.exists()
    assert second_ctl.exists() and not first_ctl.exists()
    result = ctl(master, "--json", "stats")
    assert result.returncode == 0, result.stderr
    assert "[master] pidfile changed: applied" in master.log()
    assert "[master] control_socket changed: applied" in master.log()
    assert "[master] graceful_timeout changed: applied" in master.log()
    # The health endpoint waits for an upgrade, and `ctl reload` says so.
    result = ctl(master, "--json", "reload")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["after_upgrade"] == ["health"]
    assert "takes effect after `baton ctl upgrade`" in answer["message"]
    assert get_json(port)["pid"]
