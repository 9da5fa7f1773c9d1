"""The master's side of attached workers: welcome them, route them, let them go.

`attach_points` hands over each peer that introduced itself; here it becomes a worker
the master knows by a key of its own (ATTACHED_KEY_BASE and up: never a pid, which the
balancers use for forked workers). The welcome is its settings: the `WorkerSpec` the
app's current generation would give a forked worker, as JSON in a memfd, without the
app's `env` (an attached worker brings its own environment: the app's secrets never
leave for a process the master did not start), its `chdir` and `pythonpath` (paths of
the master's filesystem, which it may not share) and its module (it names its own).
With it go fresh balancer channels, its access-log pipe and its end of a life line.

What happens next is decided by the pure `attached.Attached` (which tag serves, who is
overdue) and carried out here: Route attaches the worker to every balancer (ATTACH,
then RECLAIM with a copy of the worker's end and the master's end of the life line,
which reads as closed when the worker exits, wherever it runs), Unroute detaches it,
Standby tells it, Drop ends its channel and tells the balancers it is gone (GONE: they
read back what it never read). The master never signals an attached worker.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from types import MappingProxyType

from supervisor.config.model import AppConfig, Config
from supervisor.ipc import channel, messages
from supervisor.master import attached as attached_mod
from supervisor.master import supervision as sv
from supervisor.master.attach_points import AttachPoints, Peer
from supervisor.master.pool import Child
from supervisor.system import privileges, users
from supervisor.system.loop import Timer
from supervisor.worker import entry as worker_entry

ATTACHED_KEY_BASE = 1 << 30


def _send_quietly(sock: socket.socket, message: messages.Message) -> None:
    """Send if it can be sent now; a peer gone or not reading hears it no other way."""
    try:
        channel.send(sock, message)
    except OSError:
        pass


def silent_s(app: AppConfig) -> float:
    """How long an attached worker may send no heartbeat: its request timeout (a stuck
    loop is the same failure as a forked worker's), and never under four beats."""
    beat = sv.heartbeat_interval_s(app)
    return max(4 * beat, (app.timeout or 30.0) + beat)


class AttachedWorkers:
    def __init__(self, master):
        self.master = master
        self.loop = master.loop
        self.log = master.log
        self.registry = attached_mod.Attached(master.clock)
        self.points = AttachPoints(self.loop, self.log, self._app_user, self._app_gid, self._introduced)
        self._next_key = ATTACHED_KEY_BASE
        self._timer: Timer | None = None

    def apply(self, config: Config) -> list[str]:
        """At start and on each reload: the attach sockets and each app's policy. The
        workers of an app that no longer takes attached workers are dropped."""
        for name in list(self.registry.apps):
            app = config.apps.get(name)
            if app is None or app.attach is None:
                self._execute(self.registry.forget_app(name, "its app takes no attached workers now"))
        for name, app in config.apps.items():
            if app.attach is not None:
                self.registry.configure(name, config.master.boot_timeout, silent_s(app), app.attach_promote)
        return self.points.apply(config)

    def close(self) -> None:
        self.points.close()
        if self._timer is not None:
            self._timer.cancel()

    # -- welcoming ---------------------------------------------------------------------

    def _app_user(self, app: AppConfig) -> str | None:
        return self.master._identity(app, announce=False).name

    def _app_gid(self, app: AppConfig) -> int:
        return self.master._identity(app, announce=False).gid

    def _introduced(self, app: AppConfig, sock: socket.socket, peer: Peer, hello: messages.Introduce) -> None:
        core_app = self.master.core.apps.get(app.name)
        if core_app is None:
            _send_quietly(sock, messages.Refusal(reason=f"app {app.name!r} is not running"))
            sock.close()
            return
        key, self._next_key = self._next_key, self._next_key + 1
        try:
            child = self._welcome(key, core_app.current, sock, peer, hello.tag)
        except (OSError, ValueError) as exc:
            self.log.warning("app %s: could not welcome the worker on the attach socket (%s): %s",
                             app.name, peer.describe(), exc)
            sock.close()
            return
        self.master.pool.adopt(child)
        self._execute(self.registry.joined(key, app.name, hello.tag, peer.pid, peer.uid, peer.gid))

    def _welcome(self, key: int, generation: sv.Generation, sock: socket.socket, peer: Peer, tag: str) -> Child:
        master, pool = self.master, self.master.pool
        pairs = [channel.pair() for _ in master.balancers.handles]   # (the balancer's end, the worker's)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pipes = pool.sink.open()
        memfd = -1
        try:
            spec = master._worker_spec(generation, 0, None, {}, ())
            entry = users.user(peer.uid)
            spec.identity = privileges.Identity(entry.pw_name if entry else f"uid {peer.uid}", peer.uid, peer.gid,
                                                known=entry is not None)
            spec.app = dataclasses.replace(generation.config, env=MappingProxyType({}), chdir=None, pythonpath=(),
                                           module=generation.config.module or "")
            spec.master_pid = 0
            spec.index = key - ATTACHED_KEY_BASE + 1
            payload = json.dumps({"spec": worker_entry.encode_spec(spec), "role": "attached", "tag": tag}).encode()
            memfd = os.memfd_create("baton-attached-spec", os.MFD_CLOEXEC)
            view = memoryview(payload)
            while view:
                view = view[os.write(memfd, view):]
            os.lseek(memfd, 0, os.SEEK_SET)
            fds = [memfd, theirs.fileno()]
            if pipes.access_w >= 0:
                fds.append(pipes.access_w)
            fds.extend(worker_end.fileno() for _, worker_end in pairs)
            welcome = messages.Welcome(balancers=len(pairs), key=key, access=pipes.access_w >= 0)
            sock.setblocking(True)
            sock.settimeout(1.0)   # a peer that reads nothing must not hold the master
            channel.send(sock, welcome, fds)
        except BaseException:
            for balancer_end, worker_end in pairs:
                balancer_end.close()
                worker_end.close()
            ours.close()
            pool.sink.discard(pipes)
            raise
        finally:
            theirs.close()
            if memfd >= 0:
                os.close(memfd)
        pool.sink.follow(generation.app, peer.pid, pipes)
        return Child(key, generation.app, peer.pid, -1, sock, tuple(p[0] for p in pairs), pipes,
                     worker_ends=dict(enumerate(p[1] for p in pairs)), uid=peer.uid, attached=True, life=ours)

    # -- what the channel says ---------------------------------------------------------

    def on_message(self, key: int, message: messages.Message | None) -> None:
        """From the pool: an attached worker's READY, HEARTBEAT, BOOT_FAILED, or None:
        its channel ended (the pool has closed everything of it)."""
        kind = type(message)
        if message is None:
            actions = self.registry.left(key, "its channel closed")
            self.master.balancers.gone(key)
        elif kind is messages.Ready:
            actions = self.registry.ready(key)
        elif kind is messages.Heartbeat:
            self.registry.heard(key, message.requests, message.connections)
            actions = []
        else:   # BootFailed
            actions = [attached_mod.Log("error", f"attached worker {key} failed to boot:\n{message.traceback}")]
            actions += self.registry.left(key, "it failed to boot")
            self.master.pool.drop_attached(key)
        self._execute(actions)

    def promote(self, app: str, tag: str) -> list[str]:
        """`baton ctl promote`: ValueError (with why) if it cannot be."""
        actions = self.registry.promote(app, tag)
        self._execute(actions)
        return [action.text for action in actions if isinstance(action, attached_mod.Log)]

    # -- carrying out ------------------------------------------------------------------

    def _execute(self, actions: list) -> None:
        pool, balancers = self.master.pool, self.master.balancers
        for action in actions:
            child = pool.children.get(getattr(action, "key", -1))
            if isinstance(action, attached_mod.Log):
                self.log.log(logging.getLevelName(action.level.upper()), "%s", action.text)
            elif child is None:
                continue
            elif isinstance(action, attached_mod.Route):
                balancers.attach(child.link_key, child.app, child.balancer_ends, child.worker_ends, child.exit_fd)
                pool.release_worker_ends(child)
            elif isinstance(action, attached_mod.Unroute):
                balancers.detach(child.link_key)
            elif isinstance(action, attached_mod.Standby):
                _send_quietly(child.channel, messages.Standby(standby=action.standby))
            elif isinstance(action, attached_mod.Drop):
                pool.drop_attached(child.key)
                balancers.gone(child.link_key)
        self._arm()

    def _arm(self) -> None:
        deadline = self.registry.next_deadline()
        timer = self._timer
        if timer is not None and not timer.cancelled and timer.when == deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timer = None if deadline is None else self.loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        self._execute(self.registry.tick())

    def routed_links(self) -> dict[int, tuple]:
        """For a restarted balancer: the routed attached workers, as `_balancer_links`."""
        return {child.link_key: (child.app, child.balancer_ends, child.worker_ends, child.exit_fd)
                for child in self.master.pool.children.values()
                if child.attached and (worker := self.registry.workers.get(child.key)) is not None and worker.routed}
