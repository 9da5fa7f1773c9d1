"""The master's helper processes and endpoints: balancer, watcher, control, health.

A mixin of `Master` (see master.py). The balancer accepts on `balance` listeners
and brokers every hand-back; the watcher reports changed files; the control socket
and the health endpoint are how operators and load balancers reach the master.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket

from supervisor.balancer import process as balancer_mod
from supervisor.config.model import ListenerConfig, control_socket_path
from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    ATTACH,
    CHANGED,
    DETACH,
    DRAIN,
    METRICS,
    READY,
    ROUTES,
    Message,
    MessageError,
)
from supervisor.master.control import ControlServer
from supervisor.master.lifecycle import State
from supervisor.master.sidecar import Sidecar
from supervisor.master.workers import Child, describe_status
from supervisor.system import listeners as listeners_mod
from supervisor.system import privileges
from supervisor.watch import watcher as watcher_mod

QUICK_STOP_GRACE_S = 1.0
METRICS_PUSH_S = 1.0


class SidecarsMixin:
    """Part of `Master`; uses its state."""

    def _open_health(self) -> None:
        address = self.config.master.health
        if address is None or self.health_socket is not None:
            return
        self.health_socket = listeners_mod.open_listener(ListenerConfig("health", address))
        self.metrics_at = self.clock()
        self.log.info("health and metrics on %s/healthz and /metrics", listeners_mod.describe(self.health_socket))

    def _push_metrics(self) -> None:
        """The master's figures for the balancer's /metrics (it adds its own)."""
        self.metrics_at = self.clock() + METRICS_PUSH_S
        if self.balancer is None:
            return
        apps = {}
        for name, app in self.apps.items():
            workers = [c for c in self.children.values() if c.record.app == name and c.record.serving]
            apps[name] = {"baton_requests_total": sum(c.load.requests for c in workers) + app.retired_requests,
                          "baton_workers": len(workers),
                          "baton_worker_restarts_total": app.restarts}
        try:
            channel.send(self.balancer.channel, Message(METRICS, {
                "apps": apps, "overall": {"baton_reloads_total": self.counters["reloads"]}}))
        except OSError:
            pass

    def _open_control(self) -> None:
        path = control_socket_path(self.config)
        if path is None:
            return
        self.control = ControlServer(path, admins=self.config.master.admins, handle=self.command,
                                     log=self.log, clock=self.clock)
        self.selector.register(self.control.fileno(), selectors.EVENT_READ, self.control.on_readable)
        self.log.info("control socket at %s", path)
        self._open_takeover_listener(path)

    def _start_balancer(self) -> None:
        """The balancer accepts on `balance` listeners and brokers every hand-back."""
        user = self.config.master.balancer_user or ("nobody" if os.geteuid() == 0 else None)
        identity = privileges.resolve(user, None)
        listening = {name: sock for name, sock in self.sockets.items()
                     if self.config.listeners[name].mode == "balance"}
        health_socket = self.health_socket
        links = {child.record.pid: (child.record.app, child.balancer_end) for child in self.children.values()
                 if child.record.state is State.READY and self._is_current(child)}
        keep = [*(s.fileno() for s in listening.values()), *(s.fileno() for _, s in links.values()), *self.logs.fds]
        if health_socket is not None:
            keep.append(health_socket.fileno())
        payload, master_pid = balancer_mod.routing_payload(self.config), os.getpid()
        self.balancer = Sidecar.start(
            "balancer", lambda end: balancer_mod.main(payload, identity, listening, end, links, self.logs,
                                                      master_pid, health_socket), keep, self.clock())
        self.selector.register(self.balancer.pidfd, selectors.EVENT_READ, self._reap_balancer)
        self.log.info("balancer (pid %d) started as %s", self.balancer.pid, identity.name)

    def _is_current(self, child: Child) -> bool:
        app = self.apps.get(child.record.app)
        return app is not None and child.record.generation == app.current.number

    def _reap_balancer(self) -> None:
        balancer, self.balancer = self.balancer, None
        self.selector.unregister(balancer.pidfd)
        status = balancer.reap()
        if not self.stopping:
            self.log.warning("balancer (pid %d) exited: %s; restarting it", balancer.pid, describe_status(status))
            self.sidecar_respawn_at["balancer"] = self.clock() + balancer.restart_delay(self.clock())

    def _send_routes(self, opened: dict[str, socket.socket]) -> None:
        if self.balancer is None:
            return  # a restarted balancer is forked with the current routes
        balance = {name: sock for name, sock in opened.items() if self.config.listeners[name].mode == "balance"}
        message = Message(ROUTES, {"routes": balancer_mod.routing_payload(self.config), "open": list(balance)})
        try:
            channel.send(self.balancer.channel, message, [sock.fileno() for sock in balance.values()])
        except OSError as exc:
            self.log.warning("could not send routes to the balancer: %s; restarting it", exc)
            self.balancer.signal(signal.SIGKILL)

    def _attach_to_balancer(self, child: Child) -> None:
        if self.balancer is None:
            return  # a restarted balancer picks up every READY worker's end
        try:
            channel.send(self.balancer.channel, Message(ATTACH, {"key": child.record.pid, "app": child.record.app}),
                         [child.balancer_end.fileno()])
        except OSError as exc:
            self.log.warning("could not hand worker %d to the balancer: %s", child.record.pid, exc)

    def _detach_from_balancer(self, child: Child) -> None:
        if self.balancer is None:
            return
        try:
            channel.send(self.balancer.channel, Message(DETACH, {"key": child.record.pid}))
        except OSError:
            pass

    def _start_watcher(self) -> None:
        if self.config.path is None:
            return  # `baton serve` has no file to watch
        watch = watcher_mod.watch_for(self.config)
        watcher = Sidecar.start("watcher", lambda end: watcher_mod.main(watch, end), self.logs.fds, self.clock())
        self.watcher = watcher
        self.selector.register(watcher.pidfd, selectors.EVENT_READ, lambda: self._reap_watcher(watcher))
        self.selector.register(watcher.channel, selectors.EVENT_READ, lambda: self._on_watcher(watcher))

    def _restart_watcher(self) -> None:
        """Watch a new set of files: the old watcher keeps watching until the new one
        is ready, so no change made during the switch goes unnoticed."""
        if self.watcher is None:
            return
        self.retiring_watchers.append(self.watcher)
        self._start_watcher()

    def _reap_watcher(self, watcher: Sidecar) -> None:
        self.selector.unregister(watcher.pidfd)
        if watcher.channel.fileno() >= 0:
            self.selector.unregister(watcher.channel)
        watcher.reap()
        if watcher in self.retiring_watchers:
            self.retiring_watchers.remove(watcher)
        elif watcher is self.watcher:
            self.watcher = None
            if not self.stopping:
                self.sidecar_respawn_at["watcher"] = self.clock() + watcher.restart_delay(self.clock())

    def _on_watcher(self, watcher: Sidecar) -> None:
        try:
            message, fds = channel.receive(watcher.channel)
        except (BlockingIOError, ChannelClosed, ConnectionError, MessageError):
            return
        for fd in fds:
            os.close(fd)
        if message.kind == READY:
            self.log.info("watcher (pid %d) is watching for changes", watcher.pid)
            for old in self.retiring_watchers:
                old.signal(signal.SIGTERM)
            return
        if message.kind != CHANGED:
            return
        topics = set(message.fields.get("topics", ()))
        self.log.info("changed on disk: %s", ", ".join(sorted(topics)))
        if "config" in topics:
            self.reload()
        for topic in sorted(topics):
            if topic.startswith("app:"):
                self.restart_app(topic[len("app:"):])

    def _stop_sidecars(self, drain_balancer: bool = False) -> None:
        self.sidecar_respawn_at.clear()
        if drain_balancer and self.balancer is not None:
            # It stays up through the drain, answering /healthz with 503 and passing on
            # hand-backs, and leaves by itself once the workers are gone.
            try:
                channel.send(self.balancer.channel, Message(DRAIN))
                self._push_metrics()
            except OSError:
                pass
            else:
                self.balancer_kill_at = self.clock() + self.config.master.graceful_timeout + QUICK_STOP_GRACE_S
                for sidecar in (self.watcher, *self.retiring_watchers):
                    if sidecar is not None:
                        sidecar.signal(signal.SIGTERM)
                return
        for sidecar in (self.balancer, self.watcher, *self.retiring_watchers):
            if sidecar is not None:
                sidecar.signal(signal.SIGTERM)

    def _close_reuseport(self, app: str, index: int) -> None:
        for key in [k for k in self.reuseport if k[1] == app and k[2] == index]:
            self.reuseport.pop(key).close()
