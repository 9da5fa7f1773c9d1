"""The pidfile, written and removed by a master that may be root, in a directory other
users may write to: never through a symlink or FIFO someone planted there."""
from __future__ import annotations

import os
import signal
import stat

import pytest
from conftest import wait_for
from test_operations import ops_config


def _pid_in(path):
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.parametrize("target_exists", [True, False], ids=["to-a-file", "dangling"])
def test_a_symlink_planted_at_the_old_temporary_name_is_never_followed(baton, port, tmp_path, target_exists):
    pidfile = tmp_path / "baton.pid"
    target = tmp_path / "precious"
    if target_exists:
        target.write_text("precious\n")
    planted = tmp_path / "baton.pid.tmp"   # the name the master used to open(..., "w")
    planted.symlink_to(target)
    master = baton(ops_config(port, workers=1, master_extra=f'pidfile = "{pidfile}"'))
    wait_for(lambda: _pid_in(pidfile) == master.pid, message=lambda: f"the pidfile; log:\n{master.log()}")
    info = os.lstat(pidfile)
    umask = os.umask(0o022)
    os.umask(umask)                                   # the master's: it inherited ours
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o644 & ~umask
    if target_exists:
        assert target.read_text() == "precious\n"
    else:
        assert not os.path.lexists(target)
    assert os.readlink(planted) == str(target)          # left as it was
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".baton.pid")]  # no temp file left
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log()
    assert not os.path.lexists(pidfile)


@pytest.mark.parametrize("plant", ["fifo", "symlink"])
def test_at_exit_a_pidfile_swapped_for_a_fifo_or_a_symlink_is_left_alone(baton, port, tmp_path, plant):
    pidfile = tmp_path / "baton.pid"
    master = baton(ops_config(port, workers=1, master_extra=f'pidfile = "{pidfile}"'))
    master.wait_workers(1)
    wait_for(lambda: _pid_in(pidfile) == master.pid, message=lambda: f"the pidfile; log:\n{master.log()}")
    pidfile.unlink()
    target = tmp_path / "elsewhere"
    if plant == "fifo":
        os.mkfifo(pidfile)                       # opening it to read would block the master forever
    else:
        target.write_text(f"{master.pid}\n")     # "ours" only when read through the link
        pidfile.symlink_to(target)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log()
    if plant == "fifo":
        assert stat.S_ISFIFO(os.lstat(pidfile).st_mode)
    else:
        assert os.readlink(pidfile) == str(target) and target.read_text() == f"{master.pid}\n"
