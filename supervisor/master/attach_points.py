"""Attach sockets: where workers started elsewhere ask to serve an app.

An app with `attach = "unix:PATH"` gets a SOCK_SEQPACKET socket there, made by the
master: mode `attach_mode` (0660), owned by the master's user and by `attach_group`
(else the app's group). Who may connect is decided twice: by the file's permissions,
then by the peer's credentials (SO_PEERCRED, which the peer cannot forge) against
`attach_allow` (user names, "@group" names, uids; unset: the app's user only).

A peer sends INTRODUCE (the app, its pid, its version tag) within INTRODUCE_TIMEOUT_S
and is judged once it is read; one that passes is then the master's as that worker's
channel (`on_introduced`). Every other outcome ends the connection, with a log line naming the
peer's pid and uid: a refusal (REFUSAL first, so the worker can say why), a malformed
or late introduction, a peer gone. Nothing a peer sends is read past one message of
MAX_MESSAGE_BYTES, no fd it sends is kept, and at most ACCEPT_BATCH peers are taken
per wakeup and PENDING_MAX wait at once, so no peer can block, crash or exhaust the
master.
"""
from __future__ import annotations

import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Callable

from supervisor.config.model import AppConfig, Config
from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import MessageError
from supervisor.system import users
from supervisor.system.loop import Loop, Timer

INTRODUCE_TIMEOUT_S = 5.0
ACCEPT_BATCH = 16
PENDING_MAX = 64
BACKLOG = 64


@dataclass(frozen=True)
class Peer:
    """Who is at the other end, as the kernel says (SO_PEERCRED)."""
    pid: int
    uid: int
    gid: int

    def describe(self) -> str:
        return f"pid {self.pid or '?'}, uid {self.uid}, gid {self.gid}"


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return Peer(pid, uid, gid)


def allowed(allow: tuple, app_user: str | None, peer: Peer) -> str | None:
    """Why `peer` may not attach (None: it may). `allow` is `attach_allow` (None: the
    app's user only). A "@group" admits its gid as the peer's primary group, and the
    members this system's group database lists."""
    entries = allow if allow is not None else ((app_user,) if app_user is not None else (os.geteuid(),))
    for entry in entries:
        if isinstance(entry, int):
            if peer.uid == entry:
                return None
        elif entry.startswith("@"):
            group = users.group(entry[1:])
            if group is None:
                continue
            if peer.gid == group.gr_gid or _member(peer.uid, group):
                return None
        else:
            user = users.user(entry)
            if user is not None and user.pw_uid == peer.uid:
                return None
    shown = "attach_allow " + repr(list(allow)) if allow is not None else f"the app's user ({entries[0]})"
    return f"uid {peer.uid} (gid {peer.gid}) is not in {shown}"


def _member(uid: int, group: grp.struct_group) -> bool:
    user = users.user(uid)
    return user is not None and user.pw_name in group.gr_mem


class _Point:
    def __init__(self, app: AppConfig, sock: socket.socket):
        self.app = app
        self.sock = sock
        self.path = app.attach


class _Waiting:
    """An accepted peer that has not introduced itself yet."""
    def __init__(self, point: _Point, sock: socket.socket, peer: Peer):
        self.point, self.sock, self.peer = point, sock, peer
        self.timer: Timer | None = None


