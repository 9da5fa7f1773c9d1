"""Resolve an app's user and group, and drop to them in a fixed order.

The order is the one that cannot go wrong: supplementary groups first (initgroups, so
root's groups never leak into the worker), then the gid, then the uid, and finally
proof that root cannot be regained. Any failure raises; the caller treats it as fatal.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from supervisor.system import users


class PrivilegeError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int


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
        os.initgroups(identity.name, identity.gid)
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

