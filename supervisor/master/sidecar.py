"""A helper process of the master that is not a worker: the balancer or the watcher.

A sidecar is one forked child with a channel to the master and a pidfd the master's
loop watches. When to restart one that died is the supervision core's decision (at
once, or after a pause if it died young, so a broken one cannot spin).
"""
from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from typing import Callable, Iterable

from supervisor.ipc import channel
from supervisor.system import spawn


@dataclass
class Sidecar:
    name: str
    pid: int
    pidfd: int
    channel: socket.socket
    spawned_at: float

    @classmethod
    def start(cls, name: str, main: Callable[[socket.socket], int], keep_fds: Iterable[int],
              now: float) -> "Sidecar":
        """Fork `main(child_end)`; the child keeps only `keep_fds` and its channel end."""
        parent_end, child_end = channel.pair()
        try:
            pid = spawn.fork(lambda: main(child_end), [*keep_fds, child_end.fileno()])
        finally:
            child_end.close()
        parent_end.setblocking(False)
        return cls(name, pid, os.pidfd_open(pid), parent_end, now)

    def signal(self, signum: int) -> None:
        spawn.signal_pidfd(self.pidfd, signum)

    def reap(self) -> int | None:
        """Collect the exit status of a child that has exited (see `spawn.reap`); release its fds."""
        status = spawn.reap(self.pid, block=False)
        self.close()
        return status

    def kill_now(self) -> None:
        self.signal(signal.SIGKILL)
        spawn.reap(self.pid, block=True)
        self.close()

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.channel.close()