class AttachPoints:
    """The attach sockets of the apps that have one, and the peers on them."""

    def __init__(self, loop: Loop, log, app_user: Callable[[AppConfig], str | None],
                 app_gid: Callable[[AppConfig], int],
                 on_introduced: Callable[[AppConfig, socket.socket, Peer, messages.Introduce], None]):
        self.loop = loop
        self.log = log
        self.app_user = app_user
        self.app_gid = app_gid
        self.on_introduced = on_introduced
        self.points: dict[str, _Point] = {}       # by app
        self.waiting: dict[int, _Waiting] = {}    # by fd

    def apply(self, config: Config) -> list[str]:
        """Open the attach sockets `config` asks for and close the others; an app whose
        path did not change keeps its socket (and the settings of the new config).
        Returns the problems (an app's socket that could not be made), logged too."""
        problems = []
        wanted = {name: app for name, app in config.apps.items() if app.attach is not None}
        for name in list(self.points):
            point = self.points[name]
            # A new path, mode or group: a new socket (the workers attached keep their
            # connections; the next ones attach through the new file).
            if name not in wanted or _file_of(wanted[name]) != _file_of(point.app):
                self._close_point(point)
        for name, app in wanted.items():
            point = self.points.get(name)
            if point is not None:
                point.app = app
                continue
            try:
                sock = self._open(app)
            except OSError as exc:
                problems.append(f"app {name}: attach socket {app.attach}: {exc.strerror or exc}")
                self.log.error("%s", problems[-1])
                continue
            point = self.points[name] = _Point(app, sock)
            self.loop.register(sock, lambda point=point: self._accept(point))
        return problems

    def _open(self, app: AppConfig) -> socket.socket:
        path = app.attach
        directory = os.path.dirname(path)
        st = os.stat(directory)
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            self.log.warning("app %s: attach socket %s is in a world-writable directory: anyone may replace "
                             "it; use a directory only its users can write", app.name, path)
        elif st.st_mode & stat.S_IWOTH:
            self.log.warning("app %s: attach socket %s is in a world-writable directory (sticky): anyone may "
                             "squat the name while Baton is down; prefer a directory of its own", app.name, path)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        gid = self._gid(app)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            previous = os.umask(0o777 & ~app.attach_mode)
            try:
                sock.bind(path)
            finally:
                os.umask(previous)
            os.chown(path, -1, gid, follow_symlinks=False)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        allow = list(app.attach_allow) if app.attach_allow is not None else [self.app_user(app)]
        self.log.info("app %s: workers may attach at %s (mode %04o, group %s; allowed: %s)", app.name, path,
                      app.attach_mode, _group_name(gid), ", ".join(str(entry) for entry in allow))
        return sock

    def _gid(self, app: AppConfig) -> int:
        if app.attach_group is not None:
            group = users.group(app.attach_group)
            if group is not None:
                return group.gr_gid
            # A gid only the workers' side knows (another container's image) is still a gid.
            number = users.numeric_id(app.attach_group)
            if number is None:
                raise OSError(f"attach_group {app.attach_group!r} is unknown")
            return number
        return self.app_gid(app)

    def _accept(self, point: _Point) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = point.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # out of fds, most likely: the next wakeup retries
                self.log.warning("app %s: could not accept on the attach socket: %s", point.app.name, exc)
                return
            sock.setblocking(False)
            peer = peer_of(sock)
            if len(self.waiting) >= PENDING_MAX:
                self._refuse(sock, point, peer, f"{PENDING_MAX} peers are introducing themselves already")
                continue
            waiting = _Waiting(point, sock, peer)
            self.waiting[sock.fileno()] = waiting
            waiting.timer = self.loop.call_later(INTRODUCE_TIMEOUT_S, lambda w=waiting: self._drop(
                w, f"did not introduce itself within {INTRODUCE_TIMEOUT_S:g} s"))
            self.loop.register(sock, lambda w=waiting: self._introduce(w))

    def _introduce(self, waiting: _Waiting) -> None:
        try:
            message, fds = channel.receive(waiting.sock)
        except BlockingIOError:
            return
        except (ChannelClosed, ConnectionError):
            self._drop(waiting, "left before it introduced itself")
            return
        except MessageError as exc:
            self._drop(waiting, f"sent a malformed introduction ({exc})")
            return
        except OSError as exc:   # out of fds for what it sent, most likely
            self._drop(waiting, f"could not be read ({exc})")
            return
        for fd in fds:
            os.close(fd)
        app = waiting.point.app
        # Judged once its one message is read: closing with it unread would reset the
        # connection, and the peer would never read why.
        why = allowed(app.attach_allow, self.app_user(app), waiting.peer)
        if why is not None:
            self._forget(waiting)
            self._refuse(waiting.sock, waiting.point, waiting.peer, why)
            return
        if type(message) is not messages.Introduce:
            self._drop(waiting, f"sent {message.KIND} instead of an introduction")
            return
        self._forget(waiting)
        if message.app and message.app != app.name:
            self._refuse(waiting.sock, waiting.point, waiting.peer,
                         f"this socket is app {app.name!r}'s, not {message.app!r}'s")
            return
        self.on_introduced(app, waiting.sock, waiting.peer, message)

    def _refuse(self, sock: socket.socket, point: _Point, peer: Peer, why: str) -> None:
        self.log.warning("app %s: refused a worker on the attach socket (%s): %s", point.app.name,
                         peer.describe(), why)
        try:
            channel.send(sock, messages.Refusal(reason=why[:1000]))
        except OSError:
            pass
        sock.close()

    def _drop(self, waiting: _Waiting, why: str) -> None:
        self.log.warning("app %s: dropped a peer on the attach socket (%s): it %s", waiting.point.app.name,
                         waiting.peer.describe(), why)
        self._forget(waiting)
        waiting.sock.close()

    def _forget(self, waiting: _Waiting) -> None:
        self.waiting.pop(waiting.sock.fileno(), None)
        if waiting.timer is not None:
            waiting.timer.cancel()
        self.loop.unregister(waiting.sock)

    def _close_point(self, point: _Point) -> None:
        del self.points[point.app.name]
        for waiting in [w for w in self.waiting.values() if w.point is point]:
            self._forget(waiting)
            waiting.sock.close()
        self.loop.unregister(point.sock)
        point.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(point.path).st_mode):
                os.unlink(point.path)
        except OSError:
            pass

    def close(self) -> None:
        for point in list(self.points.values()):
            self._close_point(point)


def _file_of(app: AppConfig) -> tuple:
    return app.attach, app.attach_mode, app.attach_group, app.group, app.user


def _group_name(gid: int) -> str:
    entry = users.group(gid)
    return entry.gr_name if entry is not None else str(gid)
