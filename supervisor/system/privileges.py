"""Resolve an app's user and group, and drop to them in a fixed order.

The order is the one that cannot go wrong: supplementary groups first (initgroups, so
root's groups never leak into the worker), then the gid, then the uid, and finally
proof that root cannot be regained. Any failure raises; the caller treats it as fatal.
"""
from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


class PrivilegeError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int


def resolve(user: str | None, group: str | None) -> Identity:
    """The identity to run as; user None means "stay who we are"."""
    if user is None:
        entry = pwd.getpwuid(os.geteuid())
    else:
        entry = _lookup_user(user)
    gid = entry.pw_gid if group is None else _lookup_group(group)
    return Identity(entry.pw_name, entry.pw_uid, gid)


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


def _lookup_user(user: str):
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"no such user {user!r}") from None


def _lookup_group(group: str) -> int:
    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(f"no such group {group!r}") from None
