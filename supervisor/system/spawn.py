"""Fork a child with post-fork hygiene, and reap it.

The child never returns into the parent's code: whatever happens, it leaves through
`os._exit` (as socketserver.ForkingMixIn does), so a stray exception can never run a
second copy of the master loop. Signal dispositions are reset and every fd the child
does not own is closed before the child's own code runs.

Everything the child inherited is frozen out of its garbage collector's reach
(`gc.freeze`, which only splices lists): a collection would otherwise write to the
header of every inherited object, and so turn each page it shares with the parent into
a copy of its own (about 6 MB for a fork of the master).

`reap` is the one place a child's exit is collected (`waitpid`), for forked and
posix_spawn'ed children alike. `exec_python` replaces a forked child with a fresh
interpreter started the way this one was, so that it holds nothing of ours.
"""
from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import traceback
from typing import Callable, Iterable

_PR_SET_PDEATHSIG = 1

# Signals the master catches; a child starts with the default disposition for each.
_RESET_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGWINCH,
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
        gc.freeze()
        signal.set_wakeup_fd(-1)
        for signum in _RESET_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # As Python itself starts: a write to a vanished client must raise EPIPE in
        # the code that wrote, never kill the process.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        close_fds_except(keep)
        status = child_main() or 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        exit_now(status)


def reap(pid: int, *, block: bool) -> int | None:
    """Collect child `pid`'s exit: its wait status (read it with `os.waitstatus_to_exitcode`).

    None when there is nothing to collect: the child is still running (only without
    `block`), or `pid` is not our child any more (someone collected it already: ECHILD)
    and its status is lost. Neither raises: the caller only wanted the child gone.
    """
    try:
        reaped, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return None
    return status if reaped else None


def close_fds_except(keep: frozenset[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own fd, already gone


def interpreter_flags() -> list[str]:
    """The command-line options this interpreter runs with that a new one must get to
    behave alike (isolation, site, optimisation, warnings, -X options)."""
    flags = sys.flags
    args = []
    if flags.isolated:
        args.append("-I")
    else:
        if flags.ignore_environment:
            args.append("-E")
        if flags.no_user_site:
            args.append("-s")
        if getattr(flags, "safe_path", False):
            args.append("-P")
    if flags.no_site:
        args.append("-S")
    if flags.optimize:
        args.append("-" + "O" * flags.optimize)
    if flags.dont_write_bytecode:
        args.append("-B")
    if flags.bytes_warning:
        args.append("-" + "b" * flags.bytes_warning)
    args.extend(f"-W{option}" for option in sys.warnoptions)
    for name, value in sys._xoptions.items():
        args.append(f"-X{name}" if value is True else f"-X{name}={value}")
    return args


def exec_python(code: str, args: list[str], env: dict[str, str], keep_fds: Iterable[int]) -> None:
    """Become `python -c code *args` (this interpreter, with `interpreter_flags()`) in
    environment `env`, keeping exactly `keep_fds` and 0-2 open across the exec (every
    other fd of ours is close-on-exec). Returns only by raising OSError."""
    for fd in keep_fds:
        os.set_inheritable(fd, True)
    os.execve(sys.executable, [sys.executable, *interpreter_flags(), "-c", code, *args], env)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL us when the parent dies, so nothing is ever orphaned.

    setuid() clears the death signal, so call this after any privilege drop; the
    parent may have died before we asked, hence the check afterwards.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        raise RuntimeError("the parent exited while this child was starting")


def exit_now(status: int) -> None:
    """Leave a forked child at once, as `fork`'s children do: what it printed is
    flushed, and nothing of the parent's (atexit, finalizers) runs."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def signal_pidfd(pidfd: int, signum: int) -> bool:
    """Send `signum` through `pidfd`; False if the process is gone already."""
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        return False
    return True
