"""The master process: a thin executor around the supervision core.

The master binds the listeners, forks the balancer, the watcher and the workers, and
answers signals and the control socket. It never imports application code and never
reads a byte from a client; it stays single-threaded, so forking is always safe.

Every decision is the supervision core's (`supervisor.master.supervision`): the master
feeds it commands and events and carries out the actions it answers with, through
small objects that own their state:

* `WorkerPool` forks workers and turns their channels and pidfds into events;
* `Balancers` (a `BalancerHandle` per balancer of `[master] balancers`) and
  `WatcherHandle` start and talk to the helper processes;
* `Sockets` holds every listening socket by name;
* `Predecessor` / `Successors` are the two sides of a master upgrade;
* `ControlServer` answers `baton ctl`.

One `Loop` (supervisor.system.loop) drives them all: signals, pidfds, channels, the
control socket, and a timer at the core's next deadline.

A reload is `plan.diff(old, new)` applied: a restarted app boots a whole new
generation beside the serving one (see the core for the rules).
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time

import setproctitle

from supervisor.balancer.process import routing_payload
from supervisor.config import plan as plan_mod
from supervisor.config import reader as config_mod
from supervisor.config import tls as tls_config
from supervisor.config.model import (
    MAX_WORKERS,
    AppConfig,
    Config,
    ConfigError,
    MasterConfig,
    control_socket_path,
    effective_user,
)
from supervisor.http import hostcheck
from supervisor.ipc import channel, messages
from supervisor.master import commands
from supervisor.master import figures as figures_mod
from supervisor.master import status as status_mod
from supervisor.master import supervision as sv
from supervisor.master.attaching import AttachedWorkers
from supervisor.master.balancer_handle import Balancers
from supervisor.master.control import ControlError, ControlServer
from supervisor.master.lifecycle import State
from supervisor.master.pool import WorkerPool, describe_status
from supervisor.master.sockets import Sockets
from supervisor.master.templates import Templates
from supervisor.master.upgrade import Predecessor, Successors
from supervisor.master.watcher_handle import WatcherHandle
from supervisor.master.watcher_handle import needed as watcher_needed
from supervisor.master.watcher_handle import prepare as prepare_watcher
from supervisor.system import activation, limits, namespaces, privileges, sdnotify
from supervisor.system import listeners as listeners_mod
from supervisor.system.listeners import ListenerError
from supervisor.system.log import Logs
from supervisor.system.loop import Loop, Timer
from supervisor.system.privileges import PrivilegeError
from supervisor.system.words import count as counted
from supervisor.worker import access as worker_access
from supervisor.worker import spec as worker_spec

METRICS_PUSH_S = 1.0         # the figures to balancer 0 (and /proc sampled) at least this often
METRICS_SOON_S = 0.05        # ... and this soon after a worker's figures changed, at most this often

def core_settings(master: MasterConfig) -> sv.Settings:
    return sv.Settings(boot_timeout_s=master.boot_timeout, graceful_timeout_s=master.graceful_timeout,
                       crash_backoff_max_s=master.crash_backoff_max, balancer_silent_s=sv.BALANCER_SILENT_S)


class Master:
    """Owns every listener, child and deadline; `run()` returns the exit status."""

    def __init__(self, config: Config, logs: Logs, clock=time.monotonic, takeover: str | None = None):
        self.config = config
        self.logs = logs
        self.log = logs.error
        self.clock = clock
        self.loop = Loop(clock)
        self.core = sv.Supervisor(core_settings(config.master), clock)
        self.pool = WorkerPool(self.loop, logs, self._on_event, on_stats=self._on_stats,
                               on_attached=lambda key, message: self.attached.on_message(key, message))
        self.templates = Templates(self.loop, self.log, self.pool.sink, self._on_event)   # preloaded apps'
        self.requests = figures_mod.RequestTotals()     # the workers' request figures, per app
        self.processes = figures_mod.ProcessTotals()    # every child's CPU, memory, fds, per role
        self._metrics_timer: Timer | None = None
        self._metrics_pushed_at = float("-inf")
        # How many there are is fixed for this master's life (a change waits for an upgrade).
        self.balancers = Balancers(self.loop, logs, config.master.balancers, self._on_sidecar_exit,
                                   on_alive=lambda name: self._on_event(sv.SidecarHeartbeat(name)))
        self.watcher = WatcherHandle(self.loop, logs, self._on_changed, self._on_sidecar_exit,
                                     balancer_identity=lambda: self.balancers.identity)
        self.sockets = Sockets({})
        self.notifier = sdnotify.Notifier(None)   # replaced in run() from NOTIFY_SOCKET
        self.successors = Successors(self.loop, self.log, self.sockets, self.balancers, self.notifier,
                                     self._on_taken_over)
        self.predecessor = Predecessor(self.loop, self.log, takeover, self._on_released) if takeover else None
        self.control: ControlServer | None = None
        self.pending_ready: str | None = "start"  # "start"/"reload": the READY=1 systemd waits for
        self.exit_status = 0
        self.started_at = clock()
        self.counters = {"reloads": 0, "reloads_rejected": 0}
        self.started_master = config.master   # the values in force of settings that wait for an upgrade
        self.ticket_secrets: dict[str, str] = {}   # app -> its TLS session-ticket secret (hex)
        self._core_timer: Timer | None = None
        self._commands = commands.Commands(self)
        self.attached = AttachedWorkers(self)   # workers started elsewhere (master.attaching)
        self._stop_began: tuple[float, str] | None = None   # when the stop began, and what kind

    # -- running -------------------------------------------------------------------

    def run(self) -> int:
        stopped = False
        limits.raise_fd_limit(self.log)   # before any fork: every child inherits it
        self.notifier.address = sdnotify.Notifier.from_environ().address
        self.sockets.inherited = activation.inherited()
        sdnotify.scrub(os.environ)   # before any fork: children never talk to systemd
        try:
            if self.predecessor is not None:
                self.predecessor.take_sockets(self.sockets, self.config, self.config.master.boot_timeout)
            else:
                self.sockets.open_all(self.config)
            for signum in commands.SIGNALS:
                self.loop.on_signal(signum, self._on_signal)
            if self.predecessor is None:
                self._open_control(self.config)
                _write_pidfile(self.config.master.pidfile)
            if self.sockets.open_health(self.config):
                self.log.info("health and metrics on %s/healthz and /metrics",
                              listeners_mod.describe(self.sockets.health))
            setproctitle.setproctitle(f"baton: master [{self.config.path or 'serve'}]")
            self._log_listening(self.config, tuple(self.config.listeners), self.sockets.listening)
            prepare_watcher(self.config)
            # What the master holds by now (its modules, the first config) lives as long
            # as it does: out of its collector's reach, no collection of the master's
            # writes to the pages its sidecars share (the sidecars freeze theirs: spawn).
            gc.freeze()
            for handle in self.balancers.handles:
                self._start_sidecar(handle.name)
            self._start_sidecar("watcher")
            for app in self.config.apps.values():
                self._execute(self.core.add_app(app, self._identity(app)))
            self.attached.apply(self.config)
            self.loop.every(METRICS_PUSH_S, self._sample_and_push)
            self.loop.before_wait(self._arm_core_timer)
            self.loop.after_events(self._notify_if_ready)
            while not (self.core.stopping and self.core.idle() and not self.balancers.running):
                self.loop.run_once()
            stopped = True
            return self.exit_status
        finally:
            self._cleanup()
            if stopped:
                self._log_stopped()

    def _note_stop(self, kind: str) -> None:
        if self._stop_began is None:
            self._stop_began = (self.clock(), kind)

    def _log_stopped(self) -> None:
        """The master's last line: that it stopped, and how long stopping took."""
        began, kind = self._stop_began or (self.clock(), "drain")
        took_s = self.clock() - began
        if kind == "drain":
            self.log.info("master stopped after a %.1f s drain", took_s)
        elif kind == "handover":
            self.log.info("master stopped after a %.1f s drain into the new master", took_s)
        else:
            self.log.info("master stopped after a quick stop of %.1f s", took_s)

    def _arm_core_timer(self) -> None:
        """One loop timer at the core's nearest deadline, moved when that changes."""
        deadline = self.core.next_deadline()
        timer = self._core_timer
        if timer is not None and not timer.cancelled and timer.when == deadline:
            return
        if timer is not None:
            timer.cancel()
        self._core_timer = None if deadline is None else self.loop.call_at(deadline, self._on_core_deadline)

    def _on_core_deadline(self) -> None:
        self._core_timer = None
        self._execute(self.core.tick())

    def _on_event(self, event) -> None:
        self._execute(self.core.handle(event))

    def _notify_if_ready(self) -> None:
        """Pay the READY=1 systemd waits for: at start once every app's generation is
        complete, after a reload once no app has a new generation booting."""
        if self.pending_ready is None or self.core.stopping or self.core.booting():
            return
        if self.pending_ready == "start" and not self.core.complete():
            return
        self.pending_ready = None
        if self.predecessor is not None:
            self.predecessor.taken(self.balancers.first)
            return   # READY=1 once the old master let go, with our pid as MAINPID
        self.notifier.ready(status="serving: " + ", ".join(
            f"{name} gen {app.current.number} x{app.target}" for name, app in self.core.apps.items()))

    # -- carrying out the core's actions -------------------------------------------

    def _execute(self, actions: list) -> None:
        for action in actions:
            self._ACTIONS[type(action)](self, action)

    def _do_spawn(self, action: sv.Spawn) -> None:
        if not self.core.wants_fork(action.key):
            return   # an earlier action of the same batch made it moot
        generation, app = action.generation, action.generation.config
        master_end, child_end = channel.pair()
        pairs = [channel.pair() for _ in self.balancers.handles]   # (the balancer's end, the worker's)
        balancer_ends, worker_balancer_ends = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        try:
            listeners = self.sockets.for_worker(self.config, app, action.index)
            spec = self._worker_spec(generation, action.index, child_end, listeners, worker_balancer_ends)
        except (ListenerError, OSError) as exc:
            for end in (master_end, child_end, *balancer_ends, *worker_balancer_ends):
                end.close()
            self._on_event(sv.SpawnFailed(action.key, str(exc)))
            return
        try:
            if app.preload:   # its template forks it; Spawned comes with its HELLO
                self.pool.spawn_from(self.templates, action.key, spec, master_end, balancer_ends)
                return
            pid = self.pool.spawn(action.key, spec, master_end, balancer_ends)
        except OSError as exc:
            self._on_event(sv.SpawnFailed(action.key, str(exc)))
            return
        self._on_event(sv.Spawned(action.key, pid))

    def _worker_spec(self, generation: sv.Generation, index: int, child_end: socket.socket,
                     listeners: dict[str, socket.socket], worker_balancer_ends: tuple[socket.socket, ...]
                     ) -> worker_spec.WorkerSpec:
        """What worker `index` of `generation` gets (index 0: its template, which has no
        listeners nor balancer channels of its own)."""
        app = generation.config
        return worker_spec.WorkerSpec(
            app=app, index=index, generation=generation.number, identity=generation.identity,
            graceful_timeout_s=app.graceful_timeout if app.graceful_timeout is not None
            else self.config.master.graceful_timeout,
            master_pid=os.getpid(), heartbeat_s=sv.heartbeat_interval_s(app),
            channel=child_end, listeners=listeners, balancers=worker_balancer_ends,
            log_level=logging.getLevelName(self.log.getEffectiveLevel()).lower(),
            log_format=self.logs.log_format, access_log_format=self.logs.access_log_format,
            proxy_listeners=frozenset(name for name in app.listeners
                                      if self.config.listeners[name].proxy_protocol),
            proxy_allow_ips={name: self.config.listeners[name].proxy_allow_ips for name in app.listeners
                             if self.config.listeners[name].proxy_protocol},
            host_routes=hostcheck.routes_for(routing_payload(self.config), app.name),
            config_source=worker_access.app_source(self.config, app.name),
            tls_listeners=frozenset(name for name in app.listeners if self.config.listeners[name].tls),
            tls_ticket_secret=self._ticket_secret(app),
            redirect_https={name: self.config.listeners[name].redirect_https for name in app.listeners
                            if self.config.listeners[name].redirect_https is not None})

    def _do_start_template(self, action: sv.StartTemplate) -> None:
        generation = action.generation
        master_end, child_end = channel.pair()
        try:
            spec = self._worker_spec(generation, 0, child_end, {}, ())
            pid = self.templates.start(spec, master_end)
        except OSError as exc:
            for end in (master_end, child_end):
                end.close()
            self._on_event(sv.TemplateExited(generation.app, generation.number, f"not forked ({exc})"))
            return
        self._on_event(sv.TemplateStarted(generation.app, generation.number, pid))

    def _do_stop_template(self, action: sv.StopTemplate) -> None:
        self.templates.stop(action.app, action.generation)

    def _do_kill_template(self, action: sv.KillTemplate) -> None:
        self.templates.kill(action.app, action.generation, action.signal)

    def _ticket_secret(self, app: AppConfig) -> str:
        """The app's session-ticket secret, the same for all its workers and generations
        while this master runs (so a client resumes anywhere in the app); "" without TLS."""
        if app.certificate is None:
            return ""
        return self.ticket_secrets.setdefault(app.name, os.urandom(32).hex())

    def _do_stop(self, action: sv.Stop) -> None:
        self.pool.stop(action.key, action.handback)

    def _do_kill(self, action: sv.Kill) -> None:
        self.pool.kill(action.key, action.signal)

    def _do_attach(self, action: sv.Attach) -> None:
        child = self.pool.children.get(action.key)
        if child is not None:
            self.balancers.attach(child.pid, child.app, child.balancer_ends, child.worker_ends, child.pidfd)
            self.pool.release_worker_ends(child)

    def _do_detach(self, action: sv.Detach) -> None:
        child = self.pool.children.get(action.key)
        if child is not None:
            self.balancers.detach(child.pid)

    def _do_release_slot(self, action: sv.ReleaseSlot) -> None:
        self.sockets.release_slot(action.app, action.index)

    def _do_start_sidecar(self, action: sv.StartSidecar) -> None:
        self._start_sidecar(action.name)

    def _do_signal_sidecar(self, action: sv.SignalSidecar) -> None:
        if sv.is_balancer(action.name):
            self.balancers.signal(action.name, signal.Signals[action.signal])
        else:
            self.watcher.signal(signal.Signals[action.signal])

    def _do_drain_balancer(self, action: sv.DrainBalancer) -> None:
        handle = self.balancers.by_name.get(action.name)
        if handle is None:
            return
        if not handle.drain():
            handle.signal(signal.SIGTERM)
        elif handle.index == 0:
            self._push_metrics()

    def _do_log(self, action: sv.Log) -> None:
        self.log.log(logging.getLevelName(action.level.upper()), "%s", action.text)

    def _do_notify(self, action: sv.Notify) -> None:
        self.notifier.status(action.text)

    def _do_give_up(self, action: sv.GiveUp) -> None:
        self.exit_status = action.exit_status
        self.stop(now=True)

    _ACTIONS = {
        sv.Spawn: _do_spawn, sv.Stop: _do_stop, sv.Kill: _do_kill, sv.Attach: _do_attach,
        sv.Detach: _do_detach, sv.ReleaseSlot: _do_release_slot, sv.StartSidecar: _do_start_sidecar,
        sv.SignalSidecar: _do_signal_sidecar, sv.DrainBalancer: _do_drain_balancer, sv.Log: _do_log,
        sv.Notify: _do_notify, sv.GiveUp: _do_give_up, sv.StartTemplate: _do_start_template,
        sv.StopTemplate: _do_stop_template, sv.KillTemplate: _do_kill_template,
    }

    # -- sidecars --------------------------------------------------------------------

    def _start_sidecar(self, name: str) -> None:
        if sv.is_balancer(name):
            handle = self.balancers.by_name[name]
            if handle.starts:   # a replacement: on fresh channels (see WorkerPool.relink)
                self.pool.relink(handle.index)
            links = self._balancer_links()
            self.balancers.start(name, self.config, self.sockets.balanced(self.config), links,
                                 self.sockets.health, self.clock())
            for child in self.pool.children.values():   # the forked balancer holds its copies now
                if child.pid in links:
                    self.pool.release_worker_ends(child, handle.index)
        else:
            if not watcher_needed(self.config):
                return
            self.watcher.start(self.config, self.clock())
        self._on_event(sv.SidecarStarted(name))

    def _balancer_links(self) -> dict[int, tuple]:
        """The serving workers of every current generation: what a new balancer routes to
        (each worker's app, balancer channel ends and copies of its own ends, by balancer
        index, and its pidfd)."""
        links = {}
        for key, child in self.pool.children.items():
            record, app = self.core.record_of(key), self.core.apps.get(child.app)
            if (record is not None and app is not None and record.state is State.READY
                    and record.generation == app.current.number):
                links[child.pid] = (child.app, child.balancer_ends, child.worker_ends, child.pidfd)
        links.update(self.attached.routed_links())
        return links

    def _on_sidecar_exit(self, name: str, status: int | None) -> None:
        self._on_event(sv.SidecarExited(name, describe_status(status)))

    def _on_changed(self, topics: list[str]) -> None:
        try:
            if "config" in topics:
                self.reload()
            for topic in topics:
                if topic.startswith("app:"):
                    self.restart_app(topic[len("app:"):])
        except Exception:   # noqa: BLE001 - a bug must reach the log, not end the master
            self.log.exception("internal error handling a change on disk (%s)", ", ".join(topics))

    def _on_stats(self, key: int, app: str, stats: messages.Stats) -> None:
        """A worker's request figures changed: balancer 0 hears them soon (coalesced with
        whatever else changes meanwhile, and at most every METRICS_SOON_S), so /metrics
        counts a response within about that much of it, in `share` mode too."""
        self.requests.update(key, app, stats)
        if self._metrics_timer is None and self.sockets.health is not None:
            when = max(self.loop.now, self._metrics_pushed_at + METRICS_SOON_S)
            self._metrics_timer = self.loop.call_at(when, self._push_metrics)

    def _sample_and_push(self) -> None:
        """Every METRICS_PUSH_S: every child's CPU, memory and fds from /proc, then the push."""
        if self.sockets.health is None:
            return   # no /metrics: nothing to sample for
        master_pid = os.getpid()
        processes = [(master_pid, "master", "")]
        processes.extend((handle.pid, "balancer", "") for handle in self.balancers.handles if handle.pid)
        if self.watcher.process is not None:
            processes.append((self.watcher.process.pid, "watcher", ""))
        processes.extend((child.pid, "worker", child.app) for child in self.pool.children.values()
                         if child.pid > 0)   # (a template's worker has none until its HELLO)
        processes.extend((template.pid, "template", template.app) for template in self.templates.running.values())
        samples = {}
        for key in processes:
            sample = status_mod.process_sample(key[0])
            if sample is not None:
                samples[key] = sample
        self.processes.observe(samples, self.core.apps)
        self._push_metrics()

    def _push_metrics(self) -> None:
        """The master's figures for the first balancer's /metrics, with the other
        balancers' own (it adds its own)."""
        if self._metrics_timer is not None:
            self._metrics_timer.cancel()
            self._metrics_timer = None
        first = self.balancers.first
        if not first.running:
            return
        self._metrics_pushed_at = self.loop.now
        self.requests.keep_only(self.pool.children, self.core.apps)
        others = self.balancers.others_figures()
        apps = {name: dict(figures) for name, figures in others.apps.items()}
        figures_mod.merge(apps, self.requests.per_app(self.core.apps))
        process_apps, process_overall = self.processes.figures()
        figures_mod.merge(apps, process_apps)
        for name, app in self.core.apps.items():
            apps.setdefault(name, {}).update({"baton_workers": len(self.core.serving(name)),
                                              **figures_mod.restart_figures(app.restart_reasons)})
        overall = {**others.overall, **process_overall, "baton_reloads_total": self.counters["reloads"]}
        for message in figures_mod.messages_for(apps, overall):
            try:
                if not first.send(message):
                    return
            except ValueError as exc:   # an app's figures outgrew a message (names of ~1000 characters)
                self.log.warning("could not send the figures for /metrics to the balancer: %s", exc)
                return

    # -- signals and commands ------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        name, args = commands.SIGNALS[signum]
        self.log.info("received %s", signal.Signals(signum).name)
        try:
            self.command(name, args)
        except Exception:   # noqa: BLE001 - a bug must reach the log, not end the master
            self.log.exception("internal error handling %s", signal.Signals(signum).name)

    def command(self, name: str, args: dict) -> dict:
        """The one way to act on the master: signals and `baton ctl` both come here.
        Arguments are checked before the command runs; an error inside it propagates
        (to the control socket's handler, which logs it and answers "internal error")."""
        return self._commands.run(name, args)

    # -- what the commands do --------------------------------------------------------

    def status(self) -> dict:
        return status_mod.report(self)

    def stats(self) -> dict:
        return {"ok": True, "counters": {**self.counters, **self.core.counters}}

    def restart_app(self, name: str) -> None:
        """A new generation of just that app (`baton ctl restart`, or its reload_on files)."""
        app = self.core.apps.get(name)
        if app is None:
            return
        config = app.current.config
        if config.certificate is not None:
            # A rotated certificate or key: one that does not load is refused here,
            # naming the file, and the serving generation stays.
            problems = tls_config.check_files(config.certificate, config.private_key, config.client_ca)
            if problems:
                self.log.error("app %r not restarted: %s", name, "; ".join(
                    f"apps.{name}.{key}: {message}" for key, message in problems))
                return
        self._execute(self.core.restart_app(name, config, app.current.identity, app.target))

    def scale(self, name: str, workers: int) -> None:
        self._execute(self.core.rescale(name, workers))
        self.log.info("scaled app %r to %s", name, counted(workers, "worker"))

    def scale_all(self, delta: int) -> None:
        for name, app in self.core.apps.items():
            self._execute(self.core.rescale(name, min(MAX_WORKERS, max(1, app.target + delta))))
        self.log.info("scaled %s: %s", "up" if delta > 0 else "down",
                      ", ".join(f"{name}={app.target}" for name, app in self.core.apps.items()))

    def reopen_logs(self) -> None:
        """logrotate moved the files: reopen them here (workers write through the
        master) and hand the new files to the balancer, which cannot open them itself
        (it runs as another user)."""
        pairs = self.logs.reopen()
        if not pairs:
            return
        message = messages.Reopen(numbers=tuple(number for number, _ in pairs))
        new_fds = [fd for _, fd in pairs]
        try:
            self.balancers.send_all(message, new_fds)
        finally:
            self.logs.release(pairs)
        self.log.info("reopened %s", counted(len(pairs), "log file"))

    def stop(self, now: bool = False) -> None:
        if not self.core.stopping:
            self.notifier.stopping(status="stopping now" if now else "stopping: draining workers")
        self._note_stop("quick" if now else "drain")
        self.successors.accepting = False
        self._execute(self.core.stop(graceful=not now))

    def upgrade(self) -> dict:
        if self.config.path is None:
            return {"ok": False, "errors": ["upgrade needs a config file (baton run -c FILE)"]}
        if self.core.stopping:
            return {"ok": False, "errors": ["an upgrade or a stop is already under way"]}
        return self.successors.start(self.config.path)

    def _on_taken_over(self, pid: int | None) -> None:
        """A new master took over: let go of the control socket and drain into it."""
        if self.control is not None:
            self._close_control()
        self._note_stop("handover")
        self.successors.accepting = False
        self._execute(self.core.stop(graceful=True, handback=True))

    def _on_released(self) -> None:
        """The old master let go: this one is the master now."""
        try:
            self._open_control(self.config)
        except ControlError as exc:
            self.log.error("no control socket: %s", exc)
        _write_pidfile(self.config.master.pidfile)
        self.notifier.ready(status=f"serving; took over ({os.getpid()})")
        self.log.info("took over: this master (pid %d) is now serving", os.getpid())
        self.predecessor = None

    # -- reload ----------------------------------------------------------------------

    def _send_worker_routes(self, config: Config) -> None:
        """Workers check every request's Host against the routing of the listeners
        they share (http.hostcheck); routing changes restart no app, so the workers
        that serve on are told here, each the part its app needs."""
        payload = routing_payload(config)
        for child in self.pool.children.values():
            if child.app not in config.apps or child.channel.fileno() < 0:
                continue   # its app is being removed: it drains with the table it has
            message = messages.Routes(routes=hostcheck.routes_for(payload, child.app), open=())
            try:
                channel.send(child.channel, message)
            except OSError as exc:
                self.log.warning("could not send the new routing to worker %d: %s", child.pid, exc)

    def reload(self, restart_all: bool = False) -> dict:
        """Apply the config file as it is now; the answer lists the problems, if any,
        and the [master] settings that wait for an upgrade. Without a file (`baton
        serve`), `restart_all` (SIGHUP, `baton ctl reload`) restarts every app, as
        gunicorn's HUP does: a new generation each, its code imported afresh."""
        if restart_all and not self.core.stopping and self.config.path is None:
            self.log.info("reload: no config file to re-read; restarting every app")
            for name in list(self.core.apps):
                self.restart_app(name)
            return {"ok": True, "message": "no config file to re-read: every app restarts"}
        if self.core.stopping or self.config.path is None:
            return {"ok": False, "errors": ["nothing to reload: no config file" if self.config.path is None
                                            else "stopping"]}
        announce = self.pending_ready is None   # one before start-up READY is covered by that READY
        if announce:
            self.notifier.reloading(status=f"reloading {self.config.path}")
        try:
            new = config_mod.load(self.config.path)
            plan = plan_mod.diff(self.config, new, restart_all=restart_all)
            restart = set(plan.apps_restart)
            identities = {name: self._identity(new.apps[name], announce=name in plan.apps_start)
                          for name in (*plan.apps_start, *restart)}
            opened = self.sockets.open_new(new, plan.listeners_open)
        except ConfigError as exc:
            return self._rejected(exc.problems, announce)
        except (ListenerError, PrivilegeError) as exc:
            return self._rejected([str(exc)], announce)
        if announce:
            self.pending_ready = "reload"   # paid by _notify_if_ready once no new generation boots
        self.counters["reloads"] += 1
        self.core.note_reload()
        for line in plan.describe():
            self.log.info("reload: %s", line)
        old, self.config = self.config, new
        waiting = self._apply_master_settings(old.master, new.master)
        self.sockets.commit(plan.listeners_close, opened)
        self._log_listening(new, plan.listeners_open, opened)
        self._apply_socket_files(new, plan)
        self.balancers.routes(new, self.sockets.balanced(new, opened))
        if plan.routing_changed:
            self._send_worker_routes(new)
        for name in plan.apps_stop:
            self._execute(self.core.remove_app(name))
        for name in plan.apps_start:
            self._execute(self.core.add_app(new.apps[name], identities[name]))
        for name in restart:
            self._execute(self.core.restart_app(name, new.apps[name], identities[name]))
        for name, count in plan.apps_rescale.items():
            if name not in restart:
                self._execute(self.core.rescale(name, count))
        for name in self.core.apps:
            if name not in restart and name in new.apps and name not in plan.apps_start:
                self.core.update_app(name, new.apps[name])   # settings no new worker is needed for
        self.watcher.follow(new, self.clock())
        self.attached.apply(new)
        answer: dict = {"ok": True}
        if waiting:
            answer["after_upgrade"] = waiting
            answer["message"] = ("[master] " + ", ".join(waiting) + " changed: "
                                 "takes effect after `baton ctl upgrade`")
        return answer

    def _rejected(self, problems: list[str], announce: bool) -> dict:
        for problem in problems:
            self.log.error("reload rejected: %s", problem)
        self.log.error("reload rejected; the running config stays")
        if announce:
            self.notifier.ready(status=f"reload rejected: {problems[0]}; the running config stays")
        self.counters["reloads_rejected"] += 1
        return {"ok": False, "errors": problems}

    def _apply_master_settings(self, old: MasterConfig, new: MasterConfig) -> list[str]:
        """Apply changed [master] settings that can change live; return the names of
        those whose configured value differs from the one in force, which waits for a
        master upgrade (said at every reload until then)."""
        changed = [name for name in plan_mod.MASTER_LIVE + plan_mod.MASTER_AFTER_UPGRADE
                   if getattr(old, name) != getattr(new, name)]
        if {"graceful_timeout", "boot_timeout", "crash_backoff_max"} & set(changed):
            self.core.settings = core_settings(new)
            for app in self.core.apps.values():
                app.backoff.max_delay_s = new.crash_backoff_max
        if "log_level" in changed:
            level = logging.getLevelName(new.log_level.upper())
            self.log.setLevel(level)   # workers and balancers forked from now on inherit it
        if "pidfile" in changed:
            _remove_pidfile(old.pidfile)
            _write_pidfile(new.pidfile)
        if "control_socket" in changed and self.control is not None:
            self._move_control(old)
        elif "admins" in changed and self.control is not None:
            self.control.admins = new.admins
        waiting = [name for name in plan_mod.MASTER_AFTER_UPGRADE
                   if getattr(self.started_master, name) != getattr(new, name)]
        for name in changed:
            if name in plan_mod.MASTER_AFTER_UPGRADE:
                self.log.warning("reload: [master] %s changed: takes effect after `baton ctl upgrade` "
                                 "(the running value stays)", name)
            else:
                self.log.info("reload: [master] %s changed: applied", name)
        return waiting

    # -- the control socket ------------------------------------------------------------

    def _open_control(self, config: Config) -> None:
        path = control_socket_path(config)
        if path is None:
            return
        self.control = ControlServer(path, admins=config.master.admins, handle=self.command,
                                     log=self.log, loop=self.loop)
        self.log.info("control socket at %s", path)
        self.successors.open_listener(path)

    def _move_control(self, old: MasterConfig) -> None:
        try:
            replacement = ControlServer(control_socket_path(self.config), admins=self.config.master.admins,
                                        handle=self.command, log=self.log, loop=self.loop)
        except ControlError as exc:
            self.log.error("reload: the control socket stays where it was: %s", exc)
            return
        self._close_control()
        self.control = replacement
        self.successors.open_listener(replacement.path)
        self.log.info("control socket at %s", replacement.path)

    def _close_control(self) -> None:
        self.control.close()
        self.control = None
        self.successors.close_listener()

    # -- helpers ---------------------------------------------------------------------

    def _apply_socket_files(self, config: Config, plan: plan_mod.Plan) -> None:
        """A kept UNIX listener whose file permissions changed gets them on its live file."""
        for name in plan.listeners_keep:
            changed = set(plan.reasons.get(f"listener {name}", ())) & {"socket_mode", "socket_owner", "socket_group"}
            if not changed:
                continue
            listener = config.listeners[name]
            try:
                permissions = listeners_mod.apply_permissions(listener)
            except ListenerError as exc:
                self.log.error("reload: could not change the socket file of listener %s: %s", name, exc)
                continue
            self.log.info("reload: socket of listener %s now %s (%s)", name,
                          listeners_mod.describe_file(listener.bind.path), permissions.why)

    def _log_listening(self, config: Config, names: tuple[str, ...], sockets: dict[str, socket.socket]) -> None:
        """One "listening on" line for each of `names` that is open, reuseport ones too."""
        for name in names:
            listener = config.listeners.get(name)
            if listener is not None and (name in sockets or listener.mode == "reuseport"):
                self.log.info("listening on %s", listeners_mod.listening_line(listener, sockets.get(name)))

    def _identity(self, app: AppConfig, announce: bool = True) -> privileges.Identity:
        running_as_root = os.geteuid() == 0
        user = effective_user(app, running_as_root)
        identity = privileges.resolve(user, app.group)
        if announce:
            self.log.info("%s", worker_access.user_line(app, identity.name, running_as_root))
            if app.isolate:
                self.log.info("%s", namespaces.boot_line(app.name, app.isolate))
        return identity

    def _cleanup(self) -> None:
        self.attached.close()
        self.pool.close()
        self.templates.close()
        self.balancers.kill_now()
        self.watcher.kill_now()
        self.sockets.close(self.config)
        if self.control is not None:
            self.control.close()
        self.successors.close()
        if self.predecessor is not None:
            self.predecessor.close()
        self.loop.close()
        _remove_pidfile(self.config.master.pidfile)


def _write_pidfile(path: str | None) -> None:
    """Put our pid at `path` in one rename, never writing through a file someone else
    planted: the master may be root, the directory writable by others. The new file is
    created, O_EXCL and O_NOFOLLOW, under a random name beside `path` (so nothing can be
    waiting there), then renamed onto `path`, which replaces a symlink at `path`
    itself, never its target."""
    if not path:
        return
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.urandom(8).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o644)
    try:
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _remove_pidfile(path: str | None) -> None:
    """Remove the pidfile if it is still ours (a new master may have written its own):
    the file at `path` itself, not a symlink's target, opened without blocking (a FIFO
    planted there would hold the master forever), holding our pid, and still the file
    that was read when it is unlinked. Anything else is left where it is."""
    if not path:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:   # gone, a symlink (ELOOP), unreadable: nothing of ours to remove
        return
    try:
        read = os.fstat(fd)
        ours = os.read(fd, 64).strip() == str(os.getpid()).encode()
    except OSError:   # a directory, a FIFO with nothing to read
        ours = False
    finally:
        os.close(fd)
    try:
        if ours and os.path.samestat(read, os.lstat(path)):
            os.unlink(path)
    except FileNotFoundError:
        pass
