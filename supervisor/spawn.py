"""Fork a child with post-fork hygiene.

The child never returns into the parent's code: whatever happens, it leaves through
`os._exit` (as socketserver.ForkingMixIn does), so a stray exception can never run a
second copy of the master loop. Signal dispositions are reset and every fd the child
does not own is closed before the child's own code runs.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Callable, Iterable

# Signals the master catches; a child starts with the default disposition for each.
_RESET_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGWINCH,
    signal.SIGPIPE,
)


def fork(child_main: Callable[[], int | None], keep_fds: Iterable[int]) -> int:
    """Fork; in the parent return the child's pid, in the child run `child_main` and exit."""
    keep = frozenset(keep_fds) | {0, 1, 2}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in _RESET_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        close_fds_except(keep)
        status = child_main() or 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def close_fds_except(keep: frozenset[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own fd, already gone
