"""Master upgrade, both sides of it (the protocol is in `supervisor.ipc.handoff`).

`Predecessor` is the new master's view of the master it takes over from: take its
sockets at start, say TAKEN once every app is READY (with a channel to our balancer,
for the idle connections its workers hand back), and hear RELEASED. `Successors` is
the running master's side: start a new master (SIGUSR2, `baton ctl upgrade`) or
accept one on the takeover socket, hand it every socket, and let go once it says
TAKEN. A new master that dies, or goes away before TAKEN, leaves this one serving.

With several balancers on either side, TAKEN still carries one channel (its bytes
cross releases): to the new master's balancer 0. Every old balancer gets it as its
UPSTREAM (a SEQPACKET record is one message, so they can share it), and the new
balancer 0 passes what they hand over to the new workers like any connection.
"""
from __future__ import annotations

import os
import signal
import socket
import stat
from dataclasses import dataclass
from typing import Callable

from supervisor.ipc import channel, handoff, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import MessageError
from supervisor.master.balancer_handle import BalancerHandle, Balancers
from supervisor.master.pool import describe_status
from supervisor.master.sockets import Sockets
from supervisor.system import spawn, users
from supervisor.system.loop import Loop
from supervisor.system.sdnotify import Notifier
from supervisor.system.words import count as counted

TAKEOVER_SUFFIX = ".takeover"


class Predecessor:
    """The new master's link to the master it takes over from."""

    def __init__(self, loop: Loop, log, spec: str, on_released: Callable[[], None]):
        self.loop = loop
        self.log = log
        self.spec = spec
        self.on_released = on_released
        self.sock: socket.socket | None = None

    def take_sockets(self, sockets: Sockets, config, timeout_s: float) -> None:
        self.sock = handoff.connect(self.spec)
        listening, reuseport, health = handoff.receive_sockets(self.sock, timeout_s)
        sockets.adopt(config, listening, reuseport, health)
        self.log.info("took %s over from the running master", counted(len(listening) + len(reuseport), "socket"))

    def taken(self, balancer: BalancerHandle) -> None:
        """Every app is READY: give the old master a channel to our balancer, for the
        idle keep-alive connections its workers will hand back."""
        ours, theirs = channel.pair()
        try:
            balancer.send(messages.Attach(key=-1, app=""), [ours.fileno()])
            channel.send(self.sock, messages.Taken(pid=os.getpid()), [theirs.fileno()])
        except OSError as exc:
            self.log.error("could not tell the old master we are ready: %s", exc)
        finally:
            ours.close()
            theirs.close()
        self.loop.register(self.sock, self._on_message)

    def _on_message(self) -> None:
        try:
            message, fds = channel.receive(self.sock)
        except BlockingIOError:
            return
        except (ChannelClosed, ConnectionError, MessageError):
            message, fds = messages.Released(), []   # it is gone: nothing left to wait for
        for fd in fds:
            os.close(fd)
        if type(message) is not messages.Released:
            return
        self.close()
        self.on_released()

    def close(self) -> None:
        if self.sock is not None:
            if self.loop.registered(self.sock):
                self.loop.unregister(self.sock)
            self.sock.close()
            self.sock = None


@dataclass
class _Successor:
    channel: socket.socket
    pid: int | None
    pidfd: int
    taken: bool = False
    failed: bool = False


