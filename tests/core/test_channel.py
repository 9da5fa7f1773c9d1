"""Channel messages: encoding, and strict fd passing over real SEQPACKET pairs."""
import array
import os
import socket

import pytest

from supervisor.ipc import channel, messages
from supervisor.ipc.channel import ChannelClosed
from supervisor.ipc.messages import (
    BOOT_FAILED,
    CONN,
    HEARTBEAT,
    READY,
    REPORT,
    STOP,
    Message,
    MessageError,
)


@pytest.mark.parametrize("message", [
    Message(READY, {"pid": 42}),
    Message(STOP, {"graceful": False}),
    Message(BOOT_FAILED, {"traceback": "Traceback...\nImportError: ü"}),
    Message(READY),
])
def test_encode_decode_round_trip(message):
    data = messages.encode(message, fd_count=3)
    assert messages.decode(data) == (message, 3)


@pytest.mark.parametrize("data", [b"", b"\0", b"\0ready", b"\0nonsense\0{}", b"\0ready\0[1]", b"\0ready\0{bad"])
def test_decode_rejects_garbage(data):
    with pytest.raises(MessageError):
        messages.decode(data)


def test_encode_rejects_unknown_kind():
    with pytest.raises(ValueError):
        messages.encode(Message("launch-missiles"))


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
        channel.send(left, Message(READY, {"n": 1}), [r, w])
        message, fds = channel.receive(right)
        assert message == Message(READY, {"n": 1})
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


def test_fd_count_mismatch_is_rejected_and_fds_are_closed():
    left, right = channel.pair()
    r, w = os.pipe()
    try:
        # Announce one fd, attach two: the receiver must refuse and close both copies.
        data = messages.encode(Message(READY), fd_count=1)
        left.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
            __import__("array").array("i", [r, w]))))])
        with pytest.raises(MessageError):
            channel.receive(right)
        # Only our own two ends may still point at the pipe: both received copies closed.
        assert _fds_pointing_at(os.readlink(f"/proc/self/fd/{r}")) == 2
    finally:
        for fd in (r, w):
            os.close(fd)
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
    conn = Message(CONN, {"id": 5, "peer": ["192.0.2.1", 443], "listener": "web", "proxy": True})
    try:
        channel.send(left, conn, [w])
        message, fds = channel.receive(right)
        assert message == conn and len(fds) == 1 and not os.get_inheritable(fds[0])
        os.write(fds[0], b"y")
        os.close(fds[0])
        assert os.read(r, 1) == b"y"
        for reply in (Message(REPORT, {"busy": 1, "acked": [5], "closed": []}),
                      Message(REPORT, {"busy": 0, "acked": [6, 7], "closed": [5, 6]}),
                      Message(HEARTBEAT, {"requests": 1, "connections": 0, "busy": 0, "oldest_s": None})):
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
        channel.send_encoded(left, messages.encode_conn(9, ["192.0.2.1", 443], "web", "QQ==", True), [w])
        message, fds = channel.receive(right)
        assert message == Message(CONN, {"id": 9, "peer": ["192.0.2.1", 443], "listener": "web",
                                         "data": "QQ==", "proxy": True})
        assert len(fds) == 1
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


@pytest.mark.parametrize("announced,attached", [(1, 0), (0, 1), (1, 2)])
def test_binary_fd_count_mismatch_is_rejected_and_fds_are_closed(announced, attached):
    left, right = channel.pair()
    r, w = os.pipe()
    try:
        data = messages.encode(Message(CONN, {"id": 1, "peer": ["", 0], "listener": "web"}), fd_count=announced)
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
