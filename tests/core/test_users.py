"""One rule for naming a user or a group ("a name or a numeric id"), and every caller
that reads one agrees on it: the config reader, the privilege drop and the control
socket's allow-list. Lookups run against this system's own databases, which always
hold root (uid 0, gid 0) and daemon (uid 1, gid 1)."""
from __future__ import annotations

import os
import socket

import pytest

from supervisor.config.model import ConfigError
from supervisor.config.reader import from_mapping
from supervisor.master.control import peer_allowed
from supervisor.system import privileges, users

NO_SUCH = "no-such-user-or-group-x"


@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("1", 1),
    ("0001", 1),
    ("65534", 65534),
    ("99999999999999999999", 99999999999999999999),  # an id, if one no database holds
    (0, 0),
    (1000, 1000),
    ("root", None),
    ("www-data", None),
    ("", None),
    ("\u0661", None),       # ARABIC-INDIC DIGIT ONE: int() reads it, the rule does not
    ("\u00b2", None),       # SUPERSCRIPT TWO: str.isdigit() says yes
    ("-1", None),
    ("+1", None),
    (" 1", None),
    ("1 ", None),
    ("1e3", None),
    ("0x10", None),
])
def test_numeric_id(text, expected):
    assert users.numeric_id(text) == expected


# (text, the uid it names or None) -- the same rule for groups, below.
USERS = [
    ("root", 0),
    ("0", 0),
    ("daemon", 1),
    ("1", 1),
    ("01", 1),
    (1, 1),
    (NO_SUCH, None),
    ("54321", None),                 # a numeric id names a user only if the system knows it
    ("\u0661", None),                # not daemon: a name nobody has
    ("99999999999999999999", None),  # beyond uid_t: unknown, not OverflowError
    ("", None),
    ("a\0b", None),                  # no database holds a NUL: unknown, not ValueError
]

GROUPS = [
    ("root", 0),
    ("0", 0),
    ("daemon", 1),
    ("1", 1),
    (NO_SUCH, None),
    ("54321", None),
    ("\u0661", None),
    ("99999999999999999999", None),
    ("", None),
    ("a\0b", None),
]


@pytest.mark.parametrize("text, uid", USERS)
def test_user(text, uid):
    entry = users.user(text)
    assert (entry and entry.pw_uid) == uid


@pytest.mark.parametrize("text, gid", GROUPS)
def test_group(text, gid):
    entry = users.group(text)
    assert (entry and entry.gr_gid) == gid


# -- every caller follows the rule ------------------------------------------------


def _config_problems(master: dict | None = None, **app) -> list[str]:
    data = {"master": master or {}, "listeners": {"web": {"bind": "127.0.0.1:8000"}},
            "apps": {"blog": {"module": "blog:app", "listeners": ["web"], **app}}}
    try:
        from_mapping(data, None, running_as_root=True, base_dir="/")
    except ConfigError as exc:
        return exc.problems
    return []


def _texts(cases):
    """The cases a config can hold: non-empty strings without NUL (TOML has no other)."""
    return [(text, known) for text, known in cases if isinstance(text, str) and text and "\0" not in text]


@pytest.mark.parametrize("text, uid", _texts(USERS))
def test_callers_agree_on_users(text, uid):
    known = uid is not None
    assert (not _config_problems(user=text)) == known
    assert (not _config_problems(master={"admins": [text]})) == known
    if known:
        assert privileges.resolve(text, None).uid == uid
    else:
        with pytest.raises(privileges.PrivilegeError):
            privileges.resolve(text, None)
    # An admins entry lets in exactly the user it names (daemon, here).
    assert peer_allowed(1, 1, (text,), master_uid=0) == (uid == 1)


@pytest.mark.parametrize("text, gid", _texts(GROUPS))
def test_callers_agree_on_groups(text, gid):
    known = gid is not None
    assert (not _config_problems(group=text)) == known
    assert (not _config_problems(master={"admins": [f"@{text}"]})) == known
    if known:
        assert privileges.resolve("root", text).gid == gid
    else:
        with pytest.raises(privileges.PrivilegeError):
            privileges.resolve("root", text)
    # An "@group" entry lets in a member of exactly that group (daemon is in daemon only).
    assert peer_allowed(1, 1, (f"@{text}",), master_uid=0) == (gid == 1)


def test_peer_credentials_are_the_kernels_word():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert users.peer_credentials(left) == (os.getpid(), os.getuid(), os.getgid())
        pid, uid, gid = users.peer_credentials(right)
        assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_an_admins_id_the_system_does_not_know_lets_nobody_in():
    # The config refuses such an entry; one whose user was deleted since is skipped.
    assert users.user("54321") is None
    assert not peer_allowed(54321, 54321, ("54321",), master_uid=0)
    assert not peer_allowed(54321, 54321, ("@54321",), master_uid=0)
