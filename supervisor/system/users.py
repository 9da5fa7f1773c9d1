"""Who is who: the user and group databases, and the kernel's word on a socket's peer.

One rule names a user or a group everywhere Baton reads one (an app's `user` and
`group`, `[master] admins`, the privilege drop, the control socket's allow-list): an
int, or a string of ASCII digits, is a numeric id; any other string is a name. Either
way the system must know it: an id without a passwd or group entry names nobody.

Lookups never raise. An unknown name or id, and text no database can hold (an empty
string, a NUL byte, an id beyond what uid_t holds), all answer None, so every caller
decides in one place what "unknown" means to it.
"""
from __future__ import annotations

import grp
import pwd
import socket
import struct
import zlib
from typing import NamedTuple

_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid

# The ids systemd hands out for DynamicUser=: no distribution puts accounts there.
DYNAMIC_IDS = range(61184, 65520)


def numeric_id(name_or_id: int | str) -> int | None:
    """The id `name_or_id` spells (an int, or ASCII digits only), or None for a name.

    Only ASCII digits count: "١٢" (Arabic-Indic digits, which int() would read) and
    " 12", "+12", "-1" are names, which no database is likely to hold.
    """
    if isinstance(name_or_id, int):
        return name_or_id
    return int(name_or_id) if name_or_id.isascii() and name_or_id.isdigit() else None


def user(name_or_id: int | str) -> pwd.struct_passwd | None:
    """The passwd entry for a user name or uid, or None when the system knows none."""
    return _entry(pwd.getpwnam, pwd.getpwuid, name_or_id)


def group(name_or_id: int | str) -> grp.struct_group | None:
    """The group entry for a group name or gid, or None when the system knows none."""
    return _entry(grp.getgrnam, grp.getgrgid, name_or_id)


def _entry(by_name, by_id, name_or_id: int | str):
    number = numeric_id(name_or_id)
    try:
        return by_name(name_or_id) if number is None else by_id(number)
    except (KeyError, OverflowError, ValueError):  # unknown; a NUL; beyond uid_t / gid_t
        return None


def unused_id(seed: str) -> int | None:
    """An id in DYNAMIC_IDS that is neither a uid nor a gid of this system's databases,
    or None when every one is taken.

    The search starts at a place derived from `seed` (say, a config file's path), so
    the same seed gets the same id while the databases stay as they are, and two
    seeds (two masters on one machine) most likely get different ones. An id with no
    passwd entry is one no app can run as: an app's user must be one the system knows.
    """
    start = zlib.crc32(seed.encode("utf-8", "surrogateescape")) % len(DYNAMIC_IDS)
    for offset in range(len(DYNAMIC_IDS)):
        candidate = DYNAMIC_IDS[(start + offset) % len(DYNAMIC_IDS)]
        if user(candidate) is None and group(candidate) is None:
            return candidate
    return None


class PeerCredentials(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Who connected to a UNIX socket, as the kernel saw it at connect() (SO_PEERCRED).

    Nothing the peer says can change this answer, which is why it decides who may ask.
    Raises OSError if the socket has no peer.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))
