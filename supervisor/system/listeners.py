"""Bind or inherit the listening sockets named in the config.

Listeners are keyed by name, never by position, so later code (a reload, a handoff)
can say "this one stays". Sockets are non-blocking: workers accept in batches and a
shared socket's EAGAIN is normal.

A "systemd:NAME" listener is not bound here: it is a dup of the socket systemd passed
under that name (`activation.inherited()`). The passed fd stays the caller's, to close
or to keep for a reload that adopts it again; closing the listener (or the passed fd)
leaves systemd's own copy listening.
"""
from __future__ import annotations

import os
import socket
import stat
from typing import Mapping

from supervisor.config.model import ListenerConfig
from supervisor.config.reader import BindAddress

DEFER_ACCEPT_S = 1   # see _tune_tcp


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
            sock = _open(listener.bind, listener.backlog, reuseport)
    except OSError as exc:
        raise ListenerError(f"listener {listener.name!r} ({listener.bind}): {exc.strerror or exc}") from None
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


def _open(bind: BindAddress, backlog: int, reuseport: bool = False) -> socket.socket:
    if bind.kind == "fd":
        sock = socket.socket(fileno=os.dup(bind.fd))
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise OSError(f"fd {bind.fd} is not a stream socket")
        return sock
    if bind.kind == "unix":
        _unlink_socket_file(bind.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(bind.path)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock
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


def _unlink_socket_file(path: str) -> None:
    """Remove a stale UNIX socket file, but never a regular file someone cares about."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return f"unix:{address}"
