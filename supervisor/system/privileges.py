"""Resolve who a child runs as (an app's user and group, the balancer's own identity),
and drop to it in a fixed order.

The order is the one that cannot go wrong: supplementary groups first (initgroups, so
root's groups never leak into the worker; none at all for an id without a passwd
entry), then the gid, then the uid, and finally proof that root cannot be regained.
Any failure raises; the caller treats it as fatal.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from supervisor.system import users


class PrivilegeError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    name: str           # the user's name; for an id the system does not know, "uid N"
    uid: int
    gid: int
    known: bool = True  # has a passwd entry (its groups come from initgroups); else no groups


def balancer_identity(balancer_user: str | None, seed: str, running_as_root: bool) -> tuple[Identity, str]:
    """Who the balancer runs as, and why (for the log).

    `[master] balancer_user` when set; without root, the master's own user (nothing
    else is possible); else an id no app can share (`users.unused_id(seed)`, uid and
    gid alike): apps run as users the system knows, and whoever shares the balancer's
    uid can stop or kill it. The balancer opens no file and looks no name up (every fd
    comes from the master), so an id without a passwd entry is all it needs.
    """
    if balancer_user is not None:
        return resolve(balancer_user, None), "set by [master] balancer_user"
    if not running_as_root:
        return resolve(None, None), "the master's own user: it is not root"
    uid = users.unused_id(seed)
    if uid is None:
        raise PrivilegeError(f"no free id in {users.DYNAMIC_IDS.start}-{users.DYNAMIC_IDS.stop - 1} for the "
                             f"balancer: set [master] balancer_user")
    return (Identity(f"uid {uid}", uid, uid, known=False),
            "no app can run as it; set [master] balancer_user to choose")


def unreadable(identity: Identity, paths: list[str]) -> list[str]:
    """Those of `paths` (directories) that `identity` could not list, judged by the
    kernel itself: the effective ids are switched to it for the check, then back.
    Only root can switch; without root nothing is judged unreadable here. The caller
    must be single-threaded (the ids are the whole process's)."""
    if os.geteuid() != 0 or identity.uid == 0:
        return []
    saved_groups, saved_gid = os.getgroups(), os.getegid()
    groups = os.getgrouplist(identity.name, identity.gid) if identity.known else []
    try:
        os.setgroups(groups)
        os.setegid(identity.gid)
        os.seteuid(identity.uid)
        return [path for path in paths
                if not os.access(path, os.R_OK | os.X_OK, effective_ids=True)]
    finally:
        os.seteuid(0)
        os.setegid(saved_gid)
        os.setgroups(saved_groups)


def resolve(user: str | None, group: str | None) -> Identity:
    """The identity to run as; user None means "stay who we are". `user` and `group`
    are names or numeric ids (`users`' rule); either one unknown is a PrivilegeError."""
    entry = users.user(os.geteuid() if user is None else user)
    if entry is None:
        raise PrivilegeError(f"no such user {user!r}" if user is not None
                             else f"this process's uid {os.geteuid()} has no passwd entry")
    if group is None:
        return Identity(entry.pw_name, entry.pw_uid, entry.pw_gid)
    group_entry = users.group(group)
    if group_entry is None:
        raise PrivilegeError(f"no such group {group!r}")
    return Identity(entry.pw_name, entry.pw_uid, group_entry.gr_gid)


def drop(identity: Identity) -> None:
    if os.geteuid() != 0:
        if (identity.uid, identity.gid) != (os.geteuid(), os.getegid()):
            raise PrivilegeError(f"cannot switch to {identity.name}: not running as root")
        return
    try:
        if identity.known:
            os.initgroups(identity.name, identity.gid)
        else:
            os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {identity.name} (uid {identity.uid}, gid {identity.gid}): {exc}") from None
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError(f"regained root after switching to {identity.name}")

