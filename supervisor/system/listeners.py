"""Bind or inherit the listening sockets named in the config.

Listeners are keyed by name, never by position, so later code (a reload, a handoff)
can say "this one stays". Sockets are non-blocking: workers accept in batches and a
shared socket's EAGAIN is normal.

A "systemd:NAME" listener is not bound here: it is a dup of the socket systemd passed
under that name (`activation.inherited()`). The passed fd stays the caller's, to close
or to keep for a reload that adopts it again; closing the listener (or the passed fd)
leaves systemd's own copy listening.

A "unix:" socket's file gets its mode, owner and group as it is bound (`socket_permissions`
says which, and why): the mode through the umask around bind(), so the file is never
more open than asked, not even for an instant.
"""
from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Mapping

from supervisor.config.model import ListenerConfig
from supervisor.config.reader import BindAddress
from supervisor.system import users

DEFER_ACCEPT_S = 1   # see _tune_tcp
# The group front proxies run as on Debian and Ubuntu (nginx, Apache): a root master
# gives its sockets to it, so they can connect (which takes write permission) and
# other local users cannot.
DEFAULT_SOCKET_GROUP = "www-data"


@dataclass(frozen=True)
class SocketPermissions:
    """What a UNIX socket's file gets: ``uid``/``gid`` -1 leave the master's own."""
    mode: int
    uid: int
    gid: int
    why: str      # for the log: where the values came from


def socket_permissions(listener: ListenerConfig, euid: int | None = None) -> SocketPermissions:
    """The mode, owner and group of `listener`'s socket file.

    Unset, the group is DEFAULT_SOCKET_GROUP when the master is root and that group
    exists (else the master's own), and the mode 0660 when there is such a group or
    socket_group is set, else 0666: a master that cannot hand the file to the proxy's
    group leaves it to the directory's permissions to choose who connects. The owner is
    socket_owner, else the master's user. Config values were validated by the reader;
    a user or group gone since raises ListenerError."""
    euid = os.geteuid() if euid is None else euid
    uid = gid = -1
    why = []
    if listener.socket_owner is not None:
        entry = users.user(listener.socket_owner)
        if entry is None:
            raise ListenerError(f"listener {listener.name!r}: socket_owner {listener.socket_owner!r} is unknown")
        uid = entry.pw_uid
    group = listener.socket_group
    if group is None and euid == 0 and users.group(DEFAULT_SOCKET_GROUP) is not None:
        group = DEFAULT_SOCKET_GROUP
        why.append(f"group {DEFAULT_SOCKET_GROUP}: the default under a root master, for the front proxy")
    if group is not None:
        entry = users.group(group)
        if entry is None:
            raise ListenerError(f"listener {listener.name!r}: socket_group {group!r} is unknown")
        gid = entry.gr_gid
    if listener.socket_mode is not None:
        mode = listener.socket_mode
    elif gid != -1:
        mode = 0o660
        why.append("mode 0660: the default with a group, whose members may connect")
    else:
        mode = 0o666
        why.append(f"mode 0666: the default with no group {DEFAULT_SOCKET_GROUP} to give it to, "
                   "so the directory's permissions choose who connects")
    return SocketPermissions(mode, uid, gid, "; ".join(why) or "as configured")


def apply_permissions(listener: ListenerConfig) -> SocketPermissions:
    """Give the live socket file of `listener` its (new) mode, owner and group, as a
    reload asks: the file at the path itself, never through a symlink, and only if it
    is a socket. Raises ListenerError."""
    permissions = socket_permissions(listener)
    path = listener.bind.path
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} is no longer a socket")
            # An O_PATH fd can be neither fchmod-ed nor fchown-ed; its /proc link can.
            via = f"/proc/self/fd/{fd}"
            # What both the old and the new mode allow, while the owner changes: a new
            # group never gets the old, wider mode.
            os.chmod(via, stat.S_IMODE(st.st_mode) & permissions.mode)
            os.chown(via, permissions.uid, permissions.gid)
            os.chmod(via, permissions.mode)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ListenerError(f"listener {listener.name!r} ({listener.bind}): {exc.strerror or exc}") from None
    return permissions


def describe_file(path: str) -> str:
    """The file at `path` as it is now: "mode 0660, owner root, group www-data"."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot stat it: {exc.strerror}"
    owner, group = users.user(st.st_uid), users.group(st.st_gid)
    return (f"mode {stat.S_IMODE(st.st_mode):04o}, owner {owner.pw_name if owner else st.st_uid}, "
            f"group {group.gr_name if group else st.st_gid}")


class ListenerError(Exception):
    """A listener could not be bound or inherited; the message names it."""


def open_listener(listener: ListenerConfig, reuseport: bool = False,
                  inherited: Mapping[str, int] | None = None) -> socket.socket:
    """Bind `listener`, or adopt the socket systemd passed by name in `inherited`."""
    adopting = listener.bind.kind == "systemd"
    if adopting:
        _check_inherited(listener, inherited or {})
    try:
        if adopting:
            sock = _adopt(inherited[listener.bind.fdname])
        else:
            sock = _open(listener.bind, listener.backlog, reuseport, listener)
    except OSError as exc:
        hint = ""
        if listener.bind.kind == "unix" and isinstance(exc, FileNotFoundError) and listener.socket_dir_mode is None:
            hint = " (its directory is missing: create it, or set socket_dir_mode to have it created)"
        raise ListenerError(f"listener {listener.name!r} ({listener.bind}): {exc.strerror or exc}{hint}") from None
    sock.setblocking(False)
    _tune_tcp(sock, defer_accept=listener.mode != "balance")
    return sock


def _tune_tcp(sock: socket.socket, defer_accept: bool) -> None:
    """Options of a TCP listener that save work on every connection:

    * TCP_NODELAY, which Linux copies to each accepted socket: no setsockopt each;
    * TCP_DEFER_ACCEPT where workers accept (share, reuseport): a connection is handed
      to accept() once its first bytes have arrived, so the worker reads them at once
      instead of waiting again. (A client that connects and stays silent is accepted
      after about a second anyway.) Not for the balancer, which passes connections on
      unread: measured, it only cost there.
    Either may be refused (another kernel): the acceptor then does without."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return
    options = [(socket.TCP_NODELAY, 1)]
    if defer_accept:
        options.append((socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S))
    for option, value in options:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            pass


