"""Who a UNIX listener's socket file lets connect, by default and as configured (the
system's own user and group databases: www-data, nobody, nogroup exist here)."""
from __future__ import annotations

import grp
import pwd
from dataclasses import replace

import pytest

from supervisor.config.model import ListenerConfig
from supervisor.config.reader import BindAddress
from supervisor.system.listeners import ListenerError, socket_permissions

LOCAL = ListenerConfig("local", BindAddress("unix", path="/run/baton/web.sock"))
WWW = grp.getgrnam("www-data").gr_gid
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid

# (listener, master's euid) -> (mode, uid, gid); -1: the master's own
CASES = [
    ("root: www-data may connect, others not", LOCAL, 0, (0o660, -1, WWW)),
    ("not root: no group to give it, the directory chooses", LOCAL, 1000, (0o666, -1, -1)),
    ("a group set: 0660", replace(LOCAL, socket_group="nogroup"), 1000, (0o660, -1, NOGROUP)),
    ("a mode set keeps the default group", replace(LOCAL, socket_mode=0o600), 0, (0o600, -1, WWW)),
    ("all set, by name and id", replace(LOCAL, socket_mode=0o640, socket_owner="nobody", socket_group=str(NOGROUP)),
     0, (0o640, NOBODY, NOGROUP)),
]


@pytest.mark.parametrize(("listener", "euid", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_socket_permissions(listener, euid, expected) -> None:
    got = socket_permissions(listener, euid=euid)
    assert (got.mode, got.uid, got.gid) == expected and got.why


def test_a_user_gone_since_the_config_was_read_is_an_error() -> None:
    with pytest.raises(ListenerError, match="socket_owner 'no-such-user-x'"):
        socket_permissions(replace(LOCAL, socket_owner="no-such-user-x"), euid=0)
