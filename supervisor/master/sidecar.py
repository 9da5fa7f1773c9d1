"""The master's helper processes that are not workers: the balancer and the watcher.

A sidecar is one forked child with a channel to the master and a pidfd the master's
selector watches. The master restarts a sidecar that dies (at once, or after a short
pause if it died young, so a broken one cannot spin).
"""
from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from typing import Callable, Iterable

from supervisor.ipc import channel
from supervisor.system import spawn

RESTART_PAUSE_S = 0.5
YOUNG_S = 1.0


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
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def reap(self) -> int:
        """Collect the exit status of a child that has exited; release its fds."""
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        self.close()
        return status

    def kill_now(self) -> None:
        self.signal(signal.SIGKILL)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.close()

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.channel.close()

    def restart_delay(self, now: float) -> float:
        return RESTART_PAUSE_S if now - self.spawned_at < YOUNG_S else 0.0
