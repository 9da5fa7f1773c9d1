"""The master's workers: apps, generations, spawning, supervision, recycling.

A mixin of `Master` (see master.py), kept apart so each file reads in one sitting.
An app serves from its current generation; a restart boots a whole next generation
beside it, and routing switches only when every new worker said READY.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import socket
from dataclasses import dataclass, field

from supervisor.config.model import AppConfig, effective_user
from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    BOOT_FAILED,
    HEARTBEAT,
    READY,
    STOP,
    Message,
    MessageError,
)
from supervisor.master import status as status_mod
from supervisor.master.lifecycle import Backoff, State, Worker
from supervisor.system import listeners as listeners_mod
from supervisor.system import privileges, spawn
from supervisor.worker import process as worker


@dataclass
class WorkerLoad:
    """A worker's last heartbeat: sent from its serving loop, so a stuck loop goes silent."""
    at: float                      # when heard (or spawned)
    requests: int = 0
    connections: int = 0
    busy: int = 0
    oldest_s: float | None = None  # age of the oldest running request then



@dataclass
class Child:
    """A live worker process and the fds the master holds for it."""
    record: Worker
    channel: socket.socket
    pidfd: int
    balancer_end: socket.socket  # kept so a restarted balancer gets it again
    load: WorkerLoad
    replaces: int | None = None  # a recycled worker's pid, retired once this one is READY
    recycling: bool = False      # a replacement for this one is booting
    jitter: int = 0              # extra requests before max_requests recycles this one



@dataclass
class Generation:
    number: int
    config: AppConfig
    identity: privileges.Identity
    workers: int                       # how many it boots (the app's target, which may differ from config)



@dataclass
class AppState:
    current: Generation               # the generation serving (or booting, at start)
    target: int
    backoff: Backoff
    next: Generation | None = None    # a new generation booting beside the current one
    respawn_at: dict[int, float] = field(default_factory=dict)  # worker index -> when
    ever_ready: bool = False
    boot_failed: bool = False
    restarts: int = 0              # workers replaced after dying
    retired_requests: int = 0      # requests served by workers that have exited
    last_traceback: str = ""

    @property
    def name(self) -> str:
        return self.current.config.name




ABORT_GRACE_S = 2.0  # after SIGABRT (stacks written), SIGKILL


