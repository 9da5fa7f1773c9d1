"""The master's side of preloaded apps' templates: start them, hear them, ask them.

`Templates` carries out the supervision core's template actions (start, stop, kill)
and turns what it hears into events: READY and BOOT_FAILED on a template's channel
become `TemplateReady` and `TemplateBootFailed`, its pidfd turning readable becomes
`TemplateExited`. A template is started like a worker (`entry.exec_worker` with the
role "template"), as the app's user, with its own log pipes tagged with its pid. The
pool asks a template for a worker with `send` (a SPAWN and the worker's fds).

Every fd held for a template (channel, pidfd, its log pipes' read ends) is closed when
it is reaped, or at `close()`. Starting the first one makes the master a child
subreaper (the workers a template forks become the master's children: see
`worker.template`), and from then on a sweep reaps any other orphan it adopts.
"""
from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from typing import Callable

from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import MessageError
from supervisor.master import supervision as sv
from supervisor.master.logsink import LogSink, Pipes
from supervisor.master.pool import describe_status
from supervisor.system import spawn, subreaper
from supervisor.system.loop import Loop
from supervisor.worker import entry as worker_entry

SWEEP_S = 1.0   # how often adopted orphans are looked for once the master is a subreaper


@dataclass(eq=False)
class TemplateProcess:
    app: str
    generation: int
    pid: int
    pidfd: int
    channel: socket.socket
    pipes: Pipes


class Templates:
    """The live templates, by (app, generation)."""

    def __init__(self, loop: Loop, log, sink: LogSink, on_event: Callable[[object], None]):
        self.loop = loop
        self.log = log
        self.sink = sink
        self.on_event = on_event
        self.running: dict[tuple[str, int], TemplateProcess] = {}
        self.subreaper = False

    def start(self, spec, master_end: socket.socket) -> int:
        """Fork the template `spec` describes (index 0, no listeners nor balancers);
        the master keeps `master_end`, the other end of `spec.channel`, which is closed
        here whatever happens. Raises OSError (having closed `master_end`) when the
        pipes or the fork fail."""
        if not self.subreaper:
            subreaper.become()
            self.subreaper = True
            self.loop.every(SWEEP_S, self._sweep)
        pipes = None
        try:
            pipes = self.sink.open()
            # A template writes no access line: its workers get their own access pipes.
            spec.log_fds = (pipes.error_w, -1)
            pid = spawn.fork(lambda: worker_entry.exec_worker(spec, role="template"), spec.owned_fds())
        except OSError:
            master_end.close()
            if pipes is not None:
                self.sink.discard(pipes)
            raise
        finally:
            spec.channel.close()
        self.sink.follow(spec.app.name, pid, pipes)
        master_end.setblocking(False)
        template = TemplateProcess(spec.app.name, spec.generation, pid, os.pidfd_open(pid), master_end, pipes)
        self.running[(template.app, template.generation)] = template
        self.loop.register(template.pidfd, lambda: self._reap(template))
        self.loop.register(master_end, lambda: self._on_channel(template))
        return pid

    def send(self, app: str, generation: int, message: messages.Spawn, fds: list[int]) -> None:
        """Ask the template for a worker; OSError if it is not there to ask."""
        template = self.running.get((app, generation))
        if template is None or template.channel.fileno() < 0:
            raise OSError(f"the template of app {app!r} generation {generation} is gone")
        channel.send(template.channel, message, fds)   # a full channel (a stuck template): BlockingIOError

    def stop(self, app: str, generation: int) -> None:
        template = self.running.get((app, generation))
        if template is None:
            return
        try:
            channel.send(template.channel, messages.Stop(graceful=True, handback=False))
        except OSError:
            self._signal(template, signal.SIGTERM)

    def kill(self, app: str, generation: int, signal_name: str) -> None:
        template = self.running.get((app, generation))
        if template is not None:
            self._signal(template, signal.Signals[signal_name])

    def pid_of(self, app: str, generation: int) -> int | None:
        template = self.running.get((app, generation))
        return template.pid if template is not None else None

    @staticmethod
    def _signal(template: TemplateProcess, signum: int) -> None:
        spawn.signal_pidfd(template.pidfd, signum)

    def _on_channel(self, template: TemplateProcess) -> bool:
        try:
            message, fds = channel.receive(template.channel)
        except BlockingIOError:
            return False
        except (ChannelClosed, ConnectionError):
            self._close_channel(template)
            return False
        except MessageError as exc:
            # App code runs in the template: what it says next cannot be trusted.
            self.log.warning("template %d sent a bad message: %s; replacing it", template.pid, exc)
            self._close_channel(template)
            self._signal(template, signal.SIGKILL)
            return False
        for fd in fds:
            os.close(fd)
        if type(message) is messages.Ready:
            self.on_event(sv.TemplateReady(template.app, template.generation))
        elif type(message) is messages.BootFailed:
            self.on_event(sv.TemplateBootFailed(template.app, template.generation, message.traceback))
        else:
            self.log.warning("template %d sent an unexpected %s message", template.pid, message.KIND)
        return True

    def _reap(self, template: TemplateProcess) -> None:
        status = spawn.reap(template.pid, block=False)
        self.loop.unregister(template.pidfd)
        os.close(template.pidfd)
        while template.channel.fileno() >= 0 and self._on_channel(template):
            pass   # its last words (BOOT_FAILED) first
        self._close_channel(template)
        self.sink.finish(template.pipes)
        if self.running.get((template.app, template.generation)) is template:
            del self.running[(template.app, template.generation)]
        self.on_event(sv.TemplateExited(template.app, template.generation, describe_status(status)))

    def _close_channel(self, template: TemplateProcess) -> None:
        if template.channel.fileno() >= 0:
            self.loop.unregister(template.channel)
            template.channel.close()

    def _sweep(self) -> None:
        for pid in subreaper.reap_orphans():
            self.log.debug("reaped pid %d, an orphan the master adopted", pid)

    def close(self) -> None:
        """At the master's exit: kill and reap every template, release its fds."""
        for template in list(self.running.values()):
            self._signal(template, signal.SIGKILL)
            spawn.reap(template.pid, block=True)
            if self.loop.registered(template.pidfd):
                self.loop.unregister(template.pidfd)
            os.close(template.pidfd)
            self._close_channel(template)
            self.sink.finish(template.pipes)
        self.running.clear()
