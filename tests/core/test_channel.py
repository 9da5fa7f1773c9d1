"""Channel messages: strict fd passing over real SEQPACKET pairs."""
import array
import os
import socket

import pytest

from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    Conn,
    Heartbeat,
    MessageError,
    Ready,
    Report,
    Sockets,
)


def _fds_pointing_at(target: str) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except FileNotFoundError:
            pass
    return count


def test_fds_travel_with_their_message_and_arrive_cloexec():
    left, right = channel.pair()
    r, w = os.pipe()
    try:
        channel.send(left, Sockets(names=("listener:a", "listener:b")), [r, w])
        message, fds = channel.receive(right)
        assert message == Sockets(names=("listener:a", "listener:b"))
        assert len(fds) == 2
        assert all(not os.get_inheritable(fd) for fd in fds)
        os.write(fds[1], b"x")
        assert os.read(r, 1) == b"x"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


@pytest.mark.parametrize("message,fds", [
    (Ready(pid=1), [0]), (Conn(id=1, peer=("", 0), listener="web"), []), (Sockets(names=("a", "b")), [0]),
])
def test_send_refuses_fds_its_message_does_not_carry(message, fds):
    left, right = channel.pair()
    right.setblocking(False)
    try:
        with pytest.raises(ValueError):
            channel.send(left, message, fds)
        with pytest.raises(BlockingIOError):
            right.recv(1)  # nothing went out
    finally:
        left.close()
        right.close()


def test_closed_peer_raises_channel_closed():
    left, right = channel.pair()
    left.close()
    with pytest.raises(ChannelClosed):
        channel.receive(right)
    right.close()


def test_hot_messages_travel_in_both_directions_with_and_without_fds():
    left, right = channel.pair()
    r, w = os.pipe()
    conn = Conn(id=5, peer=("192.0.2.1", 443), listener="web", proxy=True)
    try:
        channel.send(left, conn, [w])
        message, fds = channel.receive(right)
        assert message == conn and len(fds) == 1 and not os.get_inheritable(fds[0])
        os.write(fds[0], b"y")
        os.close(fds[0])
        assert os.read(r, 1) == b"y"
        for reply in (Report(busy=1, acked=(5,), closed=()),
                      Report(busy=0, acked=(6, 7), closed=(5, 6)),
                      Heartbeat(requests=1, connections=0, busy=0, oldest_s=None)):
            channel.send(right, reply)
            assert channel.receive(left) == (reply, [])
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


def test_a_directly_encoded_conn_travels_like_any_message():
    left, right = channel.pair()
    r, w = os.pipe()
    try:
        channel.send_encoded(left, messages.encode_conn(9, ("192.0.2.1", 443), "web", b"A", True), [w])
        message, fds = channel.receive(right)
        assert message == Conn(id=9, peer=("192.0.2.1", 443), listener="web", data=b"A", proxy=True)
        assert len(fds) == 1
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


# (message bytes, fds attached): the fds announced and attached disagree, or the fds
# announced are not what the kind carries.
MISMATCHED = [
    (messages.encode(Conn(id=1, peer=("", 0), listener="web")), 0),
    (messages.encode(Conn(id=1, peer=("", 0), listener="web")), 2),
    (b"\0" + messages.encode(Conn(id=1, peer=("", 0), listener="web"))[1:], 1),   # a CONN carries one
    (b"\2" + messages.encode(Conn(id=1, peer=("", 0), listener="web"))[1:], 2),
    (messages.encode(Report(busy=0, acked=(), closed=())), 1),
    (b"\1" + messages.encode(Report(busy=0, acked=(), closed=()))[1:], 1),          # a REPORT carries none
    (b'\1ready\0{"pid":1}', 1),
    (b'\1sockets\0{"names":["a","b"]}', 1),                                      # one per name
    (b'\2sockets\0{"names":["a"]}', 2),
    (b'\1heartbeat\0{"requests":"x"}', 1),                                       # garbage that brings an fd
]


@pytest.mark.parametrize("data,attached", MISMATCHED)
def test_fd_count_mismatch_is_rejected_and_fds_are_closed(data, attached):
    left, right = channel.pair()
    r, w = os.pipe()
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w][:attached]).tobytes())]
        left.sendmsg([data], ancillary if attached else [])
        with pytest.raises(MessageError):
            channel.receive(right)
        # Only our own two ends may still point at the pipe: both received copies closed.
        assert _fds_pointing_at(os.readlink(f"/proc/self/fd/{r}")) == 2
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


def test_hostile_binary_on_the_wire_closes_the_fds_that_came_with_it():
    left, right = channel.pair()
    r, w = os.pipe()
    try:
        left.sendmsg([b"\1\x09" + bytes(12)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
        with pytest.raises(MessageError):
            channel.receive(right)
        # Only our own two ends may still point at the pipe: both received copies closed.
        assert _fds_pointing_at(os.readlink(f"/proc/self/fd/{r}")) == 2
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


def test_a_message_whose_fds_could_not_be_received_is_truncated_and_still_decoded():
    """At its fd limit the receiver gets the message without its fd (MSG_CTRUNC):
    `Truncated` carries the message, so a worker can say which connection it missed."""
    import resource

    left, right = channel.pair()
    r, w = os.pipe()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    try:
        channel.send(left, Conn(id=7, peer=("192.0.2.1", 80), listener="web"), [r])
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        try:
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass   # EMFILE: not one fd more
        with pytest.raises(channel.Truncated) as caught:
            channel.receive(right)
        assert caught.value.message == Conn(id=7, peer=("192.0.2.1", 80), listener="web")
        assert isinstance(caught.value, MessageError)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()
