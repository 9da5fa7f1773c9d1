"""The master: bind listeners, fork and supervise workers, react to signals.

One selector wait drives everything: the signal wakeup fd, one pidfd per child and one
channel per worker, with the nearest deadline (a respawn after backoff, a boot timeout,
a kill after a drain) as its timeout. Signal handlers only record. The master never
imports application code and never reads a byte from a client; it stays
single-threaded, so forking is always safe.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

import setproctitle

from supervisor import balancer as balancer_mod
from supervisor import channel, config as config_mod, listeners as listeners_mod, privileges, spawn, worker
from supervisor.channel import ChannelClosed
from supervisor.config import AppConfig, Config
from supervisor.lifecycle import Backoff, State, Worker
from supervisor.log import Logs
from supervisor.messages import ATTACH, BOOT_FAILED, DETACH, READY, STOP, Message, MessageError

QUICK_STOP_GRACE_S = 1.0


@dataclass
class _Child:
    """A live worker process and the fds the master holds for it."""
    record: Worker
    channel: socket.socket
    pidfd: int
    balancer_end: socket.socket | None = None  # kept so a restarted balancer gets it again


@dataclass
class _Balancer:
    pid: int
    pidfd: int
    channel: socket.socket
    spawned_at: float


@dataclass
class _AppState:
    config: AppConfig
    identity: privileges.Identity
    target: int
    generation: int = 1
    backoff: Backoff = field(default_factory=Backoff)
    respawn_at: dict[int, float] = field(default_factory=dict)  # worker index -> when
    ever_ready: bool = False
    boot_failed: bool = False
    last_traceback: str = ""


class Master:
    """Owns every listener, child and deadline; `run()` returns the exit status."""

    _SIGNALS = {
        signal.SIGTERM: "stop_graceful",
        signal.SIGINT: "stop_quick",
        signal.SIGQUIT: "stop_quick",
        signal.SIGTTIN: "scale_up",
        signal.SIGTTOU: "scale_down",
    }

    def __init__(self, config: Config, logs: Logs, clock=time.monotonic):
        self.config = config
        self.logs = logs
        self.log = logs.error
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[str, socket.socket] = {}
        self.children: dict[int, _Child] = {}
        self.apps: dict[str, _AppState] = {}
        self.balancer: _Balancer | None = None
        self.balancer_respawn_at: float | None = None
        # One SO_REUSEPORT socket per (listener, app, worker index): a replacement
        # worker inherits its predecessor's socket, accept queue and all.
        self.reuseport: dict[tuple[str, str, int], socket.socket] = {}
        self.stopping = False
        self.exit_status = 0
        self._wakeup_read, self._wakeup_write = socket.socketpair()

    # -- running -----------------------------------------------------------

    def run(self) -> int:
        self.sockets = listeners_mod.open_all(self.config.listeners)
        try:
            self._install_signals()
            self._write_pidfile()
            setproctitle.setproctitle(f"baton: master [{self.config.path or 'serve'}]")
            for name, sock in self.sockets.items():
                self.log.info("listening on %s (%s)", listeners_mod.describe(sock), name)
            if self._balance_listeners():
                self._spawn_balancer()
            for app in self.config.apps.values():
                self._add_app(app)
            while not (self.stopping and not self.children and self.balancer is None):
                self._wait_once()
            return self.exit_status
        finally:
            self._cleanup()

    def _wait_once(self) -> None:
        deadline = self._next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        for key, _ in self.selector.select(timeout):
            key.data()
        self._on_deadlines(self.clock())

    def _install_signals(self) -> None:
        for sock in (self._wakeup_read, self._wakeup_write):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_write.fileno(), warn_on_full_buffer=False)
        for signum in self._SIGNALS:
            signal.signal(signum, _record_only)
        self.selector.register(self._wakeup_read, selectors.EVENT_READ, self._on_signals)

    def _on_signals(self) -> None:
        try:
            data = self._wakeup_read.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            action = self._SIGNALS.get(signum)
            if action:
                self.log.info("received %s", signal.Signals(signum).name)
                getattr(self, action)()

    # -- apps and workers --------------------------------------------------

    def _add_app(self, app: AppConfig) -> None:
        running_as_root = os.geteuid() == 0
        user = config_mod.effective_user(app, running_as_root)
        if running_as_root and app.user is None:
            self.log.info("app %s names no user; its workers run as %s", app.name, user)
        state = _AppState(app, privileges.resolve(user, app.group), app.workers,
                          backoff=Backoff(max_delay_s=self.config.master.crash_backoff_max))
        self.apps[app.name] = state
        for index in range(1, app.workers + 1):
            self._spawn(state, index)

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

    def _spawn(self, app: _AppState, index: int) -> None:
        parent_end, child_end = channel.pair()
        balancer_end = worker_balancer_end = None
        if any(self.config.listeners[name].mode == "balance" for name in app.config.listeners):
            balancer_end, worker_balancer_end = channel.pair()
        spec = worker.WorkerSpec(
            app=app.config, index=index, generation=app.generation, identity=app.identity,
            graceful_timeout_s=self._graceful_timeout(app.config), master_pid=os.getpid(),
            channel=child_end, listeners=self._worker_sockets(app.config, index),
            logs=self.logs, balancer=worker_balancer_end,
        )
        try:
            pid = spawn.fork(lambda: worker.main(spec), spec.owned_fds())
        finally:
            child_end.close()
            if worker_balancer_end is not None:
                worker_balancer_end.close()
        parent_end.setblocking(False)
        pidfd = os.pidfd_open(pid)
        child = _Child(Worker(app.config.name, index, app.generation, pid, self.clock()), parent_end, pidfd,
                       balancer_end)
        self.children[pid] = child
        self.selector.register(pidfd, selectors.EVENT_READ, lambda: self._reap(child))
        self.selector.register(parent_end, selectors.EVENT_READ, lambda: self._on_channel(child))
        self.log.debug("spawned %s", worker.title(spec))

    def _on_channel(self, child: _Child) -> bool:
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
            if app:
                app.ever_ready = True
            self.log.info("worker %s#%d (pid %d) ready", child.record.app, child.record.index, child.record.pid)
            self._attach_to_balancer(child)
        elif message.kind == BOOT_FAILED and app:
            app.boot_failed = True
            app.last_traceback = str(message.fields.get("traceback", ""))
        return True

    def _reap(self, child: _Child) -> None:
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
        if child.balancer_end is not None:
            child.balancer_end.close()
        was_draining = child.record.state is State.DRAINING
        never_ready = child.record.ready_at is None
        child.record.move(State.EXITED, self.clock())
        app = self.apps.get(child.record.app)
        if app is not None and child.record.index > app.target:
            self._close_reuseport(app.config.name, child.record.index)
        if self.stopping or was_draining or app is None:
            return
        self.log.warning("worker %s#%d (pid %d) exited: %s", child.record.app, child.record.index,
                         pid, _describe_status(status))
        if never_ready and self._no_app_can_boot():
            for name, state in self.apps.items():
                self.log.error("app %s cannot boot:\n%s", name, state.last_traceback.rstrip() or "(no traceback)")
            self.log.error("no app could boot; exiting")
            self.exit_status = 1
            self.stop_quick()
            return
        if child.record.index <= app.target:
            delay = app.backoff.record_exit(child.record, self.clock())
            if delay:
                self.log.info("app %s: next worker in %.1fs (crash loop backoff)", app.config.name, delay)
            app.respawn_at[child.record.index] = self.clock() + delay

    def _no_app_can_boot(self) -> bool:
        """At startup only: every app has failed to boot and none was ever ready."""
        return all(not a.ever_ready and a.boot_failed for a in self.apps.values()) and not any(
            c.record.state is State.READY for c in self.children.values())

    # -- deadlines ---------------------------------------------------------

    def _next_deadline(self) -> float | None:
        deadlines = [at for app in self.apps.values() for at in app.respawn_at.values()]
        if self.balancer_respawn_at is not None:
            deadlines.append(self.balancer_respawn_at)
        for child in self.children.values():
            if child.record.kill_at is not None:
                deadlines.append(child.record.kill_at)
            elif child.record.state is State.SPAWNED:
                deadlines.append(child.record.spawned_at + self.config.master.boot_timeout)
        return min(deadlines, default=None)

    def _on_deadlines(self, now: float) -> None:
        for child in list(self.children.values()):
            record = child.record
            if record.kill_at is not None and now >= record.kill_at:
                record.kill_at = None
                self._kill(record.pid, signal.SIGKILL)
            elif record.state is State.SPAWNED and now >= record.spawned_at + self.config.master.boot_timeout:
                self.log.error("worker %s#%d (pid %d) did not boot within %ss", record.app, record.index,
                               record.pid, self.config.master.boot_timeout)
                record.kill_at = now  # killed on the next pass; counts as a failed boot
        if self.stopping:
            return
        if self.balancer_respawn_at is not None and now >= self.balancer_respawn_at:
            self.balancer_respawn_at = None
            self._spawn_balancer()
        for app in self.apps.values():
            for index, at in list(app.respawn_at.items()):
                if now >= at:
                    del app.respawn_at[index]
                    if index <= app.target:
                        self._spawn(app, index)

    # -- actions (signals and, later, control commands) ----------------------

    def stop_graceful(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stop_balancer()
        now = self.clock()
        for child in self.children.values():
            self._retire(child, now)

    def stop_quick(self) -> None:
        self.stopping = True
        self._stop_balancer()
        deadline = self.clock() + QUICK_STOP_GRACE_S
        for child in self.children.values():
            if child.record.state is not State.DRAINING:
                child.record.move(State.DRAINING, self.clock())
            child.record.kill_at = min(deadline, child.record.kill_at or deadline)
            self._kill(child.record.pid, signal.SIGQUIT)

    def scale_up(self) -> None:
        if self.stopping:
            return
        for app in self.apps.values():
            app.target += 1
            self._spawn(app, app.target)
        self.log.info("scaled up: %s", self._targets())

    def scale_down(self) -> None:
        if self.stopping:
            return
        now = self.clock()
        for app in self.apps.values():
            if app.target <= 1:
                continue
            index = app.target
            app.target -= 1
            app.respawn_at.pop(index, None)
            for child in self.children.values():
                if child.record.app == app.config.name and child.record.index == index:
                    self._retire(child, now)
        self.log.info("scaled down: %s", self._targets())

    def _targets(self) -> str:
        return ", ".join(f"{name}={app.target}" for name, app in self.apps.items())

    def _retire(self, child: _Child, now: float) -> None:
        if child.record.state is State.DRAINING:
            return
        was_serving = child.record.state is State.READY
        child.record.move(State.DRAINING, now)
        if was_serving:
            self._detach_from_balancer(child)
        app = self.apps.get(child.record.app)
        timeout = self._graceful_timeout(app.config) if app else self.config.master.graceful_timeout
        child.record.kill_at = now + timeout
        try:
            channel.send(child.channel, Message(STOP, {"graceful": True}))
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

    # -- the balancer -------------------------------------------------------

    def _balance_listeners(self) -> dict[str, socket.socket]:
        return {name: sock for name, sock in self.sockets.items()
                if self.config.listeners[name].mode == "balance"}

    def _spawn_balancer(self) -> None:
        user = self.config.master.balancer_user or ("nobody" if os.geteuid() == 0 else None)
        identity = privileges.resolve(user, None)
        listening = self._balance_listeners()
        links = {child.record.pid: (child.record.app, child.balancer_end)
                 for child in self.children.values()
                 if child.balancer_end is not None and child.record.state is State.READY}
        parent_end, child_end = channel.pair()
        keep = [child_end.fileno(), *(s.fileno() for s in listening.values()),
                *(sock.fileno() for _, sock in links.values()), *self.logs.fds]
        master_pid = os.getpid()
        try:
            pid = spawn.fork(lambda: balancer_mod.main(self.config, identity, listening, child_end, links,
                                                       self.logs, master_pid), keep)
        finally:
            child_end.close()
        parent_end.setblocking(False)
        pidfd = os.pidfd_open(pid)
        self.balancer = _Balancer(pid, pidfd, parent_end, self.clock())
        self.selector.register(pidfd, selectors.EVENT_READ, self._reap_balancer)
        self.log.info("balancer (pid %d) started as %s", pid, identity.name)

    def _reap_balancer(self) -> None:
        balancer = self.balancer
        try:
            _, status = os.waitpid(balancer.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        self.selector.unregister(balancer.pidfd)
        os.close(balancer.pidfd)
        balancer.channel.close()
        self.balancer = None
        if self.stopping:
            return
        self.log.warning("balancer (pid %d) exited: %s; restarting it", balancer.pid, _describe_status(status))
        lived_s = self.clock() - balancer.spawned_at
        self.balancer_respawn_at = self.clock() + (0.0 if lived_s > 1.0 else 0.5)

    def _attach_to_balancer(self, child: _Child) -> None:
        if self.balancer is None or child.balancer_end is None:
            return  # a restarted balancer picks up every READY worker's end
        try:
            channel.send(self.balancer.channel, Message(ATTACH, {"key": child.record.pid, "app": child.record.app}),
                         [child.balancer_end.fileno()])
        except OSError as exc:
            self.log.warning("could not hand worker %d to the balancer: %s", child.record.pid, exc)

    def _detach_from_balancer(self, child: _Child) -> None:
        if self.balancer is None or child.balancer_end is None:
            return
        try:
            channel.send(self.balancer.channel, Message(DETACH, {"key": child.record.pid}))
        except OSError:
            pass

    def _stop_balancer(self) -> None:
        if self.balancer is not None:
            try:
                signal.pidfd_send_signal(self.balancer.pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _kill_balancer_now(self) -> None:
        balancer = self.balancer
        try:
            signal.pidfd_send_signal(balancer.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(balancer.pid, 0)
        except ChildProcessError:
            pass
        os.close(balancer.pidfd)
        balancer.channel.close()
        self.balancer = None

    def _close_reuseport(self, app: str, index: int) -> None:
        for key in [k for k in self.reuseport if k[1] == app and k[2] == index]:
            self.reuseport.pop(key).close()

    # -- files -------------------------------------------------------------

    def _write_pidfile(self) -> None:
        path = self.config.master.pidfile
        if path:
            with open(path + ".tmp", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(path + ".tmp", path)

    def _cleanup(self) -> None:
        for child in list(self.children.values()):
            self._kill(child.record.pid, signal.SIGKILL)
            try:
                os.waitpid(child.record.pid, 0)
            except ChildProcessError:
                pass
            os.close(child.pidfd)
            child.channel.close()
        self.children.clear()
        if self.balancer is not None:
            self._kill_balancer_now()
        listeners_mod.close_all(self.sockets, self.config.listeners)
        for sock in self.reuseport.values():
            sock.close()
        self.selector.close()
        signal.set_wakeup_fd(-1)
        self._wakeup_read.close()
        self._wakeup_write.close()
        path = self.config.master.pidfile
        if path:
            try:
                with open(path) as f:
                    if f.read().strip() == str(os.getpid()):
                        os.unlink(path)
            except FileNotFoundError:
                pass


def _record_only(signum, frame) -> None:
    """The wakeup fd carries the signal number to the loop; the handler does nothing."""


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    return "failed to boot" if code == worker.EXIT_BOOT_FAILED else f"exit status {code}"
