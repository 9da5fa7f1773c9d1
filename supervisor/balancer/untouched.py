"""Whether a client's TCP connection is as the balancer left it: no byte read from it,
none written to it, not shut down (the kernel's counters, not a guess).

A worker that dies takes with it the connections it had read from its channel but not
yet acknowledged; the balancer still holds its copy of each. One the worker never
touched (sent ahead to a busy worker, or read just before a crash) is safe to give to
another worker: its request is still whole in the socket, and nothing was answered.
The kernel says so: TCP_INFO's bytes received less what waits to be read (FIONREAD) is
what the holders of the socket consumed, its bytes acknowledged plus what waits in the
send queue (TIOCOUTQ) is what they wrote. Both are compared with the values when the
balancer passed the connection on: (0, 0) for one it accepted (it only ever peeks),
`counts()` taken when a worker handed one back.
"""
from __future__ import annotations

import array
import fcntl
import socket
import struct
import termios

# struct tcp_info (linux/tcp.h): the u64 tcpi_bytes_acked and tcpi_bytes_received sit
# at these offsets since Linux 4.1; tcpi_state is its first byte.
_BYTES_ACKED_AT = 120
_INFO_BYTES = 136
_ESTABLISHED = 1
_CLOSE_WAIT = 8   # the client shut its side (it sent its whole request and waits)
FRESH = (0, 0)


def counts(sock: socket.socket) -> tuple[int, int] | None:
    """(bytes consumed from the socket, bytes written to it) so far, or None if the
    kernel cannot say (not TCP, closed, shut down, an old kernel)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO_BYTES)
        if len(info) < _INFO_BYTES or info[0] not in (_ESTABLISHED, _CLOSE_WAIT):
            return None
        acked, received = struct.unpack_from("=QQ", info, _BYTES_ACKED_AT)
        waiting = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting, True)
        unsent = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, unsent, True)
    except OSError:
        return None
    return received - waiting[0], acked + unsent[0]


def untouched(sock: socket.socket, when_passed: tuple[int, int] | None) -> bool:
    """Whether no one read from or wrote to `sock` since it was passed on with
    `when_passed` (None: not known, so it may have been)."""
    if when_passed is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    return counts(sock) == when_passed
