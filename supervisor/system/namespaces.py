"""The Linux namespaces an app's workers may run in (`isolate` in its [apps.NAME] table).

`enter(names)` moves the calling process into a new, empty namespace of each kind it
names, with one `unshare(2)`; every process it forks afterwards inherits them. It must
run in the forked child while it is still root (the kernel asks for CAP_SYS_ADMIN in
the initial user namespace) and single-threaded, before the privilege drop.

"network": a network namespace with nothing in it, not even a loopback that is up, so
no connection can be opened from it (no outbound request, nothing reachable on the
host's 127.0.0.1). Sockets made before the unshare (the listeners the master bound, the
channels connections arrive on) stay in the namespace they were made in and keep
working: a socket belongs to the namespace of its creation, not of its holder.
"""
from __future__ import annotations

import ctypes
import errno
import os

_CLONE_NEWNET = 0x40000000   # os.CLONE_NEWNET from Python 3.12 on

# The names `isolate` accepts, each with its unshare flag and what it means to the app.
FLAGS = {"network": _CLONE_NEWNET}
MEANS = {"network": "an empty network namespace: no outbound connections, not even to the host's 127.0.0.1"}
NAMES = tuple(FLAGS)


# What to do about each way unshare fails (EPERM also stands for any other).
_REMEDY = {
    errno.EPERM: "the master must run as root with CAP_SYS_ADMIN (a container may withhold it: "
                 "grant it, or remove isolate)",
    errno.ENOSPC: "the limit on namespaces is reached (/proc/sys/user/max_net_namespaces)",
    errno.EUSERS: "the limit on namespaces is reached (/proc/sys/user/max_net_namespaces)",
    errno.EINVAL: "this kernel was built without network namespaces (CONFIG_NET_NS): remove isolate",
    errno.ENOMEM: "the kernel is out of memory",
}


class IsolationError(Exception):
    """The namespaces could not be made; the message says which, why, and what to do."""


def enter(names: tuple[str, ...]) -> None:
    """Unshare a new namespace of each kind in `names` (none: do nothing). Raises
    IsolationError."""
    if not names:
        return
    flags = 0
    for name in names:
        flags |= FLAGS[name]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise IsolationError(
            f"could not create a new {_kinds(names)} namespace (isolate = {_written(names)}): "
            f"unshare failed: {os.strerror(code)}; {_REMEDY.get(code, _REMEDY[errno.EPERM])}")


def boot_line(app_name: str, names: tuple[str, ...]) -> str:
    """The master's log line saying what `isolate` means for the app's workers."""
    means = "; ".join(MEANS[name] for name in names)
    return f"app {app_name!r}: workers run in {means} (isolate = {_written(names)})"


def _kinds(names: tuple[str, ...]) -> str:
    return " and ".join(names)


def _written(names: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{name}"' for name in names) + "]"