class WorkersMixin:
    """Part of `Master`; uses its state."""

    def _identity(self, app: AppConfig) -> privileges.Identity:
        running_as_root = os.geteuid() == 0
        user = effective_user(app, running_as_root)
        if running_as_root and app.user is None:
            self.log.info("app %s names no user; its workers run as %s", app.name, user)
        return privileges.resolve(user, app.group)

    def _add_app(self, config: AppConfig) -> None:
        app = AppState(Generation(1, config, self._identity(config), config.workers), config.workers,
                   Backoff(max_delay_s=self.config.master.crash_backoff_max))
        self.apps[config.name] = app
        for index in range(1, config.workers + 1):
            self._spawn(app.current, index)

    def _start_generation(self, app: AppState, config: AppConfig, workers: int) -> None:
        if app.next is not None:
            self._abandon_next(app, "superseded by a newer reload")
        app.next = Generation(app.current.number + 1, config, self._identity(config), workers)
        self.log.info("app %s: booting generation %d (%d workers)", config.name, app.next.number, workers)
        for index in range(1, workers + 1):
            self._spawn(app.next, index)

    def _worker_sockets(self, app: AppConfig, index: int) -> dict[str, socket.socket]:
        sockets = {}
        for name in app.listeners:
            listener = self.config.listeners[name]
            if listener.mode == "share":
                sockets[name] = self.sockets[name]
            elif listener.mode == "reuseport":
                key = (name, app.name, index)
                if key not in self.reuseport:
                    self.reuseport[key] = listeners_mod.open_listener(listener, reuseport=True)
                sockets[name] = self.reuseport[key]
        return sockets

    def _spawn(self, generation: Generation, index: int) -> Child:
        app = generation.config
        parent_end, child_end = channel.pair()
        balancer_end, worker_balancer_end = channel.pair()
        spec = worker.WorkerSpec(
            app=app, index=index, generation=generation.number, identity=generation.identity,
            graceful_timeout_s=self._graceful_timeout(app), master_pid=os.getpid(),
            heartbeat_s=min(1.0, app.timeout / 4) if app.timeout else 1.0,
            channel=child_end, listeners=self._worker_sockets(app, index),
            logs=self.logs, balancer=worker_balancer_end,
            proxy_listeners=frozenset(name for name in app.listeners if self.config.listeners[name].proxy_protocol),
        )
        try:
            pid = spawn.fork(lambda: worker.main(spec), spec.owned_fds())
        finally:
            child_end.close()
            worker_balancer_end.close()
        parent_end.setblocking(False)
        pidfd = os.pidfd_open(pid)
        child = Child(Worker(app.name, index, generation.number, pid, self.clock()), parent_end, pidfd,
                       balancer_end, WorkerLoad(self.clock()))
        self.children[pid] = child
        self.selector.register(pidfd, selectors.EVENT_READ, lambda: self._reap(child))
        self.selector.register(parent_end, selectors.EVENT_READ, lambda: self._on_channel(child))
        self.log.debug("spawned %s", worker.title(spec))
        if app.max_requests_jitter:
            # Spread recycling so a fleet of workers started together does not retire together.
            child.jitter = random.randint(0, app.max_requests_jitter)
        return child

    def _on_channel(self, child: Child) -> bool:
        """Handle one message; False once nothing more can be read now."""
        try:
            message, fds = channel.receive(child.channel)
        except BlockingIOError:
            return False
        except (ChannelClosed, ConnectionError):
            self.selector.unregister(child.channel)
            child.channel.close()
            return False
        except MessageError as exc:
            self.log.warning("worker %d sent a bad message: %s", child.record.pid, exc)
            return True
        for fd in fds:
            os.close(fd)
        app = self.apps.get(child.record.app)
        if message.kind == READY and child.record.state is State.SPAWNED:
            child.record.move(State.READY, self.clock())
            self.log.info("worker %s#%d gen %d (pid %d) ready", child.record.app, child.record.index,
                          child.record.generation, child.record.pid)
            if app is None:
                return True
            app.ever_ready = True
            child.load.at = self.clock()
            if child.record.generation == app.current.number:
                self._attach_to_balancer(child)
                old = self.children.get(child.replaces) if child.replaces else None
                if old is not None:
                    self._retire(old, self.clock(), handback=True)
            elif app.next is not None and child.record.generation == app.next.number:
                self._switch_if_ready(app)
        elif message.kind == HEARTBEAT:
            self._on_heartbeat(child, message.fields, app)
        elif message.kind == BOOT_FAILED and app:
            app.boot_failed = True
            app.last_traceback = str(message.fields.get("traceback", ""))
        return True

    def _on_heartbeat(self, child: Child, fields: dict, app: AppState | None) -> None:
        load = child.load
        load.at = self.clock()
        load.requests = int(fields.get("requests", 0))
        load.connections = int(fields.get("connections", 0))
        load.busy = int(fields.get("busy", 0))
        oldest = fields.get("oldest_s")
        load.oldest_s = float(oldest) if oldest is not None else None
        if app is None or child.recycling or child.record.state is not State.READY:
            return
        config = app.current.config
        if child.record.generation != app.current.number:
            return
        if config.max_requests and load.requests >= config.max_requests + child.jitter:
            self._recycle(app, child, f"served {load.requests} requests")
        elif config.max_rss:
            rss = status_mod.rss_kb(child.record.pid)
            if rss is not None and rss > config.max_rss * 1024:
                self._recycle(app, child, f"resident memory {rss // 1024} MB > {config.max_rss} MB")

    def _recycle(self, app: AppState, child: Child, why: str) -> None:
        """Replace a worker before it leaves: the new one boots, then the old one drains."""
        child.recycling = True
        self.counters["worker_recycles"] += 1
        self.log.info("worker %s#%d (pid %d) %s: recycling it", app.name, child.record.index, child.record.pid, why)
        replacement = self._spawn(app.current, child.record.index)
        replacement.replaces = child.record.pid

    def _hung(self, child: Child, now: float) -> str | None:
        """Why a serving worker counts as hung, if it does."""
        app = self.apps.get(child.record.app)
        timeout = app.current.config.timeout if app else None
        if not timeout or child.record.state is not State.READY:
            return None
        if now - child.load.at > timeout:
            return f"silent for {now - child.load.at:.1f}s"
        if child.load.oldest_s is not None and child.load.oldest_s + (now - child.load.at) > timeout:
            return f"a request running for {child.load.oldest_s + now - child.load.at:.1f}s"
        return None

    def _abort_hung(self, child: Child, why: str, now: float) -> None:
        """SIGABRT first, so faulthandler writes every thread's stack to the error log."""
        record = child.record
        self.counters["worker_timeouts"] += 1
        self.log.error("worker %s#%d (pid %d) timed out (%s); aborting it, its stacks follow",
                       record.app, record.index, record.pid, why)
        record.move(State.DRAINING, now)
        self._detach_from_balancer(child)
        record.kill_at = now + ABORT_GRACE_S
        self._kill(record.pid, signal.SIGABRT)
        app = self.apps.get(record.app)
        if app is not None and record.generation == app.current.number and not self.stopping:
            self._spawn(app.current, record.index)

    def _generation_workers(self, app: str, generation: int) -> list[Child]:
        return [c for c in self.children.values()
                if c.record.app == app and c.record.generation == generation and c.record.alive]

    def _switch_if_ready(self, app: AppState) -> None:
        new = self._generation_workers(app.name, app.next.number)
        if len(new) < app.next.workers or not all(c.record.serving for c in new):
            return
        old_number = app.current.number
        app.current, app.next = app.next, None
        app.target = app.current.workers
        app.respawn_at.clear()
        for child in new:
            self._attach_to_balancer(child)
        now = self.clock()
        for child in self._generation_workers(app.name, old_number):
            self._retire(child, now, handback=True)
        self.counters["generation_switches"] += 1
        self.log.info("app %s: generation %d serving; generation %d draining", app.name,
                      app.current.number, old_number)

    def _abandon_next(self, app: AppState, why: str) -> None:
        self.counters["generations_dropped"] += 1
        self.log.error("app %s: generation %d dropped (%s); generation %d keeps serving",
                       app.name, app.next.number, why, app.current.number)
        self.notifier.status(f"app {app.name}: generation {app.next.number} dropped ({why}); "
                             f"generation {app.current.number} keeps serving")
        for child in self._generation_workers(app.name, app.next.number):
            if child.record.state is not State.DRAINING:
                child.record.move(State.DRAINING, self.clock())
            child.record.kill_at = self.clock()
        app.next = None

    def _reap(self, child: Child) -> None:
        pid = child.record.pid
        try:
            _, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        # Its last words (BOOT_FAILED) may still sit in the channel: hear them first.
        while child.channel.fileno() >= 0 and self._on_channel(child):
            pass
        if child.channel.fileno() >= 0:
            self.selector.unregister(child.channel)
            child.channel.close()
        del self.children[pid]
        child.balancer_end.close()
        record = child.record
        was_draining = record.state is State.DRAINING
        never_ready = record.ready_at is None
        record.move(State.EXITED, self.clock())
        app = self.apps.get(record.app)
        if app is not None:
            app.retired_requests += child.load.requests
        if app is not None and record.index > app.target and record.generation == app.current.number:
            self._close_reuseport(app.name, record.index)
        if self.stopping or was_draining or app is None:
            return
        self.log.warning("worker %s#%d gen %d (pid %d) exited: %s", record.app, record.index,
                         record.generation, pid, describe_status(status))
        if app.next is not None and record.generation == app.next.number:
            self.log.error("app %s: generation %d failed to boot:\n%s", app.name, app.next.number,
                           app.last_traceback.rstrip() or describe_status(status))
            self._abandon_next(app, "a worker failed to boot")
            return
        if record.generation != app.current.number:
            return
        if never_ready and self._no_app_can_boot():
            for name, state in self.apps.items():
                self.log.error("app %s cannot boot:\n%s", name, state.last_traceback.rstrip() or "(no traceback)")
            self.log.error("no app could boot; exiting")
            self.exit_status = 1
            self.stop_quick()
            return
        if record.index <= app.target:
            self.counters["worker_restarts"] += 1
            app.restarts += 1
            delay = app.backoff.record_exit(record, self.clock())
            if delay:
                self.log.info("app %s: next worker in %.2fs (crash loop backoff)", app.name, delay)
            app.respawn_at[record.index] = self.clock() + delay

    def _no_app_can_boot(self) -> bool:
        """At startup only: every app has failed to boot and none was ever ready."""
        return self.counters["reloads"] == 0 and all(not a.ever_ready and a.boot_failed for a in self.apps.values())

    def _rescale(self, app: AppState, count: int) -> None:
        if self.stopping:
            return
        old, app.target = app.target, count
        for index in range(old + 1, count + 1):
            self._spawn(app.current, index)
        now = self.clock()
        for child in self._generation_workers(app.name, app.current.number):
            if child.record.index > count:
                app.respawn_at.pop(child.record.index, None)
                self._retire(child, now, handback=True)

    def _targets(self) -> str:
        return ", ".join(f"{name}={app.target}" for name, app in self.apps.items())

    def restart_app(self, name: str) -> None:
        """A change to an app's `reload_on` files: a new generation of just that app."""
        app = self.apps.get(name)
        if app is not None and not self.stopping:
            self._start_generation(app, app.current.config, app.target)

    def _retire(self, child: Child, now: float, handback: bool) -> None:
        if child.record.state is State.DRAINING:
            return
        was_serving = child.record.state is State.READY
        child.record.move(State.DRAINING, now)
        if was_serving:
            self._detach_from_balancer(child)
        app = self.apps.get(child.record.app)
        timeout = self._graceful_timeout(app.current.config) if app else self.config.master.graceful_timeout
        child.record.kill_at = now + timeout
        try:
            channel.send(child.channel, Message(STOP, {"graceful": True, "handback": handback}))
        except OSError:
            self._kill(child.record.pid, signal.SIGTERM)

    def _graceful_timeout(self, app: AppConfig) -> float:
        return app.graceful_timeout if app.graceful_timeout is not None else self.config.master.graceful_timeout

    def _kill(self, pid: int, signum: int) -> None:
        child = self.children.get(pid)
        if child is None:
            return
        try:
            signal.pidfd_send_signal(child.pidfd, signum)
        except ProcessLookupError:
            pass


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    return "failed to boot" if code == worker.EXIT_BOOT_FAILED else f"exit status {code}"
