"""The master: bind listeners, fork and supervise workers, reload without dropping.

One selector wait drives everything: the signal wakeup fd, one pidfd per child and one
channel per child, with the nearest deadline (a respawn after backoff, a boot timeout,
a kill after a drain) as its timeout. Signal handlers only record. The master never
imports application code and never reads a byte from a client; it stays
single-threaded, so forking is always safe.

A reload is `plan.diff(old, new)` applied: a restarted app boots a whole new
generation beside the serving one, and only when every new worker said READY does
routing switch and the old generation drain, handing its idle keep-alive connections
to the new one through the balancer. A new generation that fails to boot is dropped
and the old one keeps serving.

This file holds the loop, the signals and commands, reload and stop. The rest of
`Master` lives beside it, one concern a file: master_workers.py (apps, generations,
supervision), master_sidecars.py (balancer, watcher, control socket, health) and
master_upgrade.py (handing everything to a new master).
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import time

import setproctitle

from supervisor.config import plan as plan_mod
from supervisor.config import reader as config_mod
from supervisor.config.model import Config, ConfigError
from supervisor.ipc import channel
from supervisor.ipc.messages import REOPEN, Message
from supervisor.master import status as status_mod
from supervisor.master.control import ControlServer
from supervisor.master.lifecycle import State
from supervisor.master.sidecar import Sidecar
from supervisor.master.sidecars import QUICK_STOP_GRACE_S, SidecarsMixin
from supervisor.master.upgrade import Successor, UpgradeMixin
from supervisor.master.workers import AppState, Child, WorkersMixin
from supervisor.system import activation, sdnotify
from supervisor.system import listeners as listeners_mod
from supervisor.system.listeners import ListenerError
from supervisor.system.log import Logs
from supervisor.system.privileges import PrivilegeError
from supervisor.watch import watcher as watcher_mod


class Master(WorkersMixin, SidecarsMixin, UpgradeMixin):
    """Owns every listener, child and deadline; `run()` returns the exit status."""

    # Every signal and every control command goes through `command()`.
    _SIGNALS = {
        signal.SIGTERM: ("stop", {}),
        signal.SIGINT: ("stop", {"now": True}),
        signal.SIGQUIT: ("stop", {"now": True}),
        signal.SIGHUP: ("reload", {}),
        signal.SIGTTIN: ("scale_all", {"delta": 1}),
        signal.SIGTTOU: ("scale_all", {"delta": -1}),
        signal.SIGUSR2: ("upgrade", {}),
        signal.SIGUSR1: ("reopen_logs", {}),
    }
    _COMMANDS = {
        "status": "_status",
        "stats": "_stats",
        "reload": "_reload_command",
        "restart": "_restart_command",
        "scale": "_scale_command",
        "scale_all": "_scale_all_command",
        "stop": "_stop_command",
        "upgrade": "_upgrade_command",
        "reopen_logs": "_reopen_logs_command",
    }

    def __init__(self, config: Config, logs: Logs, clock=time.monotonic, takeover: str | None = None):
        self.config = config
        self.takeover = takeover              # taking over from a running master (handoff.connect spec)
        self.predecessor: socket.socket | None = None   # our channel to the master we take over from
        self.successor: Successor | None = None        # a new master taking over from us
        self.takeover_listener: socket.socket | None = None
        self.logs = logs
        self.log = logs.error
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[str, socket.socket] = {}
        self.children: dict[int, Child] = {}
        self.apps: dict[str, AppState] = {}
        self.balancer: Sidecar | None = None
        self.watcher: Sidecar | None = None
        self.retiring_watchers: list[Sidecar] = []  # replaced, watching until the new one is ready
        self.sidecar_respawn_at: dict[str, float] = {}
        # One SO_REUSEPORT socket per (listener, app, worker index): a replacement
        # worker inherits its predecessor's socket, accept queue and all.
        self.reuseport: dict[tuple[str, str, int], socket.socket] = {}
        self.stopping = False
        self.exit_status = 0
        self.started_at = clock()
        self.counters: dict[str, int] = {"reloads": 0, "reloads_rejected": 0, "generation_switches": 0,
                                         "generations_dropped": 0, "worker_restarts": 0,
                                         "worker_timeouts": 0, "worker_recycles": 0}
        self._wakeup_read, self._wakeup_write = socket.socketpair()
        self.notifier = sdnotify.Notifier(None)   # replaced in run() from NOTIFY_SOCKET
        self.inherited: dict[str, int] = {}       # systemd's sockets by name, open for the master's life
        self.pending_ready: str | None = "start"  # "start"/"reload": the READY=1 systemd waits for
        self.control: ControlServer | None = None
        self.health_socket: socket.socket | None = None
        self.metrics_at: float | None = None  # next push of figures to the balancer's /metrics
        self.balancer_kill_at: float | None = None  # a draining balancer that outstays this dies

    # -- running -----------------------------------------------------------

    def run(self) -> int:
        self.notifier = sdnotify.Notifier.from_environ()
        self.inherited = activation.inherited()
        sdnotify.scrub(os.environ)  # before any fork: children never talk to systemd
        if self.takeover is not None:
            self._take_sockets()
        else:
            self.sockets = listeners_mod.open_all(self.config.listeners, inherited=self.inherited)
        try:
            self._install_signals()
            if self.predecessor is None:
                self._open_control()
                self._write_pidfile()
            self._open_health()
            setproctitle.setproctitle(f"baton: master [{self.config.path or 'serve'}]")
            for name, sock in self.sockets.items():
                self.log.info("listening on %s (%s)", listeners_mod.describe(sock), name)
            self._start_balancer()
            self._start_watcher()
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
        registered = self.selector.get_map()
        for key, _ in self.selector.select(timeout):
            # A handler earlier in this batch may have closed this fd (a child's pidfd
            # reaped it and its channel): its event is stale.
            if registered.get(key.fd) is key:
                key.data()
        now = self.clock()
        if self.control is not None:
            self.control.expire(now)
        self._on_deadlines(now)
        self._notify_if_ready()

    def _notify_if_ready(self) -> None:
        """Pay the READY=1 systemd waits for: at start once every app's generation is
        complete, after a reload once no app has a new generation booting."""
        if self.pending_ready is None or self.stopping:
            return
        if any(app.next is not None for app in self.apps.values()):
            return
        if self.pending_ready == "start" and not all(
                sum(c.record.state is State.READY for c in self._generation_workers(name, app.current.number))
                >= app.target for name, app in self.apps.items()):
            return
        self.pending_ready = None
        if self.predecessor is not None:
            self._taken()
            return  # READY=1 once the old master let go, with our pid as MAINPID
        self.notifier.ready(status="serving: " + ", ".join(
            f"{name} gen {app.current.number} x{app.target}" for name, app in self.apps.items()))

    # -- master upgrade: the new master's side ------------------------------

    # -- master upgrade: the old master's side ------------------------------

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
            if signum in self._SIGNALS:
                self.log.info("received %s", signal.Signals(signum).name)
                self.command(*self._SIGNALS[signum])

    def command(self, name: str, args: dict) -> dict:
        """The one way to act on the master: signals and `baton ctl` both come here."""
        method = self._COMMANDS.get(name)
        if method is None:
            return {"ok": False, "errors": [f"unknown command {name!r}"]}
        try:
            return getattr(self, method)(**args)
        except TypeError as exc:
            return {"ok": False, "errors": [f"{name}: {exc}"]}

    def _status(self) -> dict:
        return status_mod.status(self)

    def _stats(self) -> dict:
        return {"ok": True, "counters": dict(self.counters)}

    def _reload_command(self) -> dict:
        errors = self.reload(restart_all=True)
        return {"ok": not errors, "errors": errors} if errors else {"ok": True}

    def _restart_command(self, app: str) -> dict:
        if app not in self.apps:
            return {"ok": False, "errors": [f"no app named {app!r}"]}
        self.restart_app(app)
        return {"ok": True}

    def _scale_command(self, app: str, workers: int) -> dict:
        if app not in self.apps:
            return {"ok": False, "errors": [f"no app named {app!r}"]}
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            return {"ok": False, "errors": [f"workers: expected an integer >= 1, found {workers!r}"]}
        self._rescale(self.apps[app], workers)
        self.log.info("scaled app %s to %d workers", app, workers)
        return {"ok": True}

    def _scale_all_command(self, delta: int) -> dict:
        for app in self.apps.values():
            self._rescale(app, max(1, app.target + delta))
        self.log.info("scaled %s: %s", "up" if delta > 0 else "down", self._targets())
        return {"ok": True}

    def _reopen_logs_command(self) -> dict:
        """logrotate moved the files: reopen them here and hand the new files to every
        child, which cannot open them itself (it runs as another user)."""
        pairs = self.logs.reopen()
        if not pairs:
            return {"ok": True}
        message = Message(REOPEN, {"numbers": [number for number, _ in pairs]})
        new_fds = [fd for _, fd in pairs]
        try:
            ends = [child.channel for child in self.children.values() if child.channel.fileno() >= 0]
            if self.balancer is not None:
                ends.append(self.balancer.channel)
            for end in ends:
                try:
                    channel.send(end, message, new_fds)
                except OSError as exc:
                    self.log.warning("could not hand reopened logs to a child: %s", exc)
        finally:
            self.logs.release(pairs)
        self.log.info("reopened %d log files", len(pairs))
        return {"ok": True}

    def _stop_command(self, now: bool = False) -> dict:
        (self.stop_quick if now else self.stop_graceful)()
        return {"ok": True}

    # -- apps, generations and workers -------------------------------------

    # -- deadlines ---------------------------------------------------------

    def _next_deadline(self) -> float | None:
        deadlines = [at for app in self.apps.values() for at in app.respawn_at.values()]
        deadlines.extend(self.sidecar_respawn_at.values())
        if self.metrics_at is not None:
            deadlines.append(self.metrics_at)
        if self.balancer_kill_at is not None and self.balancer is not None:
            deadlines.append(self.balancer_kill_at)
        if self.control is not None and self.control.next_deadline() is not None:
            deadlines.append(self.control.next_deadline())
        for child in self.children.values():
            if child.record.kill_at is not None:
                deadlines.append(child.record.kill_at)
            elif child.record.state is State.SPAWNED:
                deadlines.append(child.record.spawned_at + self.config.master.boot_timeout)
            elif child.record.state is State.READY:
                app = self.apps.get(child.record.app)
                if app is not None and app.current.config.timeout:
                    deadlines.append(child.load.at + app.current.config.timeout)
        return min(deadlines, default=None)

    def _on_deadlines(self, now: float) -> None:
        if self.metrics_at is not None and now >= self.metrics_at:
            self._push_metrics()
        if self.balancer_kill_at is not None and now >= self.balancer_kill_at and self.balancer is not None:
            self.balancer_kill_at = None
            self.balancer.signal(signal.SIGKILL)
        for child in list(self.children.values()):
            record = child.record
            if record.kill_at is not None and now >= record.kill_at:
                record.kill_at = None
                self._kill(record.pid, signal.SIGKILL)
            elif record.state is State.SPAWNED and now >= record.spawned_at + self.config.master.boot_timeout:
                self.log.error("worker %s#%d (pid %d) did not boot within %ss", record.app, record.index,
                               record.pid, self.config.master.boot_timeout)
                record.kill_at = now  # killed on the next pass; counts as a failed boot
            elif (why := self._hung(child, now)) is not None:
                self._abort_hung(child, why, now)
        if self.stopping:
            return
        for name, at in list(self.sidecar_respawn_at.items()):
            if now >= at:
                del self.sidecar_respawn_at[name]
                (self._start_balancer if name == "balancer" else self._start_watcher)()
        for app in self.apps.values():
            for index, at in list(app.respawn_at.items()):
                if now >= at:
                    del app.respawn_at[index]
                    if index <= app.target:
                        self._spawn(app.current, index)

    # -- actions (signals and, later, control commands) ----------------------

    def stop_graceful(self) -> None:
        if self.stopping:
            return
        self.notifier.stopping(status="stopping: draining workers")
        self.stopping = True
        self._stop_sidecars(drain_balancer=True)
        now = self.clock()
        for child in self.children.values():
            self._retire(child, now, handback=False)

    def stop_quick(self) -> None:
        if not self.stopping:
            self.notifier.stopping(status="stopping now")
        self.stopping = True
        self._stop_sidecars()
        deadline = self.clock() + QUICK_STOP_GRACE_S
        for child in self.children.values():
            if child.record.state is not State.DRAINING:
                child.record.move(State.DRAINING, self.clock())
            child.record.kill_at = min(deadline, child.record.kill_at or deadline)
            self._kill(child.record.pid, signal.SIGQUIT)

    def reload(self, restart_all: bool = False, restart_apps: tuple[str, ...] = ()) -> list[str]:
        """Apply the config file as it is now; return the problems ([] on success)."""
        if self.stopping or self.config.path is None:
            return ["nothing to reload: no config file" if self.config.path is None else "stopping"]
        announce = self.pending_ready is None  # one before start-up READY is covered by that READY
        if announce:
            self.notifier.reloading(status=f"reloading {self.config.path}")
        try:
            new = config_mod.load(self.config.path)
        except ConfigError as exc:
            for problem in exc.problems:
                self.log.error("reload rejected: %s", problem)
            self.log.error("reload rejected; the running config stays")
            if announce:
                self.notifier.ready(status=f"reload rejected: {exc.problems[0]}; the running config stays")
            self.counters["reloads_rejected"] += 1
            return exc.problems
        plan = plan_mod.diff(self.config, new, restart_all=restart_all)
        restart = set(plan.apps_restart) | {name for name in restart_apps if name in new.apps}
        try:
            opened = {name: listeners_mod.open_listener(new.listeners[name], inherited=self.inherited)
                      for name in plan.listeners_open if new.listeners[name].mode != "reuseport"}
        except (ListenerError, PrivilegeError) as exc:
            self.log.error("reload rejected: %s; the running config stays", exc)
            if announce:
                self.notifier.ready(status=f"reload rejected: {exc}; the running config stays")
            self.counters["reloads_rejected"] += 1
            return [str(exc)]
        if announce:
            self.pending_ready = "reload"  # paid by _notify_if_ready once no new generation boots
        self.counters["reloads"] += 1
        for line in plan.describe():
            self.log.info("reload: %s", line)
        old_config, self.config = self.config, new
        if self.control is not None:
            self.control.admins = new.master.admins
        for name in plan.listeners_close:
            sock = self.sockets.pop(name, None)
            if sock is not None:
                sock.close()  # workers and the balancer keep their own copies until they drain
            for key in [k for k in self.reuseport if k[0] == name]:
                self.reuseport.pop(key).close()
        self.sockets.update(opened)
        for name, sock in opened.items():
            self.log.info("listening on %s (%s)", listeners_mod.describe(sock), name)
        self._send_routes(opened)
        now = self.clock()
        for name in plan.apps_stop:
            app = self.apps.pop(name)
            for child in [c for c in self.children.values() if c.record.app == name]:
                self._retire(child, now, handback=False)
        for name in plan.apps_start:
            self._add_app(new.apps[name])
        for name in restart:
            self._start_generation(self.apps[name], new.apps[name], new.apps[name].workers)
        for name, count in plan.apps_rescale.items():
            if name not in restart:
                self._rescale(self.apps[name], count)
        for name, app in self.apps.items():
            if name not in restart and name in new.apps:
                app.current.config = new.apps[name]  # routing-only fields; workers need nothing
        if watcher_mod.watch_for(old_config) != watcher_mod.watch_for(new):
            self._restart_watcher()
        return []

    # -- the balancer and the watcher --------------------------------------

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
            child.balancer_end.close()
        self.children.clear()
        for sidecar in (self.balancer, self.watcher, *self.retiring_watchers):
            if sidecar is not None:
                sidecar.kill_now()
        self.balancer = self.watcher = None
        listeners_mod.close_all(self.sockets, self.config.listeners)
        activation.close(self.inherited)
        for sock in self.reuseport.values():
            sock.close()
        if self.control is not None:
            self.control.close()
        self._close_takeover_listener()
        if self.successor is not None:
            if self.successor.channel.fileno() >= 0:
                self.successor.channel.close()
            if self.successor.pidfd >= 0:
                os.close(self.successor.pidfd)
        if self.predecessor is not None:
            self.predecessor.close()
        if self.health_socket is not None:
            self.health_socket.close()
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
