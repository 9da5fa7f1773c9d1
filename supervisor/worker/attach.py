"""`baton worker --attach PATH module:app`: a worker started by someone else.

Any process that may connect to an app's attach socket (its file's permissions, then
the master's `attach_allow` check of SO_PEERCRED) can serve that app: another
container sharing the socket's volume, a systemd service, a shell. It runs with its
own Python, its own code and its own user; it never needs root.

It introduces itself (INTRODUCE: the app, its pid, a version tag), and the master
answers WELCOME with its settings (the spec a forked worker would get, less the app's
environment and paths: see `master.attaching`) and its channels, or REFUSAL with why.
From then on it is a worker like the others (`worker.process.main`): READY, heartbeats
and figures go to the master over the same socket, connections come from the balancer.
Its exit is seen by the master (the socket ends) and by the balancers (its life line
ends), wherever it runs; it exits when the master's end closes.
"""
from __future__ import annotations

import json
import os
import socket
import sys

from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import MessageError
from supervisor.system import log as log_mod
from supervisor.worker import entry, process

EXIT_REFUSED = 2
WELCOME_TIMEOUT_S = 30.0


class AttachError(Exception):
    """Why this process cannot serve (printed, exit status EXIT_REFUSED)."""


def introduce(path: str, tag: str, app: str = "") -> tuple[socket.socket, messages.Welcome, list[int]]:
    """Connect to the attach socket at `path` and introduce ourselves; the channel, the
    WELCOME and its fds. Raises AttachError, naming what went wrong."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise AttachError(f"cannot connect to the attach socket {path}: {exc.strerror or exc}") from None
    try:
        sock.settimeout(WELCOME_TIMEOUT_S)
        try:
            channel.send(sock, messages.Introduce(app=app, pid=os.getpid(), tag=tag))
        except (BrokenPipeError, ConnectionResetError):
            pass   # a peer refused at once: its REFUSAL waits to be read
        message, fds = channel.receive(sock)
    except ChannelClosed:
        sock.close()
        raise AttachError(f"the master at {path} closed the connection without an answer") from None
    except ValueError as exc:   # MessageError is one: ours is a bad tag, theirs a bad answer
        sock.close()
        if isinstance(exc, MessageError):
            raise AttachError(f"no welcome from the master at {path}: {exc}") from None
        raise AttachError(str(exc)) from None
    except OSError as exc:
        sock.close()
        raise AttachError(f"no welcome from the master at {path}: {exc}") from None
    if type(message) is messages.Refusal:
        sock.close()
        raise AttachError(f"the master at {path} refused this worker: {message.reason}")
    if type(message) is not messages.Welcome:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise AttachError(f"the master at {path} sent {message.KIND}, not a welcome")
    return sock, message, fds


def spec_from(sock: socket.socket, welcome: messages.Welcome, fds: list[int], module: str,
              cwd: str) -> process.WorkerSpec:
    """The WorkerSpec the welcome describes, over this process's own fds: `sock` as the
    master channel, the balancer channels that came with it, the app named `module`
    imported from `cwd`."""
    memfd, life, *rest = fds
    access_fd = rest.pop(0) if welcome.access else -1
    with open(memfd, "rb") as f:
        payload = json.load(f)
    spec = entry.decode_spec(payload["spec"])
    spec.channel = sock
    spec.balancers = tuple(socket.socket(fileno=fd) for fd in rest)
    spec.app.module = module
    spec.app.pythonpath = (cwd,)
    spec.log_fds = (-1, access_fd)
    spec.life_fd = life   # held, never read: its end is how the balancers see our exit
    return spec


def main(path: str, module: str, tag: str, app: str = "") -> int:
    try:
        sock, welcome, fds = introduce(path, tag, app)
    except AttachError as exc:
        print(f"baton worker: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    spec = spec_from(sock, welcome, fds, module, os.getcwd())
    sock.settimeout(None)
    access_fd = spec.log_fds[1] if spec.log_fds[1] >= 0 else None
    spec.logs = log_mod.worker_logs(spec.log_level, spec.log_format, spec.access_log_format, access_fd)
    spec.logs.error.info("attached to %s as worker %d of app %s (tag %r)", path, welcome.key, spec.app.name, tag)
    return process.main(spec)
