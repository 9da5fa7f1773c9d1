"""The master's decisions, sans I/O: apps, generations, workers, sidecars, deadlines.

`Supervisor` is fed commands (add an app, restart it as a new generation, rescale,
stop) and events (a worker was forked, said READY, failed to boot, sent a heartbeat,
exited; a sidecar started, sent a heartbeat or exited; time passed) and answers each
with a list of actions for the master process to carry out (fork a worker, send it
STOP, signal it, attach it to the balancer or detach it, log a line). It forks
nothing, reads no clock of its own (time comes from the injected `clock`), and touches
no fd, so every timeout path is a table test on a fake clock.

Promises:
* An app serves from its *current* generation. A restart boots a whole *next*
  generation beside it; routing switches only when every new worker is READY, and
  then the old generation drains with hand-back. A next generation that fails to boot
  (a worker exits before READY, cannot be forked, or outstays `boot_timeout_s`) is
  dropped and the current one keeps serving.
* Every deadline comes from one rule per worker state (`_deadline`), read both by
  `next_deadline()` and by `tick()`, so the two can never disagree.
* Workers are known by a key the supervisor assigns in its `Spawn` action; the
  executor maps keys to processes. Events about unknown keys are ignored.
* A preloaded app (`preload`) has a template per generation (`templates`, by app and
  generation number), started with the generation's first worker. Its workers wait in
  SPAWNED until it is ready, then each is asked of it (`Spawn`, `asked_at`); one asked
  for is never just dropped (it may exist), it drains. A template that never gets
  ready fails its generation's boot like a worker's import error; one that dies later
  is restarted (with the crash-loop backoff) while its workers serve on; the old
  generation's template is stopped at the switch, since a template only forks.
* Sidecars are known by name, and each balancer of `[master] balancers` has its own
  (`balancer_name`): its heartbeat, silence, exit and restart concern that one alone,
  so a stuck or crashed balancer is replaced while the others keep their processes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from supervisor.config.model import AppConfig
from supervisor.master.lifecycle import (
    ALIVE,
    TRANSITIONS,
    Backoff,
    IllegalTransition,
    State,
)

ABORT_GRACE_S = 2.0        # after SIGABRT (stacks written), SIGKILL
QUICK_STOP_GRACE_S = 1.0   # a quick stop's SIGQUIT, then SIGKILL
SIDECAR_RESTART_PAUSE_S = 0.5
SIDECAR_YOUNG_S = 1.0      # a sidecar that dies younger than this restarts after a pause
BALANCER_HEARTBEAT_S = 1.0                       # how often the balancer's loop says it is alive
BALANCER_SILENT_S = 4 * BALANCER_HEARTBEAT_S     # silent this long: stopped (SIGSTOP) or stuck

SIGKILL, SIGTERM, SIGQUIT, SIGABRT, SIGCONT = "SIGKILL", "SIGTERM", "SIGQUIT", "SIGABRT", "SIGCONT"


def balancer_name(index: int) -> str:
    """The sidecar name of balancer `index` (of `[master] balancers`): "balancer" for the
    first, so a master with one balancer logs as it always did, "balancer#N" after it."""
    return "balancer" if index == 0 else f"balancer#{index}"


def is_balancer(name: str) -> bool:
    return name == "balancer" or name.startswith("balancer#")


# -- actions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Fork a worker, then report `Spawned` or `SpawnFailed`. Actions are carried out
    in order, and an earlier one may make a later Spawn moot (a fork failure drops
    its generation): fork only while `Supervisor.wants_fork(key)`."""
    key: int
    generation: "Generation"
    index: int


@dataclass(frozen=True)
class Stop:
    """Ask a worker to stop gracefully (its running requests finish)."""
    key: int
    handback: bool    # give idle keep-alive connections to the balancer, not close them


@dataclass(frozen=True)
class Kill:
    """Signal a worker (SIGKILL at a deadline, SIGABRT for a hung one, SIGQUIT to stop
    quickly)."""
    key: int
    signal: str       # SIGKILL, SIGTERM, SIGQUIT or SIGABRT


@dataclass(frozen=True)
class Attach:
    """Route the app's connections to this worker."""
    key: int


@dataclass(frozen=True)
class Detach:
    """Send the worker no more connections (it is retiring, or hung)."""
    key: int


@dataclass(frozen=True)
class ReleaseSlot:
    """No worker of the app's current generation will use this index again (its
    per-index sockets may be closed)."""
    app: str
    index: int


@dataclass(frozen=True)
class StartSidecar:
    """Fork the balancer or the watcher anew (then report `SidecarStarted`)."""
    name: str


@dataclass(frozen=True)
class SignalSidecar:
    name: str
    signal: str       # SIGTERM to stop it, SIGKILL past its drain deadline; a silent one
                      # gets SIGCONT then SIGABRT (its stacks), then SIGKILL


@dataclass(frozen=True)
class DrainBalancer:
    """Tell a balancer a graceful stop began: accept no more, /healthz says 503."""
    name: str = "balancer"


@dataclass(frozen=True)
class StartTemplate:
    """Fork the template of a preloaded app's generation (then report `TemplateStarted`,
    or `TemplateExited` if it could not be forked)."""
    generation: "Generation"


