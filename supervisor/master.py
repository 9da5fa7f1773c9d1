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
"""
from __future__ import annotations

import os
import random
import selectors
import signal
import socket
import stat
import time
from dataclasses import dataclass, field

import setproctitle

from supervisor import balancer as balancer_mod
from supervisor import channel, config as config_mod, listeners as listeners_mod, plan as plan_mod
from supervisor import activation, handoff, privileges, sdnotify, spawn, status as status_mod, watcher as watcher_mod
from supervisor import worker
from supervisor.channel import ChannelClosed
from supervisor.config import AppConfig, Config, ConfigError, ListenerConfig
from supervisor.lifecycle import Backoff, State, Worker
from supervisor.listeners import ListenerError
from supervisor.log import Logs
from supervisor.messages import (ATTACH, BOOT_FAILED, CHANGED, DETACH, DRAIN, HEARTBEAT, METRICS, READY, RELEASED,
                                 ROUTES, SOCKETS, STOP, TAKEN, TAKEOVER, UPSTREAM, Message, MessageError)
from supervisor.privileges import PrivilegeError
from supervisor.control import ControlServer
from supervisor.sidecar import Sidecar

QUICK_STOP_GRACE_S = 1.0
METRICS_PUSH_S = 1.0
ABORT_GRACE_S = 2.0  # after SIGABRT (stacks written), SIGKILL


@dataclass
class _Load:
    """A worker's last heartbeat: sent from its serving loop, so a stuck loop goes silent."""
    at: float                      # when heard (or spawned)
    requests: int = 0
    connections: int = 0
    busy: int = 0
    oldest_s: float | None = None  # age of the oldest running request then


@dataclass
class _Child:
    """A live worker process and the fds the master holds for it."""
    record: Worker
    channel: socket.socket
    pidfd: int
    balancer_end: socket.socket  # kept so a restarted balancer gets it again
    load: _Load
    replaces: int | None = None  # a recycled worker's pid, retired once this one is READY
    recycling: bool = False      # a replacement for this one is booting
    jitter: int = 0              # extra requests before max_requests recycles this one


@dataclass
class _Successor:
    """A new master taking over from this one (see handoff.py)."""
    channel: socket.socket
    pid: int | None
    pidfd: int
    taken: bool = False
    failed: bool = False


@dataclass
class _Generation:
    number: int
    config: AppConfig
    identity: privileges.Identity
    workers: int                       # how many it boots (the app's target, which may differ from config)


@dataclass
class _App:
    current: _Generation               # the generation serving (or booting, at start)
    target: int
    backoff: Backoff
    next: _Generation | None = None    # a new generation booting beside the current one
    respawn_at: dict[int, float] = field(default_factory=dict)  # worker index -> when
    ever_ready: bool = False
    boot_failed: bool = False
    restarts: int = 0              # workers replaced after dying
    retired_requests: int = 0      # requests served by workers that have exited
    last_traceback: str = ""

    @property
    def name(self) -> str:
        return self.current.config.name


