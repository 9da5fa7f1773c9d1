"""Tell systemd how the master is doing: the sd_notify(3) protocol, without libsystemd.

Promises: a `Notifier` never raises into the master for anything the system does: a
missing, full or vanished notify socket makes `send` return False, and nothing is
logged here. Without NOTIFY_SOCKET (not started by systemd, or Type= is not notify)
every call is a no-op that returns False. Each message is one datagram of
"KEY=VALUE" lines on a fresh AF_UNIX SOCK_DGRAM socket, as sd_notify does, so the
master holds no fd for this between messages and a fork never inherits one.

Only the master may notify (NotifyAccess=main): `scrub(environ)` removes what systemd
put in our environment once the master has read it, so workers and anything they run
never talk to systemd or mistake our sockets for theirs.
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import Mapping, MutableMapping

# What systemd hands a service; `scrub` removes it.
NOTIFY_SOCKET = "NOTIFY_SOCKET"
SYSTEMD_ENVIRON = (NOTIFY_SOCKET, "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

# A datagram to a full queue blocks its sender: bound how long the master may wait.
SEND_TIMEOUT_S = 0.5

_KEY = re.compile(r"[A-Z][A-Z0-9_]*")


class Notifier:
    """Sends state changes to the service manager at `address`, or nowhere if None.

    `address` is what `socket.sendto` takes for AF_UNIX: a filesystem path, or a
    name starting with NUL for Linux's abstract namespace. Build one from the
    environment with `from_environ`.
    """

    def __init__(self, address: str | bytes | None):
        self.address = address

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """NOTIFY_SOCKET as systemd sets it: "/abs/path" or "@abstract-name".

        Anything else (unset, empty, relative, or the "vsock:" form of systemd 254+
        that only VMs use) gives a notifier that sends nothing.
        """
        value = environ.get(NOTIFY_SOCKET, "")
        if value.startswith("/"):
            return cls(value)
        if value.startswith("@") and len(value) > 1:
            return cls("\0" + value[1:])
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send one message, e.g. `send(READY=1, STATUS="serving")`; True once it left.

        Keys are systemd's upper-case names (a wrong one is a bug and raises
        ValueError); values are written with str(), newlines flattened to spaces.
        """
        message = encode(fields)
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT_S)
                return sock.sendto(message, self.address) == len(message)
        except OSError:  # includes a timeout: the manager is gone or not reading
            return False

    def ready(self, status: str | None = None) -> bool:
        """Start-up finished, or a reload announced by `reloading()` did."""
        return self.send(READY=1, **_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts; `ready()` must follow when it is over, failed or not.

        MONOTONIC_USEC (CLOCK_MONOTONIC, microseconds) lets systemd 253+ match this
        message to the reload it asked for with Type=notify-reload; older ones ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        """A one-line status that `systemctl status` shows."""
        return self.send(STATUS=text)

    def mainpid(self, pid: int) -> bool:
        """Another process is the service's main process now (after an upgrade).

        With NotifyAccess=main only the current main process may say so.
        """
        return self.send(MAINPID=pid)


def encode(fields: Mapping[str, object]) -> bytes:
    """The datagram for `fields`, one "KEY=VALUE" line each, in the order given."""
    lines = []
    for key, value in fields.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"expected an upper-case sd_notify field name, found {key!r}")
        if isinstance(value, bool):
            value = int(value)
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode("utf-8", "replace")


def scrub(environ: MutableMapping[str, str] = os.environ) -> None:
    """Remove NOTIFY_SOCKET and LISTEN_* from `environ` (os.environ: also unsetenv)."""
    for name in SYSTEMD_ENVIRON:
        environ.pop(name, None)


def _status(status: str | None) -> dict[str, str]:
    return {} if status is None else {"STATUS": status}
