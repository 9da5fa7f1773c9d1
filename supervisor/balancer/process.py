"""The balancer process: accept, pick an app and a worker, pass the connection's fd.

An unprivileged child of the master. It owns the accepting side of every `balance`
listener; for each READY worker the master hands it one end of a SOCK_SEQPACKET
channel to that worker. A connection's fd travels to the worker with its peer address
and listener name; the balancer keeps its own copy until the worker acknowledges it,
so a worker that dies before taking a connection does not lose it.

This module is the process shell, on the shared event loop (`system.loop`); it moves
connections between its parts and decides nothing itself:

* `intake.py` accepts, and peeks at Host/SNI where a listener serves several apps;
* `dispatch.py` (pure) chooses the worker, queues what no worker can take, answers
  503 on overflow and timeout, and re-dispatches a dead worker's connections;
* `links.py` holds the worker channels: CONN out, REPORT and HANDBACK in;
* `healthserver.py` answers /healthz and /metrics, when the master gave it a socket
  (with `[master] balancers = N`, balancer 0 only: the others send the master their
  own figures with each heartbeat, and the master's METRICS adds them up for it);
* the master's messages are dispatched here by class (`_from_master`). One that
  decoded but cannot be applied (a host pattern HostTable refuses, an fd that is not
  the socket it should be, a worker attached twice) is logged with what was wrong, and
  its fds are closed; nothing of it is applied.

`run()` returns when the master's channel closes, or when a drain has passed on every
connection (every worker gone, nothing queued).
"""
from __future__ import annotations

import faulthandler
import os
import platform
import socket
import time

import setproctitle

from supervisor import __version__
from supervisor.balancer import health
from supervisor.balancer.dispatch import APP_GONE, Decision, Dispatcher, Refuse, Send
from supervisor.balancer.healthserver import HealthServer
from supervisor.balancer.intake import Intake, Pending, answer_and_close
from supervisor.balancer.links import Links
from supervisor.balancer.routing import build_routes
from supervisor.config.model import Config
from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    Attach,
    Detach,
    Drain,
    Gone,
    Heartbeat,
    MessageError,
    Metrics,
    Reclaim,
    Reopen,
    Routes,
    Upstream,
)
from supervisor.system import privileges, spawn
from supervisor.system.log import Logs
from supervisor.system.loop import Loop, Timer

UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 20\r\nConnection: close\r\n\r\nNo worker is free.\n\n")


BUILD = {"version": __version__, "python": platform.python_version()}   # baton_build_info's labels


class Malformed(Exception):
    """A master message that decoded but cannot be applied; the text says why."""


def routing_payload(config: Config) -> dict:
    """What the balancer needs of a config, as plain data for a ROUTES message (in the
    shape `messages.Routes` checks, with tuples for arrays as decoding gives them)."""
    return {
        "listeners": {name: tuple(app.name for app in config.apps.values() if name in app.listeners)
                      for name, listener in config.listeners.items() if listener.mode == "balance"},
        "proxy": tuple(name for name, listener in config.listeners.items() if listener.proxy_protocol),
        "apps": {name: {"hosts": tuple(app.hosts), "default": app.default, "balance": app.balance}
                 for name, app in config.apps.items()},
    }