class Master:
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
    }

    def __init__(self, config: Config, logs: Logs, clock=time.monotonic, takeover: str | None = None):
        self.config = config
        self.takeover = takeover              # taking over from a running master (handoff.connect spec)
        self.predecessor: socket.socket | None = None   # our channel to the master we take over from
        self.successor: _Successor | None = None        # a new master taking over from us
        self.takeover_listener: socket.socket | None = None
        self.logs = logs
        self.log = logs.error
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[str, socket.socket] = {}
        self.children: dict[int, _Child] = {}
        self.apps: dict[str, _App] = {}
        self.balancer: Sidecar | None = None
        self.watcher: Sidecar | None = None
        self.retiring_watchers: list[Sidecar] = []  # replaced, watching until the new one is ready
        self.sidecar_respawn_at: dict[str, float] = {}
        # One SO_REUSEPORT socket per (listener, app, worker index): a replacement
        # worker inherits its predecessor's socket, accept queue and all.
        self.reuseport: dict[tuple[str, str, int], socket.socket] = {}
        self.stopping = False
        self.exit_status = 0
        self.reloads = 0
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
        for key, _ in self.selector.select(timeout):
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

    # -- master upgrade: the new master's side ------------------------------

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

    # -- master upgrade: the old master's side ------------------------------

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
        successor = _Successor(sock, pid, os.pidfd_open(pid) if pid else -1)
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

    def _release_to(self, successor: _Successor, upstream_fd: int) -> None:
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
            self._upgrade_failed(f"the new master exited ({_describe_status(status)})")

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

    def _open_control(self) -> None:
        path = config_mod.control_socket_path(self.config)
        if path is None:
            return
        self.control = ControlServer(path, admins=self.config.master.admins, handle=self.command,
                                     log=self.log, clock=self.clock)
        self.selector.register(self.control.fileno(), selectors.EVENT_READ, self.control.on_readable)
        self.log.info("control socket at %s", path)
        self._open_takeover_listener(path)

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

    def _stop_command(self, now: bool = False) -> dict:
        (self.stop_quick if now else self.stop_graceful)()
        return {"ok": True}

    # -- apps, generations and workers -------------------------------------

    def _identity(self, app: AppConfig) -> privileges.Identity:
        running_as_root = os.geteuid() == 0
        user = config_mod.effective_user(app, running_as_root)
        if running_as_root and app.user is None:
            self.log.info("app %s names no user; its workers run as %s", app.name, user)
        return privileges.resolve(user, app.group)

    def _add_app(self, config: AppConfig) -> None:
        app = _App(_Generation(1, config, self._identity(config), config.workers), config.workers,
                   Backoff(max_delay_s=self.config.master.crash_backoff_max))
        self.apps[config.name] = app
        for index in range(1, config.workers + 1):
            self._spawn(app.current, index)

    def _start_generation(self, app: _App, config: AppConfig, workers: int) -> None:
        if app.next is not None:
            self._abandon_next(app, "superseded by a newer reload")
        app.next = _Generation(app.current.number + 1, config, self._identity(config), workers)
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

    def _spawn(self, generation: _Generation, index: int) -> _Child:
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
        child = _Child(Worker(app.name, index, generation.number, pid, self.clock()), parent_end, pidfd,
                       balancer_end, _Load(self.clock()))
        self.children[pid] = child
        self.selector.register(pidfd, selectors.EVENT_READ, lambda: self._reap(child))
        self.selector.register(parent_end, selectors.EVENT_READ, lambda: self._on_channel(child))
        self.log.debug("spawned %s", worker.title(spec))
        if app.max_requests_jitter:
            # Spread recycling so a fleet of workers started together does not retire together.
            child.jitter = random.randint(0, app.max_requests_jitter)
        return child

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

    def _on_heartbeat(self, child: _Child, fields: dict, app: _App | None) -> None:
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

    def _recycle(self, app: _App, child: _Child, why: str) -> None:
        """Replace a worker before it leaves: the new one boots, then the old one drains."""
        child.recycling = True
        self.counters["worker_recycles"] += 1
        self.log.info("worker %s#%d (pid %d) %s: recycling it", app.name, child.record.index, child.record.pid, why)
        replacement = self._spawn(app.current, child.record.index)
        replacement.replaces = child.record.pid

    def _hung(self, child: _Child, now: float) -> str | None:
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

    def _abort_hung(self, child: _Child, why: str, now: float) -> None:
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

    def _generation_workers(self, app: str, generation: int) -> list[_Child]:
        return [c for c in self.children.values()
                if c.record.app == app and c.record.generation == generation and c.record.alive]

    def _switch_if_ready(self, app: _App) -> None:
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

    def _abandon_next(self, app: _App, why: str) -> None:
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
                         record.generation, pid, _describe_status(status))
        if app.next is not None and record.generation == app.next.number:
            self.log.error("app %s: generation %d failed to boot:\n%s", app.name, app.next.number,
                           app.last_traceback.rstrip() or _describe_status(status))
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
        return self.reloads == 0 and all(not a.ever_ready and a.boot_failed for a in self.apps.values())

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

    def _rescale(self, app: _App, count: int) -> None:
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
        self.reloads += 1
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

    def restart_app(self, name: str) -> None:
        """A change to an app's `reload_on` files: a new generation of just that app."""
        app = self.apps.get(name)
        if app is not None and not self.stopping:
            self._start_generation(app, app.current.config, app.target)

    def _retire(self, child: _Child, now: float, handback: bool) -> None:
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

    # -- the balancer and the watcher --------------------------------------

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

    def _is_current(self, child: _Child) -> bool:
        app = self.apps.get(child.record.app)
        return app is not None and child.record.generation == app.current.number

    def _reap_balancer(self) -> None:
        balancer, self.balancer = self.balancer, None
        self.selector.unregister(balancer.pidfd)
        status = balancer.reap()
        if not self.stopping:
            self.log.warning("balancer (pid %d) exited: %s; restarting it", balancer.pid, _describe_status(status))
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

    def _attach_to_balancer(self, child: _Child) -> None:
        if self.balancer is None:
            return  # a restarted balancer picks up every READY worker's end
        try:
            channel.send(self.balancer.channel, Message(ATTACH, {"key": child.record.pid, "app": child.record.app}),
                         [child.balancer_end.fileno()])
        except OSError as exc:
            self.log.warning("could not hand worker %d to the balancer: %s", child.record.pid, exc)

    def _detach_from_balancer(self, child: _Child) -> None:
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


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    return "failed to boot" if code == worker.EXIT_BOOT_FAILED else f"exit status {code}"