class Successors:
    """The running master's side: at most one new master at a time."""

    def __init__(self, loop: Loop, log, sockets: Sockets, balancers: Balancers, notifier: Notifier,
                 on_taken: Callable[[int | None], None]):
        self.loop = loop
        self.log = log
        self.sockets = sockets
        self.balancers = balancers
        self.notifier = notifier
        self.on_taken = on_taken          # (the new master's pid): let go of the control socket, drain
        self.current: _Successor | None = None
        self.listener: socket.socket | None = None
        self.accepting = True             # False once this master stops

    def start(self, config_path: str) -> dict:
        """SIGUSR2 / `baton ctl upgrade`: start the installed code as a new master."""
        if self.current is not None:
            return {"ok": False, "errors": ["an upgrade is already under way"]}
        ours, theirs = channel.pair()
        try:
            pid = handoff.spawn_successor(config_path, theirs, self.notifier.address)
        except OSError as exc:
            ours.close()
            return {"ok": False, "errors": [f"cannot start a new master: {exc}"]}
        finally:
            theirs.close()
        self._adopt(ours, pid)
        self.log.info("upgrade: new master (pid %d) is booting; this one keeps serving until it is ready", pid)
        return {"ok": True, "message": f"new master pid {pid} is booting"}

    def _adopt(self, sock: socket.socket, pid: int | None) -> None:
        sock.setblocking(False)
        successor = _Successor(sock, pid, os.pidfd_open(pid) if pid else -1)
        self.current = successor
        self.loop.register(sock, self._on_message)
        if successor.pidfd >= 0:
            self.loop.register(successor.pidfd, self._reap)

    def _on_message(self) -> None:
        successor = self.current
        try:
            message, fds = channel.receive(successor.channel)
        except BlockingIOError:
            return
        except (ChannelClosed, ConnectionError, MessageError) as exc:
            if not successor.taken:
                self._failed(f"the new master went away ({exc.__class__.__name__})")
            else:
                self.loop.unregister(successor.channel)
                successor.channel.close()
            return
        kind = type(message)
        if kind is messages.Takeover:
            for fd in fds:
                os.close(fd)
            if successor.pid is None:   # came through the takeover socket
                successor.pid = message.pid
            names, socket_fds = handoff.socket_names(self.sockets.listening, self.sockets.reuseport,
                                                     self.sockets.health)
            channel.send(successor.channel, messages.Sockets(names=tuple(names)), socket_fds)
        elif kind is messages.Taken:
            self._release_to(successor, fds[0])
        else:
            for fd in fds:
                os.close(fd)

    def _release_to(self, successor: _Successor, upstream_fd: int) -> None:
        successor.taken = True
        try:
            self.balancers.send_all(messages.Upstream(), [upstream_fd])
        finally:
            os.close(upstream_fd)
        self.close_listener()
        if successor.pid:
            self.notifier.mainpid(successor.pid)
        # Let go of the control socket before saying RELEASED: the new master binds
        # the same path as soon as it hears it, and our close would unlink its file.
        self.on_taken(successor.pid)
        channel.send(successor.channel, messages.Released())
        self.log.info("upgrade: the new master (pid %s) took over; draining into it", successor.pid)

    def _reap(self) -> None:
        successor = self.current
        self.loop.unregister(successor.pidfd)
        os.close(successor.pidfd)
        successor.pidfd = -1
        status = spawn.reap(successor.pid, block=False)
        if not successor.taken:
            self._failed(f"the new master exited ({describe_status(status)})")

    def _failed(self, why: str) -> None:
        successor = self.current
        if not successor.failed:
            successor.failed = True
            self.log.error("upgrade failed: %s; this master keeps serving", why)
            self.notifier.status(f"upgrade failed: {why}")
            self.loop.unregister(successor.channel)
            successor.channel.close()
            if successor.pid and successor.pidfd >= 0:
                # It may still be alive but stuck: a failed upgrade must not linger.
                signal.pidfd_send_signal(successor.pidfd, signal.SIGTERM)
        if successor.pidfd < 0:   # reaped (or never ours to reap): done with it
            self.current = None

    # -- the takeover socket: a new master started by anyone may take over here -------

    def open_listener(self, control_path: str) -> None:
        path = control_path + TAKEOVER_SUFFIX
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)
        try:
            if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
            listening.bind(path)
        except OSError as exc:
            listening.close()
            self.log.warning("no takeover socket at %s: %s", path, exc)
            return
        finally:
            os.umask(old_umask)
        listening.listen(1)
        listening.setblocking(False)
        self.listener = listening
        self.loop.register(listening, self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        uid = users.peer_credentials(sock).uid
        if uid not in (0, os.geteuid()) or self.current is not None or not self.accepting:
            self.log.warning("takeover refused (uid %d)", uid)
            sock.close()
            return
        self.log.info("upgrade: a new master connected to the takeover socket")
        self._adopt(sock, None)

    def close_listener(self) -> None:
        if self.listener is not None:
            path = self.listener.getsockname()
            self.loop.unregister(self.listener)
            self.listener.close()
            self.listener = None
            try:
                os.unlink(path)
            except OSError:
                pass

    def close(self) -> None:
        self.close_listener()
        successor = self.current
        if successor is not None:
            if successor.channel.fileno() >= 0:
                if self.loop.registered(successor.channel):
                    self.loop.unregister(successor.channel)
                successor.channel.close()
            if successor.pidfd >= 0:
                os.close(successor.pidfd)
            self.current = None
