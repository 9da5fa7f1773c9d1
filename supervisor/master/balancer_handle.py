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

With `[master] balancers = N` there are N of them (`Balancers`, one `BalancerHandle`
each, known to the supervision core by `supervision.balancer_name(index)`). All get
the same listening sockets, each its own end of every worker's balancer channels (a
worker has one channel per balancer), and each is started, watched and replaced on its
own. Only balancer 0 holds the health socket: the others send it their figures (a
METRICS message with each heartbeat), which the master adds to the figures it pushes to
balancer 0, so /metrics counts every balancer's connections, at most a heartbeat late.
"""
from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping
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


class BalancerHandle:
    """One balancer process (`index` of the master's `count`), restarted as often as the
    core says; `identity` is set by `Balancers` before the first start."""

    def __init__(self, loop: Loop, logs: Logs, on_exit: Callable[[str, int | None], None],
                 on_alive: Callable[[], None] = lambda: None, index: int = 0, count: int = 1,
                 on_figures: Callable[[messages.Metrics], None] = lambda figures: None):
        self.loop = loop
        self.logs = logs
        self.log = logs.error
        self.on_exit = on_exit      # (name, wait status) once it is reaped
        self.on_alive = on_alive    # a heartbeat arrived from the running balancer
        self.on_figures = on_figures   # its own figures for /metrics (balancers but the first)
        self.index = index
        self.count = count
        self.name = sv.balancer_name(index)
        self.process: Sidecar | None = None
        self.identity: privileges.Identity | None = None
        self.accepted = 0   # connections the running one accepted, as of its last heartbeat
        self.starts = 0     # how many were forked: after the first, each replaces a dead one

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, config: Config, listening: dict[str, socket.socket], links: dict[int, tuple],
              health: socket.socket | None, clock_now: float) -> None:
        """Fork the balancer with `links` (worker pid -> (app, this balancer's channel
        end, a copy of the worker's end or None, the worker's pidfd)); `health` only for
        balancer 0."""
        identity = self.identity
        keep = [*(s.fileno() for s in listening.values()), *self.logs.fds]
        for _, end, worker_end, pidfd in links.values():
            keep.append(end.fileno())
            if worker_end is not None:
                keep.extend((worker_end.fileno(), pidfd))
        if health is not None:
            keep.append(health.fileno())
        payload, master_pid = balancer_process.routing_payload(config), os.getpid()
        index, count = self.index, self.count
        self.accepted = 0
        self.starts += 1
        self.process = Sidecar.start(
            self.name, lambda end: balancer_process.main(payload, identity, listening, end, links, self.logs,
                                                         master_pid, health, sv.BALANCER_HEARTBEAT_S,
                                                         index=index, figures_to_master=index > 0),
            keep, clock_now)
        process = self.process
        self.loop.register(process.pidfd, lambda: self._reap(process))
        self.loop.register(process.channel, lambda: self._on_message(process))
        self.log.info("%s (pid %d) started as %s%s", self.name, process.pid, identity.name,
                      f" ({index + 1} of {count})" if count > 1 else "")

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
                    self.accepted = message.requests   # the balancer's count of accepted connections
                    self.on_alive()
            elif type(message) is messages.Metrics and self.index > 0:
                if process is self.process:
                    self.on_figures(message)
            else:
                self.log.warning("the balancer sent an unexpected %s message", message.KIND)

    def _reap(self, process: Sidecar) -> None:
        self.loop.unregister(process.pidfd)
        if process.channel.fileno() >= 0 and self.loop.registered(process.channel):
            self.loop.unregister(process.channel)
        status = process.reap()
        if process is self.process:
            self.process = None
        self.on_exit(self.name, status)

    def send(self, message: messages.Message, fds: list[int] = ()) -> bool:
        if self.process is None:
            return False
        try:
            channel.send(self.process.channel, message, fds)
            return True
        except OSError as exc:
            self.log.warning("could not send %s to %s: %s", message.KIND, self.name, exc)
            return False

    def routes(self, config: Config, opened: dict[str, socket.socket]) -> None:
        """A new routing table, with the `balance` listeners the reload opened."""
        if self.process is None:
            return   # a restarted balancer is forked with the current routes
        message = messages.Routes(routes=balancer_process.routing_payload(config), open=tuple(opened))
        if not self.send(message, [sock.fileno() for sock in opened.values()]):
            self.log.warning("restarting %s, which missed a routing change", self.name)
            self.signal(signal.SIGKILL)

    def attach(self, pid: int, app: str, end: socket.socket, worker_end: socket.socket | None = None,
               pidfd: int = -1) -> None:
        if self.send(messages.Attach(key=pid, app=app), [end.fileno()]) and worker_end is not None:
            self.send(messages.Reclaim(key=pid), [worker_end.fileno(), pidfd])

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


class Balancers:
    """The master's `count` balancers, by index and by sidecar name. A worker's balancer
    channel ends come as a tuple in index order (`ends[i]` is balancer i's)."""

    def __init__(self, loop: Loop, logs: Logs, count: int, on_exit: Callable[[str, int | None], None],
                 on_alive: Callable[[str], None]):
        self.log = logs.error
        self.count = count
        self.identity: privileges.Identity | None = None
        # The latest figures of each balancer but the first, for the first one's /metrics.
        self.figures: dict[int, messages.Metrics] = {}
        self.handles = [
            BalancerHandle(loop, logs, self._exited(on_exit, index), on_alive=self._alive(on_alive, index),
                           index=index, count=count, on_figures=self._figures(index))
            for index in range(count)]
        self.by_name = {handle.name: handle for handle in self.handles}

    def _exited(self, on_exit, index: int):
        def exited(name: str, status: int | None) -> None:
            self.figures.pop(index, None)   # a new one counts afresh
            on_exit(name, status)
        return exited

    def _alive(self, on_alive, index: int):
        return lambda: on_alive(self.handles[index].name)

    def _figures(self, index: int):
        def figures(message: messages.Metrics) -> None:
            self.figures[index] = message
        return figures

    @property
    def first(self) -> BalancerHandle:
        return self.handles[0]

    @property
    def running(self) -> bool:
        return any(handle.running for handle in self.handles)

    def start(self, name: str, config: Config, listening: dict[str, socket.socket],
              links: dict[int, tuple], health: socket.socket | None,
              clock_now: float) -> None:
        """Fork balancer `name` with its end of every link in `links` (worker pid ->
        (app, ends by balancer index, copies of the worker's ends by the same index,
        pidfd)); the health socket goes to balancer 0 only."""
        if self.identity is None:
            self.identity, why = privileges.balancer_identity(config.master.balancer_user, config.path or "",
                                                              os.geteuid() == 0)
            self.log.info("the balancer runs as %s (%s)", self.identity.name, why)
        handle = self.by_name[name]
        handle.identity = self.identity
        own = {pid: (app, ends[handle.index], worker_ends.get(handle.index), pidfd)
               for pid, (app, ends, worker_ends, pidfd) in links.items()}
        handle.start(config, listening, own, health if handle.index == 0 else None, clock_now)

    def routes(self, config: Config, opened: dict[str, socket.socket]) -> None:
        for handle in self.handles:
            handle.routes(config, opened)

    def attach(self, pid: int, app: str, ends: tuple[socket.socket, ...],
               worker_ends: Mapping[int, socket.socket] | None = None, pidfd: int = -1) -> None:
        for index, (handle, end) in enumerate(zip(self.handles, ends)):
            handle.attach(pid, app, end, (worker_ends or {}).get(index), pidfd)

    def detach(self, pid: int) -> None:
        for handle in self.handles:
            handle.detach(pid)

    def gone(self, key: int) -> None:
        """An attached worker is gone for us (see messages.Gone)."""
        self.send_all(messages.Gone(key=key))

    def send_all(self, message: messages.Message, fds: list[int] = ()) -> None:
        for handle in self.handles:
            handle.send(message, fds)

    def others_figures(self) -> messages.Metrics:
        """The sum of the figures the balancers but the first reported last."""
        apps: dict[str, dict[str, float]] = {}
        overall: dict[str, float] = {}
        for figures in self.figures.values():
            for app, values in figures.apps.items():
                _add(apps.setdefault(app, {}), values)
            _add(overall, figures.overall)
        return messages.Metrics(apps=apps, overall=overall)

    def signal(self, name: str, signum: int) -> None:
        handle = self.by_name.get(name)
        if handle is not None:
            handle.signal(signum)

    def kill_now(self) -> None:
        for handle in self.handles:
            handle.kill_now()


def _add(into: dict[str, float], values) -> None:
    for name, value in values.items():
        into[name] = into.get(name, 0) + value