def open_all(listeners, inherited: Mapping[str, int] | None = None) -> dict[str, socket.socket]:
    """Open every listener or none: on a failure the ones already opened are closed.

    `reuseport` listeners are left out: the master binds one socket per worker for them.
    `inherited` maps systemd's socket names to the fds it passed (see activation.py).
    """
    opened: dict[str, socket.socket] = {}
    try:
        for name, listener in listeners.items():
            if listener.mode != "reuseport":
                opened[name] = open_listener(listener, inherited=inherited)
    except BaseException:
        close_all(opened, listeners)
        raise
    return opened


def close_all(sockets: dict[str, socket.socket], listeners) -> None:
    for name, sock in sockets.items():
        path = listeners[name].bind.path if name in listeners else None
        sock.close()
        if path:
            _unlink_socket_file(path)


def _check_inherited(listener: ListenerConfig, inherited: Mapping[str, int]) -> None:
    name = listener.bind.fdname
    if name in inherited:
        return
    passed = f"LISTEN_FDNAMES={':'.join(inherited)}" if inherited else \
        "none were passed: was baton started through its .socket unit?"
    raise ListenerError(f"listener {listener.name!r}: no socket named {name!r} was passed by systemd ({passed})")


def _adopt(fd: int) -> socket.socket:
    """A socket of our own on systemd's listening socket `fd` (which stays open)."""
    copy = os.dup(fd)
    try:
        sock = socket.socket(fileno=copy)  # raises ENOTSOCK for a file
    except BaseException:
        os.close(copy)
        raise
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except BaseException:
        sock.close()
        raise
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.close()
        # A ListenDatagram=, or an Accept=yes connection: nothing to accept() on.
        raise OSError(f"fd {fd} is not a listening stream socket (use ListenStream= and Accept=no)")
    return sock


def _open(bind: BindAddress, backlog: int, reuseport: bool = False,
          listener: ListenerConfig | None = None) -> socket.socket:
    if bind.kind == "fd":
        sock = socket.socket(fileno=os.dup(bind.fd))
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise OSError(f"fd {bind.fd} is not a stream socket")
        return sock
    if bind.kind == "unix":
        return _open_unix(listener or ListenerConfig("", bind), backlog)
    family = socket.AF_INET6 if ":" in (bind.host or "") else socket.AF_INET
    host = bind.host
    if family == socket.AF_INET and host not in ("", None):
        # A name like "localhost" must resolve to one concrete address we bind.
        host = socket.getaddrinfo(host, bind.port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "[::]:80" means IPv6 only, so "0.0.0.0:80" can be bound beside it.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, bind.port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_unix(listener: ListenerConfig, backlog: int) -> socket.socket:
    path = listener.bind.path
    permissions = socket_permissions(listener)
    if listener.socket_dir_mode is not None:
        _make_directory(os.path.dirname(path), listener.socket_dir_mode, permissions)
    _unlink_socket_file(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file 0777 & ~umask: the umask gives it exactly the mode
        # asked for from its first instant (the master is single-threaded, so no other
        # file is created under this umask).
        previous = os.umask(0o777 & ~permissions.mode)
        try:
            sock.bind(path)
        finally:
            os.umask(previous)
        try:
            if permissions.uid != -1 or permissions.gid != -1:
                # Before listen(): until then nobody can connect, whoever owns the file.
                os.chown(path, permissions.uid, permissions.gid, follow_symlinks=False)
            sock.listen(backlog)
        except BaseException:
            _unlink_socket_file(path)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def _make_directory(path: str, mode: int, permissions: SocketPermissions) -> None:
    """Create the socket's directory with `mode`, owned as the socket is (so its group
    may enter). One that exists is left exactly as it is (never loosened); a symlink
    there is refused, never followed."""
    try:
        os.mkdir(path, 0o700)   # closed until it has its owner and mode
    except FileExistsError:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(f"socket directory {path} is a symlink: not following it") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"socket directory {path} exists and is not a directory") from None
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if permissions.uid != -1 or permissions.gid != -1:
            os.fchown(fd, permissions.uid, permissions.gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _unlink_socket_file(path: str) -> None:
    """Remove a stale UNIX socket file, but never a regular file someone cares about."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def listening_line(listener: ListenerConfig, sock: socket.socket | None) -> str:
    """What the log says of a listener that is open: its address and name and, for a
    UNIX socket, who may connect and why; `sock` None for a reuseport listener, whose
    sockets are bound per worker (from its config's address)."""
    if sock is None:
        bind = listener.bind
        host = f"[{bind.host}]" if ":" in (bind.host or "") else (bind.host or "0.0.0.0")
        scheme = "https" if listener.tls else "http"
        return f"{scheme}://{host}:{bind.port} ({listener.name}; reuseport: one socket per worker)"
    line = f"{describe(sock)} ({listener.name})"
    if listener.tls and line.startswith("http://"):
        line = "https://" + line[len("http://"):]
    if listener.bind.kind == "unix":
        try:
            why = socket_permissions(listener).why
        except ListenerError as exc:
            why = str(exc)
        line += f": {describe_file(listener.bind.path)} ({why})"
    return line


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return f"unix:{address}"