@dataclass(frozen=True)
class StopTemplate:
    """The template of (app, generation) is not needed any more: tell it to exit."""
    app: str
    generation: int


@dataclass(frozen=True)
class KillTemplate:
    app: str
    generation: int
    signal: str       # SIGKILL: it outstayed its boot or stop, or did not fork


@dataclass(frozen=True)
class Log:
    """A line for the error log, at `level` ("debug", "info", "warning", "error")."""
    level: str
    text: str


@dataclass(frozen=True)
class Notify:
    """A status line for the service manager (sd_notify STATUS=)."""
    text: str


@dataclass(frozen=True)
class GiveUp:
    """Nothing can serve: the master should stop with this exit status."""
    exit_status: int


Action = Any   # one of the classes above


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawned:
    """The fork a `Spawn` asked for succeeded."""
    key: int
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    """The fork failed (EAGAIN, ENOMEM, a socket that could not be opened for it)."""
    key: int
    reason: str


@dataclass(frozen=True)
class Ready:
    """The worker imported its app and serves."""
    key: int


@dataclass(frozen=True)
class BootFailed:
    """The worker's last words before it exits: why its app would not import."""
    key: int
    traceback: str


@dataclass(frozen=True)
class Heartbeat:
    key: int
    requests: int
    connections: int
    busy: int
    oldest_s: float | None     # age of the oldest running request when sent
    rss_kb: int | None = None  # read by the executor when the app has max_rss


@dataclass(frozen=True)
class Exited:
    """The worker's process is gone (reaped)."""
    key: int
    status: str                # how it ended, for the log ("exit status 3", "killed by SIGKILL")


@dataclass(frozen=True)
class TemplateStarted:
    app: str
    generation: int
    pid: int


@dataclass(frozen=True)
class TemplateReady:
    """The template imported the app: it forks the generation's workers from now on."""
    app: str
    generation: int


@dataclass(frozen=True)
class TemplateBootFailed:
    """The template's last words before it exits: why the app would not import."""
    app: str
    generation: int
    traceback: str


@dataclass(frozen=True)
class TemplateExited:
    """The template's process is gone (reaped), or could not be forked."""
    app: str
    generation: int
    status: str


@dataclass(frozen=True)
class SidecarStarted:
    name: str         # "watcher", or a balancer's (`balancer_name`): each is tracked on its own


@dataclass(frozen=True)
class SidecarExited:
    name: str
    status: str


@dataclass(frozen=True)
class SidecarHeartbeat:
    """The sidecar's loop said it is alive (the balancer does, every BALANCER_HEARTBEAT_S)."""
    name: str


# -- state ---------------------------------------------------------------------------


@dataclass
class Generation:
    app: str
    number: int
    config: AppConfig
    identity: Any           # whatever the executor needs to fork as the app's user
    workers: int            # how many it boots


@dataclass
class Load:
    """A worker's last heartbeat: sent from its serving loop, so a stuck loop goes silent."""
    heard_at: float
    requests: int = 0
    connections: int = 0
    busy: int = 0
    oldest_s: float | None = None


@dataclass
class WorkerRecord:
    key: int
    app: str
    index: int
    generation: int
    state: State
    created_at: float
    pid: int | None = None
    spawned_at: float | None = None     # when the fork was confirmed
    ready_at: float | None = None
    respawn_at: float | None = None     # BACKOFF: when to fork
    kill_at: float | None = None        # SIGKILL at this time
    killed: bool = False                # SIGKILL sent
    load: Load = field(default_factory=lambda: Load(0.0))
    replaces: int | None = None         # a recycled worker's key, retired once this one is READY
    recycling: bool = False             # a replacement for this one is booting
    jitter: int = 0                     # extra requests before max_requests recycles this one
    asked_at: float | None = None       # preload: when its template was asked to fork it

    def move(self, to: State) -> None:
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.key} ({self.app}#{self.index} gen {self.generation}): "
                                    f"{self.state.value} -> {to.value}")
        self.state = to

    @property
    def alive(self) -> bool:
        return self.state in ALIVE

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid else "not forked"
        return f"{self.app}#{self.index} gen {self.generation} ({pid})"


@dataclass
class AppRecord:
    current: Generation               # serving (or booting, at start)
    target: int
    backoff: Backoff
    next: Generation | None = None    # booting beside the current one
    ever_ready: bool = False
    boot_failed: bool = False
    restarts: int = 0                 # workers replaced after dying
    # Workers replaced, by why: crash, boot_failure, timeout, max_requests, max_rss, reload.
    restart_reasons: dict[str, int] = field(default_factory=dict)
    retired_requests: int = 0         # requests served by workers that have exited
    last_traceback: str = ""

    @property
    def name(self) -> str:
        return self.current.app


@dataclass
class TemplateRecord:
    """A preloaded app's template for one generation. States: "booting" (forked or
    being forked, importing the app), "ready" (forks workers), "backoff" (it died;
    restarted at `restart_at`), "stopping" (told to exit)."""
    app: str
    generation: int
    state: str
    started_at: float
    backoff: Backoff
    pid: int | None = None
    ready_at: float | None = None
    restart_at: float | None = None
    kill_at: float | None = None
    killed: bool = False

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid else "not forked"
        return f"template {self.app} gen {self.generation} ({pid})"


