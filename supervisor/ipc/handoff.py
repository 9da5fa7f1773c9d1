"""Master upgrade: the running master hands every listening socket to a new one.

The conversation runs over one SOCK_SEQPACKET connection (a socketpair when the old
master starts the new one for SIGUSR2 / `baton ctl upgrade`; the old master's takeover
socket for `baton run --takeover PATH`):

    new -> old  TAKEOVER {pid}
    old -> new  SOCKETS  {names}           + one fd per name
    new -> old  TAKEN    {pid}             + the end of a channel to the new balancer
    old -> new  RELEASED {}

Only after TAKEN (the new master's apps are all READY) does the old master let go: it
closes its control socket, tells systemd the new MAINPID, answers RELEASED, and drains,
its workers' idle keep-alive connections travelling to the new balancer through the
channel that came with TAKEN. If the new master dies or goes quiet before TAKEN, the old
one simply keeps serving.
"""
from __future__ import annotations

import os
import socket
import sys

from supervisor.ipc import channel
from supervisor.ipc.messages import MessageError, Sockets, Takeover

LISTENER = "listener:"    # listener:NAME
REUSEPORT = "reuseport:"  # reuseport:LISTENER:APP:INDEX
HEALTH = "health"


class HandoffError(Exception):
    pass


def socket_names(sockets: dict[str, socket.socket], reuseport: dict[tuple[str, str, int], socket.socket],
                 health: socket.socket | None) -> tuple[list[str], list[int]]:
    names, fds = [], []
    for name, sock in sockets.items():
        names.append(LISTENER + name)
        fds.append(sock.fileno())
    for (listener, app, index), sock in reuseport.items():
        names.append(f"{REUSEPORT}{listener}:{app}:{index}")
        fds.append(sock.fileno())
    if health is not None:
        names.append(HEALTH)
        fds.append(health.fileno())
    return names, fds


def adopt(names: list[str] | tuple[str, ...], fds: list[int]):
    """Split received sockets back into (listeners by name, reuseport by key, health);
    a socket whose name is none of those is closed."""
    listeners, reuseport, health = {}, {}, None
    for name, fd in zip(names, fds):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        key = _reuseport_key(name)
        if name.startswith(LISTENER):
            listeners[name[len(LISTENER):]] = sock
        elif key is not None:
            reuseport[key] = sock
        elif name == HEALTH:
            health = sock
        else:
            sock.close()
    return listeners, reuseport, health


def _reuseport_key(name: str) -> tuple[str, str, int] | None:
    """(listener, app, index) from "reuseport:LISTENER:APP:INDEX", else None."""
    if not name.startswith(REUSEPORT):
        return None
    parts = name[len(REUSEPORT):].rsplit(":", 2)
    if len(parts) != 3 or not parts[2].isdecimal() or not parts[2].isascii():
        return None
    return parts[0], parts[1], int(parts[2])


def connect(spec: str) -> socket.socket:
    """The new master's end: `fd://N` (inherited) or the path of a takeover socket."""
    if spec.startswith("fd://"):
        sock = socket.socket(fileno=int(spec[len("fd://"):]))
        sock.set_inheritable(False)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(spec)
    except OSError as exc:
        sock.close()
        raise HandoffError(f"cannot reach the running master's takeover socket {spec}: {exc.strerror}") from None
    return sock


def receive_sockets(sock: socket.socket, timeout_s: float):
    """New master: announce ourselves and take the running master's sockets."""
    sock.settimeout(timeout_s)
    channel.send(sock, Takeover(os.getpid()))
    try:
        message, fds = channel.receive(sock)
    except (OSError, channel.ChannelClosed, MessageError) as exc:
        raise HandoffError(f"the running master did not hand over its sockets: {exc}") from None
    if type(message) is not Sockets:  # its fds, one per name, are checked by receive
        for fd in fds:
            os.close(fd)
        raise HandoffError(f"unexpected answer from the running master: {message.KIND}")
    sock.setblocking(False)
    return adopt(message.names, fds)


def spawn_successor(config_path: str, channel_end: socket.socket, notify_socket) -> int:
    """Old master: start the installed code as a new master that takes over from us."""
    fd = channel_end.fileno()
    os.set_inheritable(fd, True)
    env = dict(os.environ)
    if notify_socket:
        # Scrubbed from our environment at start; the new master needs it back, in
        # systemd's spelling ("@name" for an abstract socket).
        env["NOTIFY_SOCKET"] = "@" + notify_socket[1:] if notify_socket.startswith("\0") else notify_socket
    argv = [sys.executable, "-m", "supervisor", "run", "-c", config_path, "--takeover", f"fd://{fd}"]
    try:
        return os.posix_spawn(sys.executable, argv, env)
    finally:
        os.set_inheritable(fd, False)
