"""The master's worker processes: start them, watch them, talk to them.

`WorkerPool` carries out the supervision core's worker actions (fork, STOP, signal)
and turns what it hears back into supervision events: a channel message becomes
`Ready`, `BootFailed` or `Heartbeat`, a pidfd that turns readable becomes `Exited`.
It knows a worker by the core's key; the pid is only for the kernel and the logs.
Every fd it opens for a worker (channel, pidfd, the balancers' ends of the worker's
balancer channels, one per balancer, the read ends of its log pipes) is closed when
the worker is reaped, or at `close()`. A worker is a fork that execs a fresh
interpreter (`worker.entry`); its log lines come through its pipes and the `LogSink`,
tagged with its app and pid.
"""
from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable

from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import MessageError
from supervisor.master import status as status_mod
from supervisor.master import supervision as sv
from supervisor.master.logsink import LogSink, Pipes
from supervisor.system import spawn
from supervisor.system.log import Logs
from supervisor.system.loop import Loop
from supervisor.worker import entry as worker_entry
from supervisor.worker import spec as worker_spec


@dataclass(eq=False)
class Child:
    """A live worker process and the fds the master holds for it."""
    key: int
    app: str
    pid: int
    pidfd: int
    channel: socket.socket
    balancer_ends: tuple[socket.socket, ...]   # by balancer index; kept, so a restarted one gets its own again
    pipes: Pipes                  # its log pipes' read ends
    max_rss_mb: int = 0
    # Copies of the worker's own ends of those channels, by the same index, held only
    # until that balancer has its own copy (RECLAIM, or its fork): with it the balancer
    # reads back what the worker never read. (A replaced balancer gets fresh channels.)
    worker_ends: dict[int, socket.socket] = field(default_factory=dict)
    # Ends of channels to balancers that were replaced (`relink`): kept until the worker
    # closes its own (it would read our close as its balancer dropping it), and read
    # meanwhile: what it sent the dead balancer is closed, not left hanging.
    retired_ends: list[socket.socket] = field(default_factory=list)
    # A preloaded app's worker is forked by its template: until it says HELLO, pid is 0
    # and pidfd -1, and a signal for it waits here (the strongest asked for).
    uid: int = -1                 # the app's user, which its HELLO's pid must run as
    pending_signal: int | None = None
    # A worker started elsewhere (master.attach_points): never signalled, never reaped;
    # `life` is the other end of a line whose only other copy it holds (its exit reads
    # there), given to each balancer in place of a pidfd.
    attached: bool = False
    life: socket.socket | None = None

    @property
    def link_key(self) -> int:
        """What the balancers know it by: its pid, or an attached worker's key."""
        return self.key if self.attached else self.pid

    @property
    def exit_fd(self) -> int:
        """The fd a balancer watches for its exit: the pidfd, or an attached one's life line."""
        return self.life.fileno() if self.life is not None else self.pidfd


