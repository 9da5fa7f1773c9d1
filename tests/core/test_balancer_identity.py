"""Who the balancer runs as: an identity no app shares (issue #11, item 5).

An app's workers can signal whatever runs under their uid, so the balancer must not
share one with any app: by default (under root) it gets an id with no passwd or group
entry, which no app can have, and a config whose app runs as an explicitly chosen
`balancer_user` is refused where the problem is written.
"""
from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from supervisor.config.model import DEFAULT_USER, ConfigError
from supervisor.config.reader import from_mapping
from supervisor.system import privileges, users

ROOT = os.geteuid() == 0


def test_unused_id_has_no_entry_in_either_database_and_follows_its_seed():
    uid = users.unused_id("/etc/baton/baton.toml")
    assert uid in users.DYNAMIC_IDS
    assert users.user(uid) is None and users.group(uid) is None
    assert users.unused_id("/etc/baton/baton.toml") == uid           # the same config, the same id
    assert users.unused_id("/srv/other/baton.toml") != uid           # another master, most likely another


def test_balancer_identity_under_root_is_an_id_no_app_can_have():
    identity, why = privileges.balancer_identity(None, "/etc/baton/baton.toml", running_as_root=True)
    uid = users.unused_id("/etc/baton/baton.toml")
    assert identity == privileges.Identity(f"uid {uid}", uid, uid, known=False)
    assert why == "no app can run as it; set [master] balancer_user to choose"


def test_an_explicit_balancer_user_wins_and_without_root_it_is_the_master_s_own():
    identity, why = privileges.balancer_identity("www-data", "x", running_as_root=True)
    assert (identity.name, identity.uid, identity.known) == ("www-data", pwd.getpwnam("www-data").pw_uid, True)
    assert why == "set by [master] balancer_user"
    identity, why = privileges.balancer_identity(None, "x", running_as_root=False)
    assert identity.uid == os.geteuid() and why == "the master's own user: it is not root"


@pytest.mark.skipif(not ROOT, reason="dropping to another uid needs root")
def test_dropping_to_an_id_without_a_passwd_entry_leaves_no_groups():
    """A name-less id cannot go through initgroups: the drop clears the groups instead."""
    uid = users.unused_id("test-drop")
    code = ("import os; from supervisor.system import privileges as p; "
            f"p.drop(p.Identity('uid {uid}', {uid}, {uid}, known=False)); "
            "print(os.getresuid(), os.getresgid(), os.getgroups())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.split("\n")[0] == f"({uid}, {uid}, {uid}) ({uid}, {uid}, {uid}) []"


@pytest.mark.skipif(not ROOT, reason="switching effective ids needs root")
def test_unreadable_asks_the_kernel_as_that_identity(scratch):
    private, public = scratch / "private", scratch / "public"
    private.mkdir(mode=0o700)
    public.mkdir(mode=0o755)
    nobody = privileges.resolve("nobody", None)
    assert privileges.unreadable(nobody, [str(private), str(public)]) == [str(private)]
    assert (os.geteuid(), os.getegid()) == (0, 0)   # and back to root
    assert privileges.unreadable(privileges.resolve("root", None), [str(private)]) == []


# -- the config refuses an app that runs as the balancer's user --------------------------


def problems(master: dict, app: dict, running_as_root: bool = True) -> list[str]:
    data = {"master": master, "listeners": {"web": {"bind": "127.0.0.1:8000"}},
            "apps": {"blog": {"module": "blog:app", "listeners": ["web"], **app}}}
    try:
        from_mapping(data, "/etc/baton.toml", running_as_root=running_as_root, base_dir="/")
    except ConfigError as exc:
        return exc.problems
    return []


def clash(app_user: str, balancer_user: str) -> str:
    uid = pwd.getpwnam(app_user).pw_uid
    return (f"/etc/baton.toml: apps.blog.user: expected a user other than the balancer's: this app runs as "
            f"{{who}}, uid {uid}, the uid of [master] balancer_user = {balancer_user!r}, and could stop or "
            f"kill the balancer; give the app another user, or leave balancer_user unset (an id no app uses)")


@pytest.mark.parametrize("master, app, who, balancer", [
    # the default user of apps that name none
    ({"balancer_user": "nobody"}, {}, f"the default user {DEFAULT_USER!r} (no user is set)", "nobody"),
    ({"balancer_user": "www-data"}, {"user": "www-data"}, "'www-data'", "www-data"),
    # by uid on either side: it is the uid that matters
    ({"balancer_user": str(pwd.getpwnam("www-data").pw_uid)}, {"user": "www-data"}, "'www-data'",
     str(pwd.getpwnam("www-data").pw_uid)),
    ({"balancer_user": "www-data"}, {"user": str(pwd.getpwnam("www-data").pw_uid)},
     repr(str(pwd.getpwnam("www-data").pw_uid)), "www-data"),
], ids=["default nobody", "by name", "balancer by uid", "app by uid"])
def test_an_app_running_as_the_balancer_user_is_refused(master, app, who, balancer):
    app_user = "nobody" if not app else "www-data"
    assert problems(master, app) == [clash(app_user, balancer).format(who=who)]


@pytest.mark.parametrize("master, app, running_as_root", [
    ({}, {}, True),                                                     # the balancer's id is no app's
    ({"balancer_user": "www-data"}, {}, True),                          # the app runs as nobody
    ({"balancer_user": "nobody"}, {"user": "www-data"}, True),
    ({"balancer_user": pwd.getpwuid(os.geteuid()).pw_name}, {}, False),  # no root: one user for all
])
def test_apart_or_without_root_the_config_is_accepted(master, app, running_as_root):
    assert problems(master, app, running_as_root) == []
