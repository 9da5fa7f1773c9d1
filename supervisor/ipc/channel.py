"""Send and receive one message, with its fds, over a SOCK_SEQPACKET socket.

The only module that calls sendmsg/recvmsg. Strict on receipt: fds arrive with
close-on-exec set, a truncated control message is an error, the number of fds must be
exactly what the message announced (which `messages.decode` holds to what its kind
carries), and on any error every received fd is closed so nothing leaks. So a receiver
gets a well-formed message with exactly its fds, or ChannelClosed, or MessageError.
A message that arrived whole but whose fds did not (the receiver was at its fd limit,
so the kernel dropped them: MSG_CTRUNC) raises `Truncated`, a MessageError that still
carries the decoded message, so the receiver can say which one it could not take.
The sender keeps its own copies; it closes them only once sendmsg has succeeded, if it
wants to.
"""
from __future__ import annotations

import array
import os
import socket

from supervisor.ipc import messages
from supervisor.ipc.messages import Message, MessageError

_MAX_FDS = 255
_FD_BYTES = array.array("i").itemsize
_ANCILLARY_BYTES = socket.CMSG_SPACE(_MAX_FDS * _FD_BYTES)
_MAX_MESSAGE_BYTES = messages.MAX_MESSAGE_BYTES
# Plain ints, not the socket module's IntFlag members: `flags & member` goes through
# enum's Python-level __and__, several µs on every message of the hot path.
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_TRUNC, _MSG_CTRUNC = int(socket.MSG_TRUNC), int(socket.MSG_CTRUNC)
_encode, _decode = messages.encode, messages.decode


class ChannelClosed(Exception):
    """The peer closed its end."""


class Truncated(MessageError):
    """`message` arrived without (all of) its fds: we were out of fds, or the sender
    attached more than a message may carry. Whatever fds did arrive are closed."""

    def __init__(self, message: Message) -> None:
        super().__init__(f"{message.KIND} message arrived without its fds (out of fds?)")
        self.message = message


def pair() -> tuple[socket.socket, socket.socket]:
    """A fresh channel; both ends close-on-exec (we fork, we never exec through them)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send `message` with `fds`, exactly as many as its kind carries (else ValueError)."""
    send_encoded(sock, _encode(message), fds)


def send_encoded(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send a message its hot path encoded directly (see `messages.encode_conn`); the
    fd count it announces must be len(fds)."""
    if data[0] != len(fds):
        raise ValueError(f"the message announces {data[0]} fds, not the {len(fds)} given")
    if fds:
        sent = sock.sendmsg((data,), ((_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds)),))
    else:  # most messages carry no fd: plain send skips building the sendmsg arguments
        sent = sock.send(data)
    if sent != len(data):  # SEQPACKET is all or nothing; anything else is a kernel surprise
        raise OSError(f"short send on channel: {sent} of {len(data)} bytes")


def receive(sock: socket.socket) -> tuple[Message, list[int]]:
    """Receive one message; raises ChannelClosed at EOF, MessageError on garbage."""
    data, ancillary, flags, _ = sock.recvmsg(_MAX_MESSAGE_BYTES, _ANCILLARY_BYTES, _CMSG_CLOEXEC)
    fds = _fds_from(ancillary) if ancillary else []
    try:
        if flags & _MSG_TRUNC:
            raise MessageError("message was truncated")
        if not data:
            if fds:
                raise MessageError("fds arrived without a message")
            if flags & _MSG_CTRUNC:
                raise MessageError("fds were truncated, and no message came with them")
            raise ChannelClosed()
        message = _decode(data)
        if flags & _MSG_CTRUNC:
            raise Truncated(message)
        if data[0] != len(fds):
            raise MessageError(f"{message.KIND} message announced {data[0]} fds, {len(fds)} arrived")
        return message, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _fds_from(ancillary) -> list[int]:
    fds = []
    for level, kind, payload in ancillary:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_BYTES
            fds.extend(memoryview(payload)[:usable].cast("i"))
    return fds
