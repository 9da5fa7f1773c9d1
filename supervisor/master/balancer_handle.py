"""The master's side of the balancer: start it, and tell it what changed.

The balancer accepts on `balance` listeners and brokers every hand-back. The master
forks it with the routing table, the listeners and a link to every serving worker;
afterwards it sends ROUTES (new table, new listeners), ATTACH and DETACH (a worker
starts or stops taking connections), METRICS, DRAIN and UPSTREAM over its channel.
A send that fails is logged; the balancer it was meant for is then dead or dying, and
a restarted one is forked with the state as it is by then.

The balancer sends HEARTBEAT from its loop (`on_alive`), so the supervision core can
replace one that is stopped or stuck. Who it runs as is decided once, at its first
start (`privileges.balancer_identity`), and kept for every restart: `balancer_user`
waits for an upgrade like the other settings of the balancer's process.
"""
from __future__ import annotations

import os
import signal
import socket
from typing import Callable

from supervisor.balancer import process as balancer_process
from supervisor.config.model import Config
from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import MessageError
from supervisor.master import supervision as sv
from supervisor.master.sidecar import Sidecar
from supervisor.system import privileges
from supervisor.system.log import Logs
from supervisor.system.loop import Loop

NAME = "balancer"


class BalancerHandle:
    def __init__(self, loop: Loop, logs: Logs, on_exit: Callable[[str, int | None], None],
                 on_alive: Callable[[], None] = lambda: None):
        self.loop = loop
        self.logs = logs
        self.log = logs.error
        self.on_exit = on_exit      # (name, wait status) once it is reaped
        self.on_alive = on_alive    # a heartbeat arrived from the running balancer
        self.process: Sidecar | None = None
        self.identity: privileges.Identity | None = None

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, config: Config, listening: dict[str, socket.socket], links: dict[int, tuple[str, socket.socket]],
              health: socket.socket | None, clock_now: float) -> None:
        """Fork the balancer with `links` (worker pid -> (app, the balancer's channel end))."""
        if self.identity is None:
            self.identity, why = privileges.balancer_identity(config.master.balancer_user, config.path or "",
                                                              os.geteuid() == 0)
            self.log.info("the balancer runs as %s (%s)", self.identity.name, why)
        identity = self.identity
        keep = [*(s.fileno() for s in listening.values()), *(s.fileno() for _, s in links.values()), *self.logs.fds]
        if health is not None:
            keep.append(health.fileno())
        payload, master_pid = balancer_process.routing_payload(config), os.getpid()
        self.process = Sidecar.start(
            NAME, lambda end: balancer_process.main(payload, identity, listening, end, links, self.logs,
                                                    master_pid, health, sv.BALANCER_HEARTBEAT_S), keep, clock_now)
        process = self.process
        self.loop.register(process.pidfd, lambda: self._reap(process))
        self.loop.register(process.channel, lambda: self._on_message(process))
        self.log.info("balancer (pid %d) started as %s", process.pid, identity.name)

    def _on_message(self, process: Sidecar) -> None:
        while True:
            try:
                message, fds = channel.receive(process.channel)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError):
                self.loop.unregister(process.channel)   # it is dying: the pidfd says when it is gone
                return
            except MessageError as exc:
                self.log.warning("the balancer sent a bad message: %s", exc)
                continue
            for fd in fds:
                os.close(fd)
            if type(message) is messages.Heartbeat:
                if process is self.process:
                    self.on_alive()
            else:
                self.log.warning("the balancer sent an unexpected %s message", message.KIND)

    def _reap(self, process: Sidecar) -> None:
        self.loop.unregister(process.pidfd)
        if process.channel.fileno() >= 0 and self.loop.registered(process.channel):
            self.loop.unregister(process.channel)
        status = process.reap()
        if process is self.process:
            self.process = None
        self.on_exit(NAME, status)

    def send(self, message: messages.Message, fds: list[int] = ()) -> bool:
        if self.process is None:
            return False
        try:
            channel.send(self.process.channel, message, fds)
            return True
        except OSError as exc:
            self.log.warning("could not send %s to the balancer: %s", message.KIND, exc)
            return False

    def routes(self, config: Config, opened: dict[str, socket.socket]) -> None:
        """A new routing table, with the `balance` listeners the reload opened."""
        if self.process is None:
            return   # a restarted balancer is forked with the current routes
        message = messages.Routes(routes=balancer_process.routing_payload(config), open=tuple(opened))
        if not self.send(message, [sock.fileno() for sock in opened.values()]):
            self.log.warning("restarting the balancer, which missed a routing change")
            self.signal(signal.SIGKILL)

    def attach(self, pid: int, app: str, end: socket.socket) -> None:
        self.send(messages.Attach(key=pid, app=app), [end.fileno()])

    def detach(self, pid: int) -> None:
        self.send(messages.Detach(key=pid))

    def drain(self) -> bool:
        return self.send(messages.Drain())

    def signal(self, signum: int) -> None:
        if self.process is not None:
            self.process.signal(signum)

    def kill_now(self) -> None:
        if self.process is not None:
            for fd in (self.process.pidfd, self.process.channel):
                if self.loop.registered(fd):
                    self.loop.unregister(fd)
            self.process.kill_now()
            self.process = None
