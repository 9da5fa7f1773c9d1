"""Send and receive one message, with its fds, over a SOCK_SEQPACKET socket.

The only module that calls sendmsg/recvmsg. Strict on receipt: fds arrive with
close-on-exec set, a truncated control message is an error, the number of fds must be
exactly what the message announced, and on any error every received fd is closed so
nothing leaks. The sender keeps its own copies; it closes them only once sendmsg has
succeeded, if it wants to.
"""
from __future__ import annotations

import array
import os
import socket

from supervisor import messages
from supervisor.messages import Message, MessageError

_MAX_FDS = 255
_ANCILLARY_BYTES = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


class ChannelClosed(Exception):
    """The peer closed its end."""


def pair() -> tuple[socket.socket, socket.socket]:
    """A fresh channel; both ends close-on-exec (we fork, we never exec through them)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = messages.encode(message, len(fds))
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], ancillary)
    if sent != len(data):  # SEQPACKET is all or nothing; anything else is a kernel surprise
        raise OSError(f"short send on channel: {sent} of {len(data)} bytes")


def receive(sock: socket.socket) -> tuple[Message, list[int]]:
    """Receive one message; raises ChannelClosed at EOF, MessageError on garbage."""
    data, ancillary, flags, _ = sock.recvmsg(
        messages.MAX_MESSAGE_BYTES, _ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
    fds = _fds_from(ancillary)
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise MessageError("message or its fds were truncated")
        if not data:
            if fds:
                raise MessageError("fds arrived without a message")
            raise ChannelClosed()
        message, announced = messages.decode(data)
        if announced != len(fds):
            raise MessageError(f"message announced {announced} fds, {len(fds)} arrived")
        return message, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _fds_from(ancillary) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return list(fds)