class Balancer:
    """The balancer's parts on one loop; `run()` returns when the master goes away or a
    drain is complete. `clock` drives the loop (and so every deadline): tests pass a
    fake one and call `loop.run_once`."""

    def __init__(self, payload: dict, listeners: dict[str, socket.socket], master: socket.socket,
                 links: dict[int, tuple], logs: Logs, clock=time.monotonic,
                 health_socket: socket.socket | None = None, heartbeat_s: float | None = None,
                 figures_to_master: bool = False):
        self.log = logs.error
        self.figures_to_master = figures_to_master
        self.logs = logs
        self.loop = loop = Loop(clock)
        self.core = Dispatcher(lambda: loop.now)
        self.intake = Intake(loop, self._dispatch, self.log, self.core.waiting_for)
        self.links = Links(loop, self.core, self._perform, self.log, self.intake)
        self.master = master
        self.master_figures = Metrics(apps={}, overall={})
        self._figure_parts: list[Metrics] = []   # of the master's figures, until the last part
        self._queue_timer: Timer | None = None
        self._steal_timer: Timer | None = None
        self.health = (HealthServer(loop, health_socket, lambda: self.core.draining, self.metrics_text)
                       if health_socket is not None else None)
        # Each handler owns the message's fds once it returns; one that raises
        # Malformed has taken none, and `_on_master` closes them.
        self._from_master = {
            Attach: self._on_attach,
            Reclaim: self._on_reclaim,
            Detach: self._on_detach,
            Gone: self._on_gone,
            Routes: self._on_routes,
            Metrics: self._on_metrics,
            Drain: self._on_drain,
            Upstream: self._on_upstream,
            Reopen: self._on_reopen,
        }
        master.setblocking(False)
        loop.register(master, self._on_master)
        loop.after_events(self._after_events)
        self._adopt_routes(payload, listeners)
        for key, (app, sock, *reclaim) in links.items():   # (worker end copy, pidfd) when given
            self.links.attach(key, app, sock)
            if reclaim and reclaim[0] is not None:
                self.links.reclaim(key, _channel_end(reclaim[0].detach()), reclaim[1])
        if heartbeat_s is not None:
            # From the loop, not a thread: a stopped or stuck loop goes silent, and the
            # master replaces this process.
            loop.every(heartbeat_s, self._heartbeat)

    def run(self) -> None:
        self.loop.run()

    def close(self) -> None:
        """Release every socket and the loop (the master's channel stays the caller's)."""
        self.intake.close()
        for conn in self.core.held():
            conn.close()
        self.links.close()
        if self.health is not None:
            self.health.close()
        self.loop.unregister(self.master)
        self.loop.close()

    # -- connections -----------------------------------------------------------

    def _dispatch(self, pending: Pending) -> None:
        decision = self.core.dispatch(pending)
        if decision is not None:
            self._perform(decision)

    def _perform(self, decision: Decision | None) -> None:
        """Carry out a core decision; a send that fails goes back to the core, which
        answers for the same connection (another worker, the queue, a 503)."""
        while decision is not None:
            if decision.__class__ is Send:
                if self.links.send_conn(decision):
                    return
                decision = self.core.send_failed(decision)
            else:
                self._refuse(decision)
                return

    def _refuse(self, refusal: Refuse) -> None:
        answer_and_close(refusal.conn.sock, b"" if refusal.reason == APP_GONE else UNAVAILABLE)

    def _after_events(self) -> None:
        core = self.core
        if core.queued and self.links.upstream is not None:
            # After an upgrade: what waits here is the new master's to serve; our
            # workers only drain (parked connections went there already).
            self.links.pass_upstream(core.take_waiting(self.links.movable))
        if core.queued:
            # Before accepting: connections that waited go first.
            while (send := core.next_queued()) is not None:
                self._perform(send)
        if core.steal_ready:
            self._take_back()
        self.intake.resume_deferred()
        self.intake.accept_ready()
        if core.queued and self._queue_timer is None:
            self._queue_timer = self.loop.call_at(core.next_deadline(), self._expire_queue)
        if core.draining and core.done:
            self.loop.stop()

    def _take_back(self) -> None:
        """Connections unread at a silent worker go to a free one (the core's 2c)."""
        core = self.core
        victims, recheck = core.steals()
        missed = set()
        for worker in victims:
            if worker.key in missed:
                continue
            taken, decision = self.links.take_back(worker)
            if not taken:
                core.steal_missed(worker)
                missed.add(worker.key)
                continue
            self._perform(decision)
        if recheck is not None:
            timer = self._steal_timer
            if timer is not None and timer.when > recheck:
                timer.cancel()
                timer = None
            if timer is None:
                self._steal_timer = self.loop.call_at(recheck, self._steal_due)

    def _steal_due(self) -> None:
        self._steal_timer = None   # the iteration's `_after_events` looks again

    def _expire_queue(self) -> None:
        self._queue_timer = None   # `_after_events` arms the next one
        for refusal in self.core.expire():
            self._refuse(refusal)

    # -- the master ------------------------------------------------------------

    def _on_master(self) -> None:
        while True:
            try:
                message, fds = channel.receive(self.master)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError):
                self.loop.stop()
                return
            except MessageError as exc:   # its fds are closed already
                self.log.error("dropped a bad message from the master: %s", exc)
                continue
            handler = self._from_master.get(type(message))
            try:
                if handler is None:
                    raise Malformed("the balancer takes no such message")
                handler(message, fds)
            except Malformed as exc:
                self.log.error("dropped a %s message from the master: %s", message.KIND, exc)
                for fd in fds:
                    os.close(fd)

    def _heartbeat(self) -> None:
        try:
            channel.send(self.master, Heartbeat(requests=self.intake.accepted, connections=0, busy=0,
                                                oldest_s=None))
            if self.figures_to_master:
                per_app, overall = self.own_figures()
                channel.send(self.master, Metrics(apps=per_app, overall=overall))
        except BlockingIOError:
            pass   # the master is behind on reading: the heartbeats already queued say the same
        except OSError as exc:   # the master is gone: `_on_master` sees the channel close
            self.log.debug("could not send a heartbeat to the master: %s", exc)
        except ValueError as exc:   # our figures outgrew one message (hundreds of apps)
            self.log.debug("could not send our figures to the master: %s", exc)

    def _on_attach(self, message: Attach, fds: list[int]) -> None:
        worker = self.core.worker(message.key)
        if worker is not None:
            # An attached worker whose tag is live again (a rollback): the link it has
            # serves; the fd is a copy of its end.
            if worker.accepting or worker.app != message.app:
                raise Malformed(f"worker {message.key} is attached already")
            os.close(fds[0])
            self.core.resume(worker)
            return
        self.links.attach(message.key, message.app, _channel_end(fds[0]))

    def _on_reclaim(self, message: Reclaim, fds: list[int]) -> None:
        if self.core.worker(message.key) is None:
            raise Malformed(f"worker {message.key} is not attached")
        self.links.reclaim(message.key, _channel_end(fds[0]), fds[1])

    def _on_detach(self, message: Detach, fds: list[int]) -> None:
        self.links.detach(message.key)   # a worker that never attached: nothing to do

    def _on_gone(self, message: Gone, fds: list[int]) -> None:
        self.links.gone(message.key)

    def _on_routes(self, message: Routes, fds: list[int]) -> None:
        opened: dict[str, socket.socket] = {}
        try:
            for name, fd in zip(message.open, fds):
                opened[name] = _listening_socket(fd, name)
            self._adopt_routes(message.routes, opened)
        except (Malformed, ValueError) as exc:
            for sock in opened.values():
                sock.detach()   # the fds are `_on_master`'s to close
            raise Malformed(str(exc)) from None

    def _adopt_routes(self, payload: dict, opened: dict[str, socket.socket]) -> None:
        """Adopt a routing table and the listeners it newly opens; ValueError, with
        nothing changed, on a host pattern or policy name that is refused."""
        routes = build_routes(payload)
        refused = self.core.set_apps({name: app["balance"] for name, app in payload["apps"].items()})
        self.intake.set_routes(routes, frozenset(payload["proxy"]), opened)
        for refusal in refused:
            self._refuse(refusal)

    def _on_metrics(self, message: Metrics, fds: list[int]) -> None:
        self._figure_parts.append(message)
        if message.more:
            return
        parts, self._figure_parts = self._figure_parts, []
        if len(parts) == 1:
            self.master_figures = message
            return
        apps = {}
        for part in parts:
            apps.update(part.apps)
        self.master_figures = Metrics(apps=apps, overall=message.overall)

    def _on_drain(self, message: Drain, fds: list[int]) -> None:
        """A graceful stop began: accept no more (queued connections still go out)."""
        self.core.drain()
        self.intake.close_listeners()

    def _on_upstream(self, message: Upstream, fds: list[int]) -> None:
        self.links.set_upstream(_channel_end(fds[0]))

    def _on_reopen(self, message: Reopen, fds: list[int]) -> None:
        unknown = [number for number in message.numbers if number not in self.logs.fds]
        if unknown:
            raise Malformed(f"fd numbers {unknown} are not log fds (ours: {list(self.logs.fds)})")
        self.logs.adopt(list(message.numbers), fds)

    # -- metrics -----------------------------------------------------------------

    def own_figures(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """This balancer's figures for /metrics: per app, and overall."""
        per_app: dict[str, dict[str, float]] = {}
        for app, figures in self.core.figures().items():
            per_app[app] = {"baton_handoffs_total": figures.handoffs,
                            # Every connection handed off waited (most of them 0 s).
                            "baton_queue_wait_seconds_sum": figures.queue_wait_s,
                            "baton_queue_wait_seconds_count": figures.handoffs,
                            "baton_connections": figures.connections,
                            "baton_queue_depth": figures.queue_depth}
        for app, count in self.links.handbacks.items():
            per_app.setdefault(app, {})["baton_handbacks_total"] = count
        for app, count in self.links.parks.items():
            per_app.setdefault(app, {})["baton_parks_total"] = count
        overall = {"baton_accepted_total": self.intake.accepted,
                   "baton_refused_total": (self.intake.refused_host + self.intake.refused_proxy
                                           + self.core.overflow_503 + self.core.queue_timeout_503
                                           + self.core.worker_refused_503),
                   "baton_parked": len(self.intake.parked),
                   "baton_taken_back_total": self.core.taken_back}
        return per_app, overall

    def metrics_text(self) -> str:
        """The master's figures (with the other balancers' own, summed by the master)
        plus ours: a figure both have is added up."""
        per_app: dict[str, dict[str, float]] = {app: dict(figures) for app, figures in self.master_figures.apps.items()}
        overall = dict(self.master_figures.overall)
        own_apps, own_overall = self.own_figures()
        for app, figures in own_apps.items():
            entry = per_app.setdefault(app, {})
            for name, value in figures.items():
                entry[name] = entry.get(name, 0) + value
        for name, value in own_overall.items():
            overall[name] = overall.get(name, 0) + value
        return health.render(per_app, overall, build=BUILD)


def _channel_end(fd: int) -> socket.socket:
    """The SEQPACKET socket `fd` is; Malformed (the fd not taken) if it is not one."""
    sock = _socket(fd, "a channel")
    if sock.type != socket.SOCK_SEQPACKET:
        sock.detach()
        raise Malformed(f"its fd is a {sock.type.name} socket, not a SEQPACKET channel")
    return sock


def _listening_socket(fd: int, name: str) -> socket.socket:
    """The listening stream socket `fd` is; Malformed (the fd not taken) if it is not one."""
    sock = _socket(fd, f"listener {name}")
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise Malformed(f"the fd for listener {name} is not a listening stream socket")
    return sock


def _socket(fd: int, what: str) -> socket.socket:
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise Malformed(f"the fd for {what} is not a socket: {exc}") from None


def main(payload: dict, identity: privileges.Identity, listeners: dict[str, socket.socket],
         master: socket.socket, links: dict[int, tuple], logs: Logs,
         master_pid: int, health_socket: socket.socket | None = None, heartbeat_s: float | None = None,
         index: int = 0, figures_to_master: bool = False) -> int:
    """Balancer `index` of the master's (its title says which, after the first);
    `figures_to_master`: send the master our figures with each heartbeat."""
    privileges.drop(identity)
    spawn.die_with_parent(master_pid)
    setproctitle.setproctitle(f"baton: balancer{f'#{index}' if index else ''} ({identity.name})")
    # SIGABRT (the master's answer to a silent balancer) writes every stack to the error log.
    faulthandler.enable(file=logs.fds[0], all_threads=True)
    Balancer(payload, listeners, master, links, logs, health_socket=health_socket, heartbeat_s=heartbeat_s,
             figures_to_master=figures_to_master).run()
    return 0
