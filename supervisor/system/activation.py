"""Socket activation: the listening sockets systemd opened and passed to us by name.

systemd binds what a .socket unit says (so the master never needs root for port 80),
starts the service with those sockets at fds 3, 4, ... and says so in the environment:
LISTEN_PID (the process they are for), LISTEN_FDS (how many) and LISTEN_FDNAMES (each
one's FileDescriptorName=, colon-separated). `parse_listen_env` reads that, decides
and touches nothing; `inherited` checks the fds and marks them close-on-exec, as
sd_listen_fds(3) does. A `bind = "systemd:NAME"` listener is then opened from the
mapping (`listeners.open_listener(..., inherited=...)`).

Promises, following libsystemd where it decides:
- LISTEN_PID unset or another process's: nothing was passed to us, not an error.
- LISTEN_PID or LISTEN_FDS that is not a plain decimal number, or LISTEN_FDNAMES
  with a different count of names than LISTEN_FDS: ActivationError, naming the
  variable, because the sockets cannot be told apart.
- LISTEN_FDNAMES unset: every fd is named "unknown" (as systemd names them); an
  empty name in the list is "unknown" too.
- Several fds with one name (one .socket unit with several Listen* lines shares its
  FileDescriptorName=): `by_name` keeps the first (the lowest fd, the first Listen*
  line); the others stay open, close-on-exec, unused.
"""
from __future__ import annotations

import fcntl
import os
from typing import Mapping

from supervisor.system.listeners import ListenerError

LISTEN_FDS_START = 3       # SD_LISTEN_FDS_START
UNKNOWN = "unknown"        # the name of an fd LISTEN_FDNAMES does not name
_MAX_FDS = 65536           # far above any fd limit: a larger count is garbage
_MAX_PID = 2**22           # the kernel's pid_max ceiling


class ActivationError(ListenerError):
    """systemd's LISTEN_* variables are meant for us but cannot be read or used."""


def parse_listen_env(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The (fd, name) pairs systemd passed to process `pid`, in fd order; [] if none."""
    if "LISTEN_PID" not in environ:
        return []
    if _number(environ, "LISTEN_PID", low=1, high=_MAX_PID) != pid:
        return []  # meant for another process: one that ran us without scrubbing it
    if "LISTEN_FDS" not in environ:
        return []
    count = _number(environ, "LISTEN_FDS", low=0, high=_MAX_FDS)
    text = environ.get("LISTEN_FDNAMES")
    if text is None:
        names = [UNKNOWN] * count
    else:
        names = text.split(":") if text or count else []
        if len(names) != count:
            raise ActivationError(f"LISTEN_FDNAMES={text!r} names {len(names)} sockets, "
                                  f"but LISTEN_FDS={count} were passed")
    return [(LISTEN_FDS_START + index, name or UNKNOWN) for index, name in enumerate(names)]


def by_name(pairs: list[tuple[int, str]]) -> dict[str, int]:
    """Name -> fd; of several fds with one name the first wins."""
    names: dict[str, int] = {}
    for fd, name in pairs:
        names.setdefault(name, fd)
    return names


def inherited(environ: Mapping[str, str] | None = None, pid: int | None = None) -> dict[str, int]:
    """The sockets systemd passed to this process, by name; {} when there are none.

    Every passed fd is marked close-on-exec, so nothing we exec inherits it; a passed
    fd that is not open is an ActivationError. Read this before anything else opens
    fds, then `sdnotify.scrub(os.environ)` so no child sees LISTEN_*. The fds stay
    open: the caller decides when (or whether) to close them.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid  # not a default argument: it must be read after any fork
    pairs = parse_listen_env(environ, pid)
    for fd, name in pairs:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={len(pairs)}: fd {fd} ({name!r}) was to be passed by systemd, "
                                  f"but {exc.strerror or exc}") from None
    return by_name(pairs)


def close(fds: Mapping[str, int]) -> None:
    """Close the fds `inherited` returned, once no listener will be opened from them."""
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


def _number(environ: Mapping[str, str], name: str, *, low: int, high: int) -> int:
    text = environ[name]
    # int() would also take " 3", "+3" and "3_0"; libsystemd's parser takes none of them.
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and low <= int(text) <= high):
        raise ActivationError(f"expected {name} to be a number from {low} to {high}, found {text!r}")
    return int(text)