class WorkerPool:
    """Forks workers from `WorkerSpec`s and feeds `on_event` what happens to them."""

    def __init__(self, loop: Loop, logs: Logs, on_event: Callable[[object], None],
                 on_stats: Callable[[int, str, messages.Stats], None] = lambda key, app, stats: None,
                 on_attached: Callable[[int, messages.Message | None], None] = lambda key, message: None):
        self.loop = loop
        self.logs = logs
        self.log = logs.error
        self.on_event = on_event
        # An attached worker's READY, HEARTBEAT and BOOT_FAILED, and None when it is gone.
        self.on_attached = on_attached
        self.on_stats = on_stats   # (key, app, STATS): a worker's request figures, for /metrics
        self.children: dict[int, Child] = {}
        self.sink = LogSink(loop, logs, clock=lambda: loop.now)

    def spawn(self, key: int, spec: worker_spec.WorkerSpec, master_end: socket.socket,
              balancer_ends: tuple[socket.socket, ...]) -> int:
        """Start the worker `spec` describes (its `log_fds` are set here). The master
        keeps `master_end` (the other end of `spec.channel`) and `balancer_ends` (of
        `spec.balancers`, in the same order); the child's ends are closed here whatever
        happens. Raises OSError when the pipes or the fork fail, having closed the
        master's ends too."""
        pipes = None
        try:
            pipes = self.sink.open()
            spec.log_fds = (pipes.error_w, pipes.access_w)
            pid = spawn.fork(lambda: worker_entry.exec_worker(spec), spec.owned_fds())
        except OSError:
            master_end.close()
            _close_all(balancer_ends)
            _close_all(spec.balancers)
            if pipes is not None:
                self.sink.discard(pipes)
            raise
        finally:
            spec.channel.close()
        self.sink.follow(spec.app.name, pid, pipes)
        master_end.setblocking(False)
        child = Child(key, spec.app.name, pid, os.pidfd_open(pid), master_end, tuple(balancer_ends), pipes,
                      spec.app.max_rss, worker_ends=dict(enumerate(spec.balancers)))
        self.children[key] = child
        self.loop.register(child.pidfd, lambda: self._reap(child))
        self.loop.register(master_end, lambda: self._on_channel(child))
        return pid

    def spawn_from(self, templates, key: int, spec: worker_spec.WorkerSpec, master_end: socket.socket,
                   balancer_ends: tuple[socket.socket, ...]) -> None:
        """Ask the template of `spec`'s app and generation to fork the worker `spec`
        describes, with exactly the fds `spawn` would give it (see `messages.Spawn`).
        The ends are kept or closed as `spawn` does. The worker is known by its key
        until it says HELLO (`Spawned` then); if its channel closes first, the fork
        failed (`SpawnFailed`). Raises OSError when the pipes or the request fail."""
        pipes = None
        try:
            pipes = self.sink.open()
            fds = [spec.channel.fileno(), pipes.error_w]
            if pipes.access_w >= 0:
                fds.append(pipes.access_w)
            fds.extend(sock.fileno() for sock in spec.balancers)
            fds.extend(sock.fileno() for sock in spec.listeners.values())
            message = messages.Spawn(index=spec.index, listeners=tuple(spec.listeners),
                                     balancers=len(spec.balancers), access=pipes.access_w >= 0,
                                     log_level=spec.log_level, routes=spec.host_routes)
            templates.send(spec.app.name, spec.generation, message, fds)
        except (OSError, ValueError) as exc:
            master_end.close()
            _close_all(balancer_ends)
            _close_all(spec.balancers)
            if pipes is not None:
                self.sink.discard(pipes)
            raise OSError(str(exc)) from None
        finally:
            spec.channel.close()
        pipes.close_write_ends()
        master_end.setblocking(False)
        child = Child(key, spec.app.name, 0, -1, master_end, tuple(balancer_ends), pipes, spec.app.max_rss,
                      worker_ends=dict(enumerate(spec.balancers)), uid=spec.identity.uid)
        self.children[key] = child
        self.loop.register(master_end, lambda: self._on_channel(child))

    def adopt(self, child: Child) -> None:
        """An attached worker, welcomed: its channel is heard from now on."""
        child.channel.setblocking(False)
        self.children[child.key] = child
        self.loop.register(child.channel, lambda: self._on_channel(child))

    def drop_attached(self, key: int) -> None:
        """Forget an attached worker: its channel's end is what it hears (it stops)."""
        child = self.children.get(key)
        if child is None or not child.attached:
            return
        self._close_channel(child)
        self._close_ends(child)
        if child.life is not None:
            child.life.close()
        self.sink.finish(child.pipes)
        del self.children[key]

    def _introduce(self, child: Child, pid: int) -> None:
        """A template's worker said HELLO: watch it as our child, if it is one (the
        template runs app code, so the pid is checked: our child, as the app's user)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            self._unborn(child, f"its pid {pid} is gone ({exc.strerror})")
            return
        why = _not_ours(pid, child.uid)
        if why is None:
            try:
                signal.pidfd_send_signal(pidfd, 0)   # still the process we read about
            except ProcessLookupError:
                why = "it exited"
        if why is not None:
            os.close(pidfd)
            self.log.warning("a template's worker for app %s said it is pid %d, but %s", child.app, pid, why)
            self._unborn(child, f"pid {pid}: {why}")
            return
        child.pid, child.pidfd = pid, pidfd
        self.sink.follow(child.app, pid, child.pipes)
        self.loop.register(pidfd, lambda: self._reap(child))
        self.on_event(sv.Spawned(child.key, pid))
        if child.pending_signal is not None:
            self._signal(child, child.pending_signal)

    def _unborn(self, child: Child, reason: str) -> None:
        """A template's worker that never started (or cannot be trusted): forget it."""
        self._close_channel(child)
        self._close_ends(child)
        self.sink.follow(child.app, 0, child.pipes)   # what it wrote (a traceback) still reaches the log
        self.sink.finish(child.pipes)
        del self.children[child.key]
        self.on_event(sv.SpawnFailed(child.key, reason))

    # -- talking to workers -------------------------------------------------------

    def stop(self, key: int, handback: bool) -> None:
        child = self.children.get(key)
        if child is None:
            return
        try:
            channel.send(child.channel, messages.Stop(graceful=True, handback=handback))
        except OSError:
            self.kill(key, sv.SIGTERM)   # its channel is gone or full: the signal says the same

    def relink(self, index: int) -> None:
        """Balancer `index` is being replaced: give every worker a fresh channel to it
        (RELINK, with the worker's end), so that nothing the workers sent the dead one
        (hand-backs, parks, reports about its connections) reaches its successor, which
        would take it for a lie and drop the worker. A worker that cannot be told keeps
        its old channel."""
        for child in self.children.values():
            if child.channel.fileno() < 0:
                continue
            ours, theirs = channel.pair()
            try:
                channel.send(child.channel, messages.Relink(index=index), [theirs.fileno()])
            except OSError as exc:
                ours.close()
                theirs.close()
                self.log.warning("could not give worker %d a channel to the new balancer: %s", child.pid, exc)
                continue
            ends = list(child.balancer_ends)
            retired = ends[index]
            ends[index] = ours
            child.balancer_ends = tuple(ends)
            stale = child.worker_ends.pop(index, None)
            if stale is not None:
                stale.close()
            child.worker_ends[index] = theirs
            retired.setblocking(False)
            child.retired_ends.append(retired)
            self.loop.register(retired, lambda child=child, retired=retired: self._drain_retired(child, retired))

    def _drain_retired(self, child: Child, end: socket.socket) -> None:
        """Discard what a worker sent a balancer that died (closing the connections it
        handed back or parked there); forget the channel once the worker closed it."""
        while True:
            try:
                _, fds = channel.receive(end)
            except BlockingIOError:
                return
            except (ChannelClosed, ConnectionError):
                self.loop.unregister(end)
                end.close()
                child.retired_ends.remove(end)
                return
            except MessageError:
                continue   # its fds are closed already
            for fd in fds:
                os.close(fd)

    def kill(self, key: int, signal_name: str) -> None:
        child = self.children.get(key)
        if child is None:
            return
        if signal_name == sv.SIGABRT:
            # A stopped (SIGSTOP) worker cannot write its stacks: wake it, then abort it.
            self._signal(child, signal.SIGCONT)
        self._signal(child, signal.Signals[signal_name])

    @staticmethod
    def _signal(child: Child, signum: int) -> None:
        if child.attached:
            return   # not ours: the master never signals a pid it did not fork
        if child.pidfd < 0:   # not introduced yet: sent once it is (SIGKILL wins)
            if child.pending_signal != signal.SIGKILL:
                child.pending_signal = signum
            return
        spawn.signal_pidfd(child.pidfd, signum)

    # -- hearing from workers -----------------------------------------------------

    def _on_channel(self, child: Child) -> bool:
        """Handle one message; False once nothing more can be read now."""
        try:
            message, fds = channel.receive(child.channel)
        except BlockingIOError:
            return False
        except (ChannelClosed, ConnectionError):
            if child.attached:
                self.drop_attached(child.key)
                self.on_attached(child.key, None)
                return False
            if child.pidfd < 0:
                self._unborn(child, "its template did not start it")
                return False
            self._close_channel(child)
            return False
        except MessageError as exc:
            # Only app code writes garbage on this channel: nothing more it says can be
            # trusted. The worker is replaced (its exit goes the way of any crash).
            self.log.warning("worker %d sent a bad message: %s; replacing it", child.pid, exc)
            if child.attached:
                self.drop_attached(child.key)
                self.on_attached(child.key, None)
                return False
            self._close_channel(child)
            self._signal(child, signal.SIGKILL)
            return False
        for fd in fds:
            os.close(fd)
        kind = type(message)
        if child.attached:
            if kind is messages.Stats:
                self.on_stats(child.key, child.app, message)
            elif kind in (messages.Ready, messages.Heartbeat, messages.BootFailed):
                self.on_attached(child.key, message)
            else:
                self.log.warning("attached worker %d sent an unexpected %s message", child.pid, message.KIND)
            return child.key in self.children
        if child.pidfd < 0:
            if kind is messages.Hello:
                self._introduce(child, message.pid)
            else:
                self.log.warning("a template's worker for app %s sent %s before HELLO", child.app, message.KIND)
                self._unborn(child, "it broke the protocol")
            return child.key in self.children and child.channel.fileno() >= 0
        if kind is messages.Heartbeat:
            rss_kb = status_mod.rss_kb(child.pid) if child.max_rss_mb else None
            self.on_event(sv.Heartbeat(child.key, message.requests, message.connections, message.busy,
                                       message.oldest_s, rss_kb))
        elif kind is messages.Stats:
            self.on_stats(child.key, child.app, message)
        elif kind is messages.Ready:
            self.on_event(sv.Ready(child.key))
        elif kind is messages.BootFailed:
            self.on_event(sv.BootFailed(child.key, message.traceback))
        else:
            self.log.warning("worker %d sent an unexpected %s message", child.pid, message.KIND)
        return True

    def _reap(self, child: Child) -> None:
        status = spawn.reap(child.pid, block=False)
        self.loop.unregister(child.pidfd)
        os.close(child.pidfd)
        # Its last words (BOOT_FAILED) may still sit in the channel: hear them first.
        while child.channel.fileno() >= 0 and self._on_channel(child):
            pass
        self._close_channel(child)
        self._close_ends(child)
        self.sink.finish(child.pipes)   # its last lines (a traceback, faulthandler's stacks)
        del self.children[child.key]
        self.on_event(sv.Exited(child.key, describe_status(status)))

    def _close_ends(self, child: Child) -> None:
        _close_all(child.balancer_ends)
        self.release_worker_ends(child)
        for end in child.retired_ends:
            if self.loop.registered(end):
                self.loop.unregister(end)
            end.close()
        child.retired_ends.clear()

    @staticmethod
    def release_worker_ends(child: Child, index: int | None = None) -> None:
        """Balancer `index` (None: every one) has its copy of the worker's end now."""
        for number in [index] if index is not None else list(child.worker_ends):
            end = child.worker_ends.pop(number, None)
            if end is not None:
                end.close()

    def _close_channel(self, child: Child) -> None:
        if child.channel.fileno() >= 0:
            self.loop.unregister(child.channel)
            child.channel.close()

    def close(self) -> None:
        """At the master's exit: kill and reap whatever is left, and release its fds."""
        for child in list(self.children.values()):
            if child.attached:
                self.drop_attached(child.key)
                continue
            self._signal(child, signal.SIGKILL)
            if child.pidfd < 0:   # a template's worker that never said HELLO: not ours to reap
                self._close_channel(child)
                self._close_ends(child)
                self.sink.discard(child.pipes)
                continue
            spawn.reap(child.pid, block=True)
            if self.loop.registered(child.pidfd):
                self.loop.unregister(child.pidfd)
            os.close(child.pidfd)
            self._close_channel(child)
            self._close_ends(child)
            self.sink.finish(child.pipes)
        self.children.clear()


def _close_all(socks) -> None:
    for sock in socks:
        sock.close()


def _not_ours(pid: int, uid: int) -> str | None:
    """Why `pid` is not a worker a template forked for us (None: it is): it must be our
    child (re-parented to us) and run as the app's user."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        parent, real_uid = int(fields["PPid"]), int(fields["Uid"].split()[0])
    except (OSError, KeyError, ValueError, IndexError):
        return "it cannot be read in /proc"
    if parent != os.getpid():
        return f"it is not the master's child (its parent is {parent})"
    if real_uid != uid:
        return f"it runs as uid {real_uid}, not the app's {uid}"
    return None


def describe_status(status: int | None) -> str:
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    return "failed to boot" if code == worker_spec.EXIT_BOOT_FAILED else f"exit status {code}"
