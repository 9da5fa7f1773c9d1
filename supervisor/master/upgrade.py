"""Master upgrade, both sides of it (the protocol is in handoff.py).

A mixin of `Master` (see master.py): the old master starts or accepts a new one,
hands it every listening socket, and drains into it once it is ready; the new
master takes the sockets, boots, and says TAKEN.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
from dataclasses import dataclass

from supervisor.ipc import channel, handoff
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    ATTACH,
    RELEASED,
    SOCKETS,
    TAKEN,
    TAKEOVER,
    UPSTREAM,
    Message,
    MessageError,
)
from supervisor.master.workers import describe_status
from supervisor.system import listeners as listeners_mod


@dataclass
class Successor:
    """A new master taking over from this one (see handoff.py)."""
    channel: socket.socket
    pid: int | None
    pidfd: int
    taken: bool = False
    failed: bool = False




class UpgradeMixin:
    """Part of `Master`; uses its state."""

    def _take_sockets(self) -> None:
        self.predecessor = handoff.connect(self.takeover)
        listeners, reuseport, health = handoff.receive_sockets(self.predecessor, self.config.master.boot_timeout)
        for name in [n for n in listeners if n not in self.config.listeners]:
            listeners.pop(name).close()
        missing = {name: listener for name, listener in self.config.listeners.items()
                   if name not in listeners and listener.mode != "reuseport"}
        self.sockets = {**listeners, **listeners_mod.open_all(missing, inherited=self.inherited)}
        self.reuseport = reuseport
        self.health_socket = health
        self.log.info("took %d sockets over from the running master", len(listeners) + len(reuseport))

    def _taken(self) -> None:
        """Every app is READY: give the old master a channel to our balancer, for the
        idle keep-alive connections its workers will hand back."""
        ours, theirs = channel.pair()
        try:
            channel.send(self.balancer.channel, Message(ATTACH, {"key": -1, "app": ""}), [ours.fileno()])
            channel.send(self.predecessor, Message(TAKEN, {"pid": os.getpid()}), [theirs.fileno()])
        except OSError as exc:
            self.log.error("could not tell the old master we are ready: %s", exc)
        finally:
            ours.close()
            theirs.close()
        self.selector.register(self.predecessor, selectors.EVENT_READ, self._on_predecessor)

    def _on_predecessor(self) -> None:
        try:
            message, fds = channel.receive(self.predecessor)
        except BlockingIOError:
            return
        except (ChannelClosed, ConnectionError, MessageError):
            message, fds = Message(RELEASED), []  # it is gone: nothing left to wait for
        for fd in fds:
            os.close(fd)
        if message.kind != RELEASED:
            return
        self.selector.unregister(self.predecessor)
        self.predecessor.close()
        self.predecessor = None
        self._open_control()
        self._write_pidfile()
        self.notifier.ready(status=f"serving; took over ({os.getpid()})")
        self.log.info("took over: this master (pid %d) is now serving", os.getpid())

    def _upgrade_command(self) -> dict:
        if self.config.path is None:
            return {"ok": False, "errors": ["upgrade needs a config file (baton run -c FILE)"]}
        if self.successor is not None or self.stopping:
            return {"ok": False, "errors": ["an upgrade or a stop is already under way"]}
        ours, theirs = channel.pair()
        try:
            pid = handoff.spawn_successor(self.config.path, theirs, self.notifier.address)
        except OSError as exc:
            ours.close()
            return {"ok": False, "errors": [f"cannot start a new master: {exc}"]}
        finally:
            theirs.close()
        self._adopt_successor(ours, pid)
        self.log.info("upgrade: new master (pid %d) is booting; this one keeps serving until it is ready", pid)
        return {"ok": True, "message": f"new master pid {pid} is booting"}

    def _adopt_successor(self, sock: socket.socket, pid: int | None) -> None:
        sock.setblocking(False)
        successor = Successor(sock, pid, os.pidfd_open(pid) if pid else -1)
        self.successor = successor
        self.selector.register(sock, selectors.EVENT_READ, self._on_successor)
        if successor.pidfd >= 0:
            self.selector.register(successor.pidfd, selectors.EVENT_READ, self._reap_successor)

    def _on_successor(self) -> None:
        successor = self.successor
        try:
            message, fds = channel.receive(successor.channel)
        except BlockingIOError:
            return
        except (ChannelClosed, ConnectionError, MessageError) as exc:
            if not successor.taken:
                self._upgrade_failed(f"the new master went away ({exc.__class__.__name__})")
            else:
                self.selector.unregister(successor.channel)
                successor.channel.close()
            return
        if message.kind == TAKEOVER:
            if successor.pid is None:  # came through the takeover socket
                successor.pid = int(message.fields.get("pid", 0)) or None
            names, socket_fds = handoff.socket_names(self.sockets, self.reuseport, self.health_socket)
            channel.send(successor.channel, Message(SOCKETS, {"names": names}), socket_fds)
        elif message.kind == TAKEN and len(fds) == 1:
            self._release_to(successor, fds[0])
            return
        for fd in fds:
            os.close(fd)

    def _release_to(self, successor: Successor, upstream_fd: int) -> None:
        successor.taken = True
        if self.balancer is not None:
            try:
                channel.send(self.balancer.channel, Message(UPSTREAM), [upstream_fd])
            except OSError as exc:
                self.log.warning("could not give the balancer the new master's channel: %s", exc)
        os.close(upstream_fd)
        if self.control is not None:
            self.selector.unregister(self.control.fileno())
            self.control.close()
            self.control = None
        self._close_takeover_listener()
        if successor.pid:
            self.notifier.mainpid(successor.pid)
        channel.send(successor.channel, Message(RELEASED))
        self.log.info("upgrade: the new master (pid %s) took over; draining into it", successor.pid)
        self.stopping = True
        self._stop_sidecars(drain_balancer=True)
        now = self.clock()
        for child in self.children.values():
            self._retire(child, now, handback=True)

    def _reap_successor(self) -> None:
        successor = self.successor
        self.selector.unregister(successor.pidfd)
        os.close(successor.pidfd)
        successor.pidfd = -1
        try:
            _, status = os.waitpid(successor.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        if not successor.taken:
            self._upgrade_failed(f"the new master exited ({describe_status(status)})")

    def _upgrade_failed(self, why: str) -> None:
        successor = self.successor
        if not successor.failed:
            successor.failed = True
            self.log.error("upgrade failed: %s; this master keeps serving", why)
            self.notifier.status(f"upgrade failed: {why}")
            self.selector.unregister(successor.channel)
            successor.channel.close()
            if successor.pid and successor.pidfd >= 0:
                # It may still be alive but stuck: a failed upgrade must not linger.
                signal.pidfd_send_signal(successor.pidfd, signal.SIGTERM)
        if successor.pidfd < 0:  # reaped (or never ours to reap): done with it
            self.successor = None

    def _open_takeover_listener(self, control_path: str) -> None:
        """`baton run --takeover PATH`: a master started by anyone may take over here."""
        path = control_path + ".takeover"
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
        self.takeover_listener = listening
        self.selector.register(listening, selectors.EVENT_READ, self._accept_takeover)

    def _accept_takeover(self) -> None:
        try:
            sock, _ = self.takeover_listener.accept()
        except OSError:
            return
        if handoff.peer_uid(sock) not in (0, os.geteuid()) or self.successor is not None or self.stopping:
            self.log.warning("takeover refused (uid %d)", handoff.peer_uid(sock))
            sock.close()
            return
        self.log.info("upgrade: a new master connected to the takeover socket")
        self._adopt_successor(sock, None)

    def _close_takeover_listener(self) -> None:
        if self.takeover_listener is not None:
            path = self.takeover_listener.getsockname()
            self.selector.unregister(self.takeover_listener)
            self.takeover_listener.close()
            self.takeover_listener = None
            try:
                os.unlink(path)
            except OSError:
                pass
