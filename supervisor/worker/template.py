"""A preloaded app's template: import the app once, then fork its workers on request.

With `preload = true` the master starts one template per generation of the app,
exactly as it starts a worker (fork, drop to the app's user, exec the bootstrap: see
`entry`), with a spec whose role is "template". The template:

1. sets the app's directory, paths and umask, arranges to die with the master, loads
   the app's TLS context (workers inherit it) and its hooks;
2. imports the app, runs `preload_hook` (if any), and calls `gc.freeze()`, so the
   collector never writes to the imported objects and the pages stay shared
   copy-on-write by every worker;
3. says READY on its channel (BOOT_FAILED with the traceback if 1-2 failed), then
   serves SPAWN requests until its channel closes or STOP comes.

For each SPAWN (its fds: see `messages.Spawn`) the template forks twice: the middle
child exits at once, so the worker is orphaned and re-parented to the master, which
is a child subreaper (`system.subreaper`). The worker waits for that, asks to die with
the master (`PR_SET_PDEATHSIG` is relative to the parent, so it must come after the
re-parenting), puts its error pipe on stdout and stderr, closes the template's
channel, says HELLO with its pid on its own channel, and serves the imported app: no
exec, no import. From then on it is any worker to the master: its child, reaped and
signalled like one. The template only reaps its middle children, so no zombie stays,
and a template that dies costs its workers nothing.

App code runs in the template before any fork: a thread it starts there is not in the
workers (a warning says so), and a lock a thread held at the fork stays held.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import select
import socket
import sys
import threading
import traceback

import setproctitle

from supervisor.ipc import channel
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    TRACEBACK_MAX,
    BootFailed,
    Hello,
    MessageError,
    Ready,
    Spawn,
    Stop,
)
from supervisor.system import log as log_mod
from supervisor.system import spawn
from supervisor.worker import appload, hooks, process, timeouts, tlsboot
from supervisor.worker.process import EXIT_BOOT_FAILED, WorkerSpec


def title(spec: WorkerSpec) -> str:
    return f"baton: template {spec.app.name} gen {spec.generation} ({spec.identity.name})"


def main(spec: WorkerSpec) -> int:
    """The template, from its decoded spec: boot, then fork workers until told to stop."""
    answerer = timeouts.Answerer()
    booted = process.boot_or_fail(spec, f"template {spec.app.name} gen {spec.generation}",
                                  lambda: _boot(spec, answerer))
    if booted is None:
        return EXIT_BOOT_FAILED
    app, app_hooks = booted
    return Template(spec, app, app_hooks, answerer).serve()


def _boot(spec: WorkerSpec, answerer: timeouts.Answerer):
    """Steps 1-2 of the module docstring; returns the app (hooks around it) and its hooks."""
    app = spec.app
    process.enter_app_environment(app)
    spawn.die_with_parent(spec.master_pid)
    setproctitle.setproctitle(title(spec))
    answerer.install()   # the workers inherit the handler; each starts its own answerer
    spec.tls_context = tlsboot.load(spec, spec.logs.error)
    app_hooks = hooks.Hooks.load(app)
    wsgi_app = appload.load(app.module)
    if app.preload_hook:
        appload.load_hook(app.preload_hook)(process.worker_info(spec))
    gc.collect()
    gc.freeze()
    if threading.active_count() > 1:
        spec.logs.error.warning("app %s started %d threads at import: its workers (forked from the template) "
                                "do not have them", app.name, threading.active_count() - 1)
    return app_hooks.wrap(wsgi_app, spec.logs.error), app_hooks


class Template:
    """A booted template: a blocking loop over its channel (it has nothing else to do)."""

    def __init__(self, spec: WorkerSpec, app, app_hooks: hooks.Hooks, answerer: timeouts.Answerer):
        self.spec = spec
        self.app = app
        self.hooks = app_hooks
        self.answerer = answerer

    def serve(self) -> int:
        spec = self.spec
        channel.send(spec.channel, Ready(pid=os.getpid()))
        while True:
            try:
                message, fds = channel.receive(spec.channel)
            except (ChannelClosed, ConnectionError):
                return 0   # the master is gone, or let go of us
            except MessageError as exc:
                spec.logs.error.error("bad message from master: %s", exc)
                continue
            if type(message) is Spawn:
                self._fork(message, fds)
                continue
            for fd in fds:
                os.close(fd)
            if type(message) is Stop:
                return 0

    def _fork(self, message: Spawn, fds: list[int]) -> None:
        """Fork the worker SPAWN asks for (twice: see the module). Our copies of its
        fds are closed here whatever happens; a failed fork closes them unused, which
        the master reads as the worker not starting."""
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            middle = os.fork()
        except OSError as exc:
            self.spec.logs.error.error("could not fork worker %s#%d: %s", self.spec.app.name, message.index, exc)
            middle = -1
        if middle == 0:
            status = 1
            try:
                status = 0 if os.fork() else self._worker(message, fds)
            except BaseException:
                traceback.print_exc()
            finally:
                spawn.exit_now(status)
        for fd in fds:
            os.close(fd)
        if middle > 0:
            spawn.reap(middle, block=True)   # it exits at once

    def _worker(self, message: Spawn, fds: list[int]) -> int:
        """In the forked worker: become the master's child, take the fds, serve."""
        spec = self.spec
        _wait_for_adoption(spec.master_pid)
        spawn.die_with_parent(spec.master_pid)
        taken = iter(fds)
        channel_fd, error_w = next(taken), next(taken)
        access_w = next(taken) if message.access else -1
        balancer_fds = [next(taken) for _ in range(message.balancers)]
        listener_fds = {name: next(taken) for name in message.listeners}
        os.dup2(error_w, 1)
        os.dup2(error_w, 2)
        os.close(error_w)
        spec.channel.close()   # the template's: only the template reads SPAWN
        worker_channel = socket.socket(fileno=channel_fd)
        worker_spec = dataclasses.replace(
            spec, index=message.index, channel=worker_channel, log_level=message.log_level,
            listeners={name: socket.socket(fileno=fd) for name, fd in listener_fds.items()},
            balancers=tuple(socket.socket(fileno=fd) for fd in balancer_fds),
            host_routes=message.routes, log_fds=(2, access_w))
        worker_spec.logs = log_mod.worker_logs(message.log_level, spec.log_format, spec.access_log_format,
                                               access_w if access_w >= 0 else None)
        channel.send(worker_channel, Hello(pid=os.getpid()))
        setproctitle.setproctitle(process.title(worker_spec))
        info = process.worker_info(worker_spec)
        try:
            if self.hooks.post_fork is not None:
                self.hooks.post_fork(info)
            if self.hooks.post_worker_init is not None:
                self.hooks.post_worker_init(info)
        except BaseException:
            text = traceback.format_exc()
            worker_spec.logs.error.error("worker %s#%d failed to boot:\n%s", spec.app.name, message.index,
                                         text.rstrip())
            try:
                channel.send(worker_channel, BootFailed(traceback=text[-TRACEBACK_MAX:]))
            except OSError:
                pass
            return EXIT_BOOT_FAILED
        return process.Worker(worker_spec, self.app, self.hooks, self.answerer).serve()


def _wait_for_adoption(master_pid: int) -> None:
    """Return once our parent is the master: the middle child exited, and the kernel
    gave us to the nearest subreaper. Its pidfd turns readable when it has exited, by
    which time we have been re-parented."""
    parent = os.getppid()
    if parent == master_pid:
        return
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        pidfd = -1   # gone already
    if pidfd >= 0:
        try:
            select.select([pidfd], [], [])
        finally:
            os.close(pidfd)
    if os.getppid() != master_pid:
        raise RuntimeError(f"a template's worker was given to pid {os.getppid()}, not to the master "
                           f"({master_pid}): is the master a child subreaper?")