@dataclass
class SidecarRecord:
    name: str
    running: bool = False
    started_at: float = 0.0
    restart_at: float | None = None
    kill_at: float | None = None
    heard_at: float | None = None   # its last heartbeat (or its start); None: not judged by silence


@dataclass(frozen=True)
class Settings:
    boot_timeout_s: float = 30.0
    graceful_timeout_s: float = 30.0
    crash_backoff_max_s: float = 30.0
    # The balancer silent this long is stopped or stuck: aborted, then restarted. None:
    # never judged by silence (an executor whose balancer sends no heartbeat).
    balancer_silent_s: float | None = None


def heartbeat_interval_s(config: AppConfig) -> float:
    """How often a worker of `config` sends a heartbeat from its serving loop: often
    enough that a hung worker is caught close to its `timeout`."""
    return min(1.0, config.timeout / 4) if config.timeout else 1.0


COUNTERS = ("generation_switches", "generations_dropped", "worker_restarts", "worker_timeouts",
            "worker_recycles")


class Supervisor:
    """The master's bookkeeping and decisions; see the module docstring."""

    def __init__(self, settings: Settings, clock: Callable[[], float], rng: random.Random | None = None):
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.apps: dict[str, AppRecord] = {}
        self.workers: dict[int, WorkerRecord] = {}
        self.sidecars: dict[str, SidecarRecord] = {}
        self.templates: dict[tuple[str, int], TemplateRecord] = {}   # by (app, generation)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.stopping = False
        self.reloaded = False   # a reload happened: "no app can boot" no longer ends the master
        self._next_key = 1
        self._actions: list[Action] = []

    # -- commands ------------------------------------------------------------------

    def add_app(self, config: AppConfig, identity: Any) -> list[Action]:
        generation = Generation(config.name, 1, config, identity, config.workers)
        self.apps[config.name] = AppRecord(generation, config.workers,
                                           Backoff(max_delay_s=self.settings.crash_backoff_max_s))
        for index in range(1, config.workers + 1):
            self._spawn(generation, index)
        return self._take()

    def restart_app(self, name: str, config: AppConfig, identity: Any, workers: int | None = None) -> list[Action]:
        """Boot a new generation of `name` beside the serving one."""
        app = self.apps[name]
        if self.stopping:
            return []
        number = (app.next or app.current).number + 1   # a dropped generation's number is not reused
        if app.next is not None:
            self._abandon_next(app, "superseded by a newer reload")
        count = workers if workers is not None else config.workers
        app.next = Generation(name, number, config, identity, count)
        self._log("info", f"app {name}: booting generation {app.next.number} ({_count(count, 'worker')})")
        for index in range(1, count + 1):
            self._spawn(app.next, index)
        return self._take()

    def update_app(self, name: str, config: AppConfig) -> None:
        """Settings that need no new workers (routing, recycling limits) changed."""
        self.apps[name].current.config = config

    def remove_app(self, name: str) -> list[Action]:
        for worker in self._workers_of(name):
            self._retire(worker, handback=False)   # with the app's own graceful timeout
        for app, number in list(self.templates):
            if app == name:
                self._stop_template(app, number)
        del self.apps[name]
        return self._take()

    def rescale(self, name: str, count: int) -> list[Action]:
        app = self.apps[name]
        if self.stopping:
            return []
        old, app.target = app.target, count
        for index in range(old + 1, count + 1):
            self._spawn(app.current, index)
        for worker in self._workers_of(name, app.current.number):
            if worker.index > count:
                self._retire(worker, handback=True)
        return self._take()

    def stop(self, *, graceful: bool, handback: bool = False) -> list[Action]:
        """Stop everything: gracefully (running requests finish, up to each app's
        graceful timeout) or quickly (SIGQUIT, then SIGKILL after a moment)."""
        now = self.clock()
        first = not self.stopping
        self.stopping = True
        for sidecar in self.sidecars.values():
            sidecar.restart_at = None
        for app, number in list(self.templates):
            self._stop_template(app, number)
        if graceful:
            if first:
                for sidecar in self.sidecars.values():
                    if not sidecar.running:
                        continue
                    if is_balancer(sidecar.name):
                        # It stays up through the drain (503 on /healthz, passing hand-backs
                        # on) and leaves by itself once the workers are gone.
                        self._emit(DrainBalancer(sidecar.name))
                        sidecar.kill_at = now + self.settings.graceful_timeout_s + QUICK_STOP_GRACE_S
                    else:
                        self._emit(SignalSidecar(sidecar.name, SIGTERM))
            for worker in list(self.workers.values()):
                self._retire(worker, handback=handback)
        else:
            for sidecar in self.sidecars.values():
                if sidecar.running:
                    self._emit(SignalSidecar(sidecar.name, SIGTERM))
            deadline = now + QUICK_STOP_GRACE_S
            for worker in list(self.workers.values()):
                if self._unforked(worker):
                    self._drop(worker)
                    continue
                if not worker.alive:
                    continue
                if worker.state is not State.DRAINING:
                    worker.move(State.DRAINING)
                worker.kill_at = min(deadline, worker.kill_at or deadline)
                self._emit(Kill(worker.key, SIGQUIT))
        return self._take()

    def note_reload(self) -> None:
        self.reloaded = True

    # -- events --------------------------------------------------------------------

    def handle(self, event) -> list[Action]:
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"not a supervision event: {event!r}")
        handler(self, event)
        return self._take()

    def _on_spawned(self, event: Spawned) -> None:
        worker = self.workers.get(event.key)
        if worker is not None and worker.state is State.DRAINING and worker.pid is None:
            # Retired while its template forked it: it is told to stop (or killed) as it starts.
            worker.pid, worker.spawned_at = event.pid, self.clock()
            return
        if worker is None or worker.state is not State.SPAWNED:
            return
        worker.move(State.BOOTING)
        worker.pid = event.pid
        worker.spawned_at = worker.load.heard_at = self.clock()
        self._log("debug", f"spawned worker {worker.describe()}")

    def _on_spawn_failed(self, event: SpawnFailed) -> None:
        worker = self.workers.get(event.key)
        if worker is not None and worker.state is State.DRAINING and worker.pid is None:
            self._ended(worker, f"not forked ({event.reason})", never_forked=True)
            return
        if worker is None or worker.state is not State.SPAWNED:
            return
        self._log("error", f"could not fork worker {worker.describe()}: {event.reason}")
        app = self.apps.get(worker.app)
        if app is not None:
            app.boot_failed = True
            app.last_traceback = app.last_traceback or event.reason
        self._ended(worker, f"not forked ({event.reason})", never_forked=True)

    def _on_ready(self, event: Ready) -> None:
        worker = self.workers.get(event.key)
        if worker is None or worker.state is not State.BOOTING:
            return
        now = self.clock()
        worker.move(State.READY)
        worker.ready_at = worker.load.heard_at = now
        app = self.apps.get(worker.app)
        serving = app is not None and worker.generation == app.current.number
        if serving:
            self._emit(Attach(worker.key))
        # Logged after the attach is carried out, so "ready" in the log means it serves.
        self._log("info", f"worker {worker.describe()} ready")
        if app is None:
            return
        app.ever_ready = True
        if serving:
            old = self.workers.get(worker.replaces) if worker.replaces else None
            if old is not None:
                self._retire(old, handback=True)
        elif app.next is not None and worker.generation == app.next.number:
            self._switch_if_ready(app)

    def _on_boot_failed(self, event: BootFailed) -> None:
        worker = self.workers.get(event.key)
        app = self.apps.get(worker.app) if worker is not None else None
        if app is not None:
            app.boot_failed = True
            app.last_traceback = event.traceback

    def _on_heartbeat(self, event: Heartbeat) -> None:
        worker = self.workers.get(event.key)
        if worker is None or not worker.alive:
            return
        load = worker.load
        load.heard_at = self.clock()
        load.requests, load.connections, load.busy = event.requests, event.connections, event.busy
        load.oldest_s = event.oldest_s
        app = self.apps.get(worker.app)
        if (app is None or worker.recycling or worker.state is not State.READY
                or worker.generation != app.current.number or self.stopping):
            return
        config = app.current.config
        if config.max_requests and load.requests >= config.max_requests + worker.jitter:
            self._recycle(app, worker, f"served {_count(load.requests, 'request')}", "max_requests")
        elif config.max_rss and event.rss_kb is not None and event.rss_kb > config.max_rss * 1024:
            self._recycle(app, worker, f"resident memory {event.rss_kb // 1024} MB > {config.max_rss} MB",
                          "max_rss")

    def _on_exited(self, event: Exited) -> None:
        worker = self.workers.get(event.key)
        if worker is None or not worker.alive:
            return
        self._ended(worker, event.status)

    def _on_sidecar_started(self, event: SidecarStarted) -> None:
        sidecar = self.sidecars.setdefault(event.name, SidecarRecord(event.name))
        sidecar.running, sidecar.started_at, sidecar.restart_at = True, self.clock(), None
        # Judged from its start, so one that never reaches its loop is caught too.
        sidecar.heard_at = sidecar.started_at if self._silent_s(sidecar) is not None else None

    def _on_sidecar_heartbeat(self, event: SidecarHeartbeat) -> None:
        sidecar = self.sidecars.get(event.name)
        if sidecar is not None and sidecar.running and sidecar.heard_at is not None:
            sidecar.heard_at = self.clock()

    def _on_sidecar_exited(self, event: SidecarExited) -> None:
        sidecar = self.sidecars.get(event.name)
        if sidecar is None or not sidecar.running:
            return
        now = self.clock()
        sidecar.running, sidecar.kill_at, sidecar.heard_at = False, None, None
        if self.stopping:
            return
        young = now - sidecar.started_at < SIDECAR_YOUNG_S
        sidecar.restart_at = now + (SIDECAR_RESTART_PAUSE_S if young else 0.0)
        self._log("warning", f"{event.name} exited: {event.status}; restarting it")

    # -- templates (preload) -------------------------------------------------------

    def _on_template_started(self, event: TemplateStarted) -> None:
        template = self.templates.get((event.app, event.generation))
        if template is not None and template.state in ("booting", "stopping"):
            template.pid = event.pid
            self._log("debug", f"spawned {template.describe()}")

    def _on_template_ready(self, event: TemplateReady) -> None:
        template = self.templates.get((event.app, event.generation))
        if template is None or template.state != "booting":
            return
        now = self.clock()
        template.state, template.ready_at = "ready", now
        self._log("info", f"{template.describe()} ready")
        for worker in self._workers_of(event.app, event.generation):
            if worker.state is State.SPAWNED and worker.asked_at is None:
                self._ask(worker, now)

    def _on_template_boot_failed(self, event: TemplateBootFailed) -> None:
        app = self.apps.get(event.app)
        if app is not None and (event.app, event.generation) in self.templates:
            app.boot_failed = True
            app.last_traceback = event.traceback

    def _on_template_exited(self, event: TemplateExited) -> None:
        """A template is gone. Its workers serve on (they are the master's children);
        the spawns it was asked for fail (their channels close) and are asked again of
        its successor. One that never got ready fails its generation's boot, as a
        worker's import error does."""
        key = (event.app, event.generation)
        template = self.templates.get(key)
        if template is None or template.state == "backoff":
            return
        app = self.apps.get(event.app)
        del self.templates[key]
        if template.state == "stopping" or self.stopping or app is None:
            return
        never_ready = template.ready_at is None
        if never_ready:
            app.boot_failed = True
            app.last_traceback = app.last_traceback or event.status
        if app.next is not None and event.generation == app.next.number:
            if never_ready:
                self._fail_next(app, event.status, "its template failed to boot")
                return
        elif event.generation != app.current.number:
            return
        if never_ready and self._gave_up():
            return
        now = self.clock()
        delay_s = template.backoff.record_exit(template.ready_at, now)
        self._log("warning", f"{template.describe()} exited: {event.status}; "
                             + (f"a new one in {delay_s:.2f}s" if delay_s else "starting a new one"))
        generation = app.next if app.next is not None and event.generation == app.next.number else app.current
        replacement = TemplateRecord(event.app, event.generation, "backoff", now, template.backoff,
                                     restart_at=now + delay_s)
        self.templates[key] = replacement
        if not delay_s:
            self._start_template(generation, replacement)

    def _template_for(self, generation: Generation) -> TemplateRecord:
        """The generation's template, started if it has none yet."""
        template = self.templates.get((generation.app, generation.number))
        if template is None:
            template = TemplateRecord(generation.app, generation.number, "booting", self.clock(),
                                      Backoff(max_delay_s=self.settings.crash_backoff_max_s))
            self.templates[(generation.app, generation.number)] = template
            self._start_template(generation, template)
        return template

    def _start_template(self, generation: Generation, template: TemplateRecord) -> None:
        template.state, template.started_at = "booting", self.clock()
        template.pid = template.ready_at = template.restart_at = template.kill_at = None
        template.killed = False
        self._emit(StartTemplate(generation))

    def _stop_template(self, app: str, number: int) -> None:
        template = self.templates.get((app, number))
        if template is None or template.state == "stopping":
            return
        if template.state == "backoff":
            del self.templates[(app, number)]
            return
        template.state = "stopping"
        template.kill_at = self.clock() + QUICK_STOP_GRACE_S
        self._emit(StopTemplate(app, number))

    def _ask(self, worker: WorkerRecord, now: float) -> None:
        """Ask the worker's (ready) template to fork it."""
        worker.asked_at = now
        app = self.apps[worker.app]
        generation = app.next if app.next is not None and app.next.number == worker.generation else app.current
        self._emit(Spawn(worker.key, generation, worker.index))

    def _template_deadline(self, template: TemplateRecord) -> tuple[float, str] | None:
        if template.state == "backoff":
            return None if self.stopping else (template.restart_at, "restart")
        if template.killed:
            return None
        if template.kill_at is not None:
            return template.kill_at, "kill"
        if template.state == "booting":
            return template.started_at + self.settings.boot_timeout_s, "boot_timeout"
        return None

    def _due_template(self, template: TemplateRecord, why: str) -> None:
        if why == "restart":
            app = self.apps.get(template.app)
            generation = None
            if app is not None:
                generation = next((g for g in (app.current, app.next)
                                   if g is not None and g.number == template.generation), None)
            if generation is None:
                del self.templates[(template.app, template.generation)]
            else:
                self._start_template(generation, template)
            return
        if why == "boot_timeout":
            self._log("error", f"{template.describe()} did not import the app within "
                               f"{self.settings.boot_timeout_s:g}s")
            app = self.apps.get(template.app)
            if app is not None:
                app.boot_failed = True
                app.last_traceback = app.last_traceback or f"no READY within {self.settings.boot_timeout_s:g}s"
        template.killed = True
        self._emit(KillTemplate(template.app, template.generation, SIGKILL))

    def _due_spawn_timeout(self, worker: WorkerRecord, now: float) -> None:
        """The template was asked to fork this worker a boot timeout ago and no worker
        said HELLO: the template is stuck. Killed; the spawns it owed fail as it goes,
        and its successor is asked."""
        worker.killed = True
        self._log("error", f"worker {worker.describe()}: its template did not fork it within "
                           f"{self.settings.boot_timeout_s:g}s; killing the template")
        template = self.templates.get((worker.app, worker.generation))
        if template is not None and not template.killed and template.state != "backoff":
            template.killed = True
            self._emit(KillTemplate(worker.app, worker.generation, SIGKILL))

    def _unforked(self, worker: WorkerRecord) -> bool:
        """No process exists for the record, nor is one on its way."""
        return worker.state is State.BACKOFF or (worker.state is State.SPAWNED and worker.asked_at is None)

    _HANDLERS = {
        Spawned: _on_spawned, SpawnFailed: _on_spawn_failed, Ready: _on_ready,
        BootFailed: _on_boot_failed, Heartbeat: _on_heartbeat, Exited: _on_exited,
        SidecarStarted: _on_sidecar_started, SidecarExited: _on_sidecar_exited,
        SidecarHeartbeat: _on_sidecar_heartbeat,
        TemplateStarted: _on_template_started, TemplateReady: _on_template_ready,
        TemplateBootFailed: _on_template_boot_failed, TemplateExited: _on_template_exited,
    }

    # -- time ----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [d[0] for d in map(self._deadline, self.workers.values()) if d is not None]
        deadlines.extend(d[0] for d in map(self._sidecar_deadline, self.sidecars.values()) if d is not None)
        deadlines.extend(d[0] for d in map(self._template_deadline, self.templates.values()) if d is not None)
        return min(deadlines, default=None)

    def tick(self) -> list[Action]:
        """Act on every deadline that has passed."""
        now = self.clock()
        for worker in list(self.workers.values()):
            due = self._deadline(worker)
            if due is not None and due[0] <= now:
                self._DUE[due[1]](self, worker, now)
        for sidecar in self.sidecars.values():
            due = self._sidecar_deadline(sidecar)
            if due is None or due[0] > now:
                continue
            if due[1] == "restart":
                sidecar.restart_at = None
                self._emit(StartSidecar(sidecar.name))
            elif due[1] == "silent":
                self._due_sidecar_silent(sidecar, now)
            else:
                sidecar.kill_at = None
                self._emit(SignalSidecar(sidecar.name, SIGKILL))
        for template in list(self.templates.values()):
            due = self._template_deadline(template)
            if due is not None and due[0] <= now:
                self._due_template(template, due[1])
        return self._take()

    def _deadline(self, worker: WorkerRecord) -> tuple[float, str] | None:
        """The one rule for when a worker next needs attention, and why."""
        state = worker.state
        if state is State.BACKOFF:
            return None if self.stopping else (worker.respawn_at, "respawn")
        if state is State.SPAWNED:
            if worker.asked_at is None or worker.killed:
                return None
            return worker.asked_at + self.settings.boot_timeout_s, "spawn_timeout"
        if worker.kill_at is not None and not worker.killed:
            return worker.kill_at, "kill"
        if state is State.BOOTING and not worker.killed:
            return worker.spawned_at + self.settings.boot_timeout_s, "boot_timeout"
        if state is State.READY:
            app = self.apps.get(worker.app)
            timeout_s = app.current.config.timeout if app is not None else None
            if timeout_s:
                load = worker.load
                # A worker busy with an inline app call is silent. Its last heartbeat came
                # up to one interval before that call began, so silence is allowed that
                # much longer than the timeout: a hung call is caught up to one interval
                # late, and a call within its timeout is never cut short.
                silent_at = load.heard_at + timeout_s + heartbeat_interval_s(app.current.config)
                if load.oldest_s is not None:
                    # The oldest running request began oldest_s before that heartbeat.
                    return min(silent_at, load.heard_at - load.oldest_s + timeout_s), "hung"
                return silent_at, "hung"
        return None

    def _sidecar_deadline(self, sidecar: SidecarRecord) -> tuple[float, str] | None:
        if sidecar.restart_at is not None and not self.stopping:
            return sidecar.restart_at, "restart"
        if not sidecar.running:
            return None
        due = []
        if sidecar.kill_at is not None:
            due.append((sidecar.kill_at, "kill"))
        silent_s = self._silent_s(sidecar)
        if sidecar.heard_at is not None and silent_s is not None:
            due.append((sidecar.heard_at + silent_s, "silent"))
        return min(due, default=None)

    def _silent_s(self, sidecar: SidecarRecord) -> float | None:
        return self.settings.balancer_silent_s if is_balancer(sidecar.name) else None

    def _due_sidecar_silent(self, sidecar: SidecarRecord, now: float) -> None:
        """A sidecar's loop went silent: it is stopped (SIGSTOP) or stuck. Woken so that
        its stacks can be written (SIGABRT), then killed if that does not end it; its
        exit restarts it as any exit does."""
        self._log("error", f"{sidecar.name} sent no heartbeat for {now - sidecar.heard_at:.1f}s "
                           f"(stopped or stuck): aborting it, its stacks follow; a new one replaces it")
        sidecar.heard_at = None
        self._emit(SignalSidecar(sidecar.name, SIGCONT))
        self._emit(SignalSidecar(sidecar.name, SIGABRT))
        sidecar.kill_at = min(sidecar.kill_at or now + ABORT_GRACE_S, now + ABORT_GRACE_S)

    def _due_respawn(self, worker: WorkerRecord, now: float) -> None:
        app = self.apps.get(worker.app)
        self._drop(worker)
        if app is not None and worker.generation == app.current.number and worker.index <= app.target:
            self._spawn(app.current, worker.index)

    def _due_kill(self, worker: WorkerRecord, now: float) -> None:
        worker.killed = True
        self._emit(Kill(worker.key, SIGKILL))

    def _due_boot_timeout(self, worker: WorkerRecord, now: float) -> None:
        self._log("error", f"worker {worker.describe()} did not boot within {self.settings.boot_timeout_s:g}s")
        app = self.apps.get(worker.app)
        if app is not None:
            app.boot_failed = True
            app.last_traceback = app.last_traceback or f"no READY within {self.settings.boot_timeout_s:g}s"
        # Killed now; its exit counts as a failed boot.
        worker.killed = True
        self._emit(Kill(worker.key, SIGKILL))

    def _due_hung(self, worker: WorkerRecord, now: float) -> None:
        load = worker.load
        if load.oldest_s is None or now - load.heard_at + load.oldest_s < self._timeout_s(worker):
            why = f"silent for {now - load.heard_at:.1f}s"
        else:
            why = f"a request running for {load.oldest_s + now - load.heard_at:.1f}s"
        self.counters["worker_timeouts"] += 1
        self._log("error", f"worker {worker.describe()} timed out ({why}); aborting it, its stacks follow")
        worker.move(State.DRAINING)
        self._emit(Detach(worker.key))
        worker.kill_at = now + ABORT_GRACE_S
        self._emit(Kill(worker.key, SIGABRT))
        app = self.apps.get(worker.app)
        if app is not None and worker.generation == app.current.number and not self.stopping:
            _note_restart(app, "timeout")
            self._spawn(app.current, worker.index)

    _DUE = {"respawn": _due_respawn, "kill": _due_kill, "boot_timeout": _due_boot_timeout, "hung": _due_hung,
            "spawn_timeout": _due_spawn_timeout}

    # -- queries -------------------------------------------------------------------

    def generation_workers(self, app: str, generation: int) -> list[WorkerRecord]:
        return self._workers_of(app, generation)

    def serving(self, app: str) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.app == app and w.state is State.READY]

    def booting(self) -> bool:
        """Whether any app has a next generation on its way."""
        return any(app.next is not None for app in self.apps.values())

    def complete(self) -> bool:
        """Every app's current generation has its target of READY workers."""
        return all(sum(w.state is State.READY for w in self._workers_of(name, app.current.number)) >= app.target
                   for name, app in self.apps.items())

    def idle(self) -> bool:
        """Nothing is alive any more (after a stop)."""
        return (not any(w.alive for w in self.workers.values())
                and all(t.state == "backoff" for t in self.templates.values()))

    def wants_fork(self, key: int) -> bool:
        worker = self.workers.get(key)
        return worker is not None and worker.state is State.SPAWNED

    def record_of(self, key: int) -> WorkerRecord | None:
        return self.workers.get(key)

    # -- internals -----------------------------------------------------------------

    def _take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def _fail_next(self, app: AppRecord, status: str, why: str) -> None:
        """The app's next generation failed to boot: say why, and keep the current one."""
        self._log("error", f"app {app.name}: generation {app.next.number} failed to boot:\n"
                           f"{app.last_traceback.rstrip() or status}")
        self._abandon_next(app, why)

    def _gave_up(self) -> bool:
        """If no app can boot (each one's last try failed), log each one's traceback and
        give up (the master exits 1): True."""
        if not self._no_app_can_boot():
            return False
        for name, other in self.apps.items():
            self._log("error", f"app {name} cannot boot:\n{other.last_traceback.rstrip() or '(no traceback)'}")
        self._log("error", "no app could boot; exiting")
        self._emit(GiveUp(1))
        return True

    def _emit(self, action: Action) -> None:
        self._actions.append(action)

    def _log(self, level: str, text: str) -> None:
        self._actions.append(Log(level, text))

    def _spawn(self, generation: Generation, index: int) -> WorkerRecord:
        key, self._next_key = self._next_key, self._next_key + 1
        worker = WorkerRecord(key, generation.app, index, generation.number, State.SPAWNED, self.clock())
        config = generation.config
        if config.max_requests_jitter:
            # Spread recycling so a fleet of workers started together does not retire together.
            worker.jitter = self.rng.randint(0, config.max_requests_jitter)
        self.workers[key] = worker
        if not config.preload:
            self._emit(Spawn(key, generation, index))
        elif self._template_for(generation).state == "ready":
            self._ask(worker, self.clock())
        # else it waits in SPAWNED: asked of the template once that is ready
        return worker

    def _workers_of(self, app: str, generation: int | None = None) -> list[WorkerRecord]:
        return [w for w in self.workers.values()
                if w.app == app and w.state is not State.EXITED
                and (generation is None or w.generation == generation)]

    def _timeout_s(self, worker: WorkerRecord) -> float:
        app = self.apps.get(worker.app)
        return (app.current.config.timeout if app is not None else None) or 0.0

    def _graceful_timeout_s(self, app: AppRecord | None) -> float:
        if app is not None and app.current.config.graceful_timeout is not None:
            return app.current.config.graceful_timeout
        return self.settings.graceful_timeout_s

    def _retire(self, worker: WorkerRecord, handback: bool) -> None:
        if self._unforked(worker):
            self._drop(worker)
            return
        if worker.state in (State.DRAINING, State.EXITED):
            return
        was_serving = worker.state is State.READY
        worker.move(State.DRAINING)
        if was_serving:
            self._emit(Detach(worker.key))
        worker.kill_at = self.clock() + self._graceful_timeout_s(self.apps.get(worker.app))
        self._emit(Stop(worker.key, handback))

    def _recycle(self, app: AppRecord, worker: WorkerRecord, why: str, reason: str) -> None:
        """Replace a worker before it leaves: the new one boots, then the old one drains."""
        worker.recycling = True
        self.counters["worker_recycles"] += 1
        _note_restart(app, reason)
        self._log("info", f"worker {worker.describe()} {why}: recycling it")
        self._spawn(app.current, worker.index).replaces = worker.key

    def _switch_if_ready(self, app: AppRecord) -> None:
        new = self._workers_of(app.name, app.next.number)
        if len(new) < app.next.workers or not all(w.state is State.READY for w in new):
            return
        old_number = app.current.number
        app.current, app.next = app.next, None
        app.target = app.current.workers
        for worker in self._workers_of(app.name, old_number):
            if worker.state is State.BACKOFF:
                self._drop(worker)
        for worker in new:
            self._emit(Attach(worker.key))
        for worker in self._workers_of(app.name, old_number):
            if worker.state is State.READY:
                _note_restart(app, "reload")
            self._retire(worker, handback=True)
        self._stop_template(app.name, old_number)   # a template only forks; its workers drain alone
        self.counters["generation_switches"] += 1
        self._log("info", f"app {app.name}: generation {app.current.number} serving; "
                          f"generation {old_number} draining")

    def _abandon_next(self, app: AppRecord, why: str) -> None:
        self.counters["generations_dropped"] += 1
        text = (f"app {app.name}: generation {app.next.number} dropped ({why}); "
                f"generation {app.current.number} keeps serving")
        self._log("error", text)
        self._emit(Notify(text))
        now = self.clock()
        for worker in self._workers_of(app.name, app.next.number):
            if self._unforked(worker):
                self._drop(worker)
                continue
            if worker.state is not State.DRAINING:
                worker.move(State.DRAINING)
            worker.kill_at = now   # killed at once: a generation that is not wanted serves nothing
        self._stop_template(app.name, app.next.number)
        app.next = None

    def _drop(self, worker: WorkerRecord) -> None:
        """A record that never got (or no longer has) a process."""
        if worker.state is not State.EXITED:
            worker.move(State.EXITED)
        self.workers.pop(worker.key, None)

    def _ended(self, worker: WorkerRecord, status: str, never_forked: bool = False) -> None:
        """A worker's process is gone (or never existed): account for it, and decide
        what replaces it."""
        was_draining = worker.state is State.DRAINING
        never_ready = worker.ready_at is None
        worker.move(State.EXITED)
        del self.workers[worker.key]
        app = self.apps.get(worker.app)
        if app is not None:
            app.retired_requests += worker.load.requests
            if worker.index > app.target and worker.generation == app.current.number:
                self._emit(ReleaseSlot(app.name, worker.index))
        if self.stopping or was_draining or app is None:
            return
        if not never_forked:
            self._log("warning", f"worker {worker.describe()} exited: {status}")
        if app.next is not None and worker.generation == app.next.number:
            self._fail_next(app, status, "a worker failed to boot")
            return
        if worker.generation != app.current.number:
            return
        if never_ready and self._gave_up():
            return
        if worker.index <= app.target:
            self.counters["worker_restarts"] += 1
            app.restarts += 1
            _note_restart(app, "boot_failure" if never_ready else "crash")
            delay_s = app.backoff.record_exit(worker.ready_at, self.clock())
            if delay_s:
                self._log("info", f"app {app.name}: next worker in {delay_s:.2f}s (crash loop backoff)")
                self._backoff(app.current, worker.index, self.clock() + delay_s)
            else:
                self._spawn(app.current, worker.index)

    def _backoff(self, generation: Generation, index: int, respawn_at: float) -> None:
        key, self._next_key = self._next_key, self._next_key + 1
        self.workers[key] = WorkerRecord(key, generation.app, index, generation.number, State.BACKOFF,
                                         self.clock(), respawn_at=respawn_at)

    def _no_app_can_boot(self) -> bool:
        """At startup only: every app has failed to boot and none was ever ready."""
        return not self.reloaded and all(not a.ever_ready and a.boot_failed for a in self.apps.values())


def _note_restart(app: AppRecord, reason: str) -> None:
    app.restart_reasons[reason] = app.restart_reasons.get(reason, 0) + 1


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
