"""The master's side of the watcher: start it, hear what changed, replace it.

The watcher is a small child that watches the config file, its includes and the apps'
`reload_on` trees, and sends CHANGED with topics ("config", "app:NAME"). When the set
of watched files changes, a new watcher starts and the old one keeps watching until
the new one says READY, so no change made during the switch goes unnoticed.

It only reads, so under a root master it runs as the config file's owner, or (a file
root owns) as the balancer does: never as root, unless that identity cannot read
what it must watch (the watcher then says so and stays root; see `watch.watcher`).
"""
from __future__ import annotations

import os
import signal
from typing import Callable

from supervisor.config.model import Config
from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import MessageError
from supervisor.master.sidecar import Sidecar
from supervisor.system import privileges, users
from supervisor.system.log import Logs
from supervisor.system.loop import Loop
from supervisor.watch import topics
from supervisor.watch import watcher as watcher_mod

NAME = "watcher"


def needed(config: Config) -> bool:
    """Whether a master running `config` has anything to watch: its config file, or an
    app's `reload_on` (`baton serve --reload` has no file, only that)."""
    return config.path is not None or any(app.reload_on or app.certificate for app in config.apps.values())


def prepare(config: Config) -> None:
    """For the master, before its first fork: import what a watcher for `config` runs
    (`watcher.import_watchdog`), so no sidecar sees the master write pages for that
    import later (each page the master writes after a fork is a copy)."""
    if needed(config):
        watcher_mod.import_watchdog()


class WatcherHandle:
    def __init__(self, loop: Loop, logs: Logs, on_changed: Callable[[list[str]], None],
                 on_exit: Callable[[str, int | None], None],
                 balancer_identity: Callable[[], privileges.Identity | None] = lambda: None):
        self.loop = loop
        self.balancer_identity = balancer_identity   # the running balancer's, once it started
        self.logs = logs
        self.log = logs.error
        self.on_changed = on_changed    # (sorted topics)
        self.on_exit = on_exit          # (name, wait status) when the current one is reaped
        self.process: Sidecar | None = None
        self.retiring: list[Sidecar] = []   # replaced, watching until the new one is ready
        self.watching: topics.Watch | None = None

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, config: Config, clock_now: float) -> None:
        if not needed(config):
            return
        watch = topics.watch_for(config)
        identity, why = self._identity(config)
        watcher_mod.import_watchdog()
        process = Sidecar.start(NAME, lambda end: watcher_mod.main(watch, end, identity, why, self.log),
                                self.logs.fds, clock_now)
        self.process, self.watching = process, watch
        self.loop.register(process.pidfd, lambda: self._reap(process))
        self.loop.register(process.channel, lambda: self._on_message(process))

    def _identity(self, config: Config) -> tuple[privileges.Identity | None, str]:
        """Who the watcher becomes (None: stay who the master is, not root), and why."""
        if os.geteuid() != 0:
            return None, ""
        try:
            owner = os.stat(config.path).st_uid if config.path is not None else 0
        except OSError:
            owner = 0   # gone since it was read: the balancer's identity, as for root's files
        if owner != 0 and users.user(owner) is not None:
            return privileges.resolve(str(owner), None), "the owner of the config file"
        identity = self.balancer_identity()
        if identity is None:
            identity, _ = privileges.balancer_identity(config.master.balancer_user, config.path or "", True)
        return identity, "the balancer's identity: root owns the config file"

    def follow(self, config: Config, clock_now: float) -> None:
        """Watch what `config` names, if that differs from what is watched now."""
        if self.process is None or topics.watch_for(config) == self.watching:
            return
        self.retiring.append(self.process)
        self.start(config, clock_now)

    def _reap(self, process: Sidecar) -> None:
        self.loop.unregister(process.pidfd)
        if process.channel.fileno() >= 0:
            self.loop.unregister(process.channel)
        status = process.reap()
        if process in self.retiring:
            self.retiring.remove(process)
        elif process is self.process:
            self.process = None
            self.on_exit(NAME, status)

    def _on_message(self, process: Sidecar) -> None:
        try:
            message, fds = channel.receive(process.channel)
        except (BlockingIOError, ChannelClosed, ConnectionError):
            return
        except MessageError as exc:
            self.log.warning("the watcher sent a bad message: %s", exc)
            return
        for fd in fds:
            os.close(fd)
        if type(message) is messages.Ready:
            self.log.info("watcher (pid %d) is watching for changes", process.pid)
            for old in self.retiring:
                old.signal(signal.SIGTERM)
        elif type(message) is messages.Changed:
            self.log.info("changed on disk: %s", ", ".join(sorted(message.topics)))
            self.on_changed(sorted(message.topics))

    def signal(self, signum: int) -> None:
        for process in (self.process, *self.retiring):
            if process is not None:
                process.signal(signum)

    def kill_now(self) -> None:
        for process in (self.process, *self.retiring):
            if process is None:
                continue
            for fd in (process.pidfd, process.channel):
                if self.loop.registered(fd):
                    self.loop.unregister(fd)
            process.kill_now()
        self.process, self.retiring = None, []
