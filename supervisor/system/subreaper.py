"""The master as a child subreaper, and the sweep that reaps the orphans it adopts.

A preloaded app's template forks each worker through a middle child that exits at
once, so that the worker is re-parented to its nearest subreaper ancestor: the master
(`prctl(PR_SET_CHILD_SUBREAPER)`), which then waits for it, signals it and outlives
it like any worker it forked itself. The price is that every orphan below the master
comes to it (a process an app's worker started and left behind); `reap_orphans`
collects those that have exited and that nobody watches, so none stays a zombie.
"""
from __future__ import annotations

import ctypes
import os

from supervisor.system import spawn

_PR_SET_CHILD_SUBREAPER = 36
_PIDFD_LINK = "anon_inode:[pidfd]"


def become() -> None:
    """Make this process a child subreaper (OSError if the kernel refuses)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_orphans() -> list[int]:
    """Reap every exited child of ours that no pidfd of ours watches, and return their
    pids. Whoever forked a child here holds a pidfd for it and reaps it itself (by
    pid), so only adopted orphans are taken; a single-threaded process's children are
    all listed under its main thread."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        return []
    exited = [pid for pid in children if _state(pid) == "Z"]
    if not exited:
        return []
    watched = _watched_pids()
    reaped = []
    for pid in exited:
        if pid not in watched and spawn.reap(pid, block=False) is not None:
            reaped.append(pid)
    return reaped


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def _watched_pids() -> set[int]:
    """The pids our pidfds refer to (fdinfo's "Pid:" line)."""
    pids = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != _PIDFD_LINK:
                continue
            with open(f"/proc/self/fdinfo/{name}") as f:
                for line in f:
                    if line.startswith("Pid:"):
                        pids.add(int(line.split()[1]))
        except (OSError, ValueError):
            continue   # closed meanwhile
    return pids
