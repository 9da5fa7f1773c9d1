"""Message encoding: both wire forms, the choice between them, and hostile bytes."""
import dataclasses
import json
import math
import struct

import pytest

from supervisor import messages
from supervisor.messages import (
    ACK,
    ATTACH,
    BOOT_FAILED,
    CHANGED,
    CLOSED,
    CONN,
    DETACH,
    DRAIN,
    HANDBACK,
    HEARTBEAT,
    KINDS,
    METRICS,
    READY,
    RELEASED,
    REOPEN,
    ROUTES,
    SOCKETS,
    STOP,
    TAKEN,
    TAKEOVER,
    UPSTREAM,
    Message,
    MessageError,
)

CONN_FIELDS = {"id": 7, "peer": ["203.0.113.7", 51234], "listener": "web"}

# Hot kinds whose fields fit the binary layout: (message, encoded length with fd count 1).
BINARY = [
    (Message(CONN, CONN_FIELDS), 15 + 11 + 3),
    (Message(CONN, {"id": 2**64 - 1, "peer": ["", 0], "listener": ""}), 15),  # an AF_UNIX peer
    (Message(CONN, {"id": 1, "peer": ["2001:db8::1%eth0", 65535], "listener": "tls-ü"}), 15 + 16 + 6),
    (Message(CONN, dict(CONN_FIELDS, proxy=True)), 15 + 11 + 3),
    (Message(CONN, dict(CONN_FIELDS, data="R0VUIC8gSFRUUC8xLjENCg==")), 15 + 11 + 3 + 24),
    (Message(CONN, dict(CONN_FIELDS, data="", proxy=True)), 15 + 11 + 3),
    (Message(ACK, {"id": 1, "busy": 0}), 14),
    (Message(ACK, {"id": 2**64 - 1, "busy": 2**32 - 1}), 14),
    (Message(CLOSED, {"id": 99, "busy": 3}), 14),
    (Message(HEARTBEAT, {"requests": 10, "connections": 2, "busy": 1, "oldest_s": 0.125}), 26),
    (Message(HEARTBEAT, {"requests": 0, "connections": 0, "busy": 0, "oldest_s": None}), 26),
    (Message(HEARTBEAT, {"requests": 2**64 - 1, "connections": 1, "busy": 1, "oldest_s": math.inf}), 26),
]

# Hot kinds whose fields do not fit: the text form carries them unchanged.
TEXT_FALLBACK = [
    Message(CONN, dict(CONN_FIELDS, proxy=False)),
    Message(CONN, dict(CONN_FIELDS, data=None)),
    Message(CONN, dict(CONN_FIELDS, extra=1)),
    Message(CONN, {"id": 7, "peer": ["x" * 256, 1], "listener": "web"}),
    Message(CONN, {"id": 7, "peer": ["h", 65536], "listener": "web"}),
    Message(CONN, {"id": 7, "peer": ["h", 1], "listener": "l" * 256}),
    Message(CONN, {"id": 7, "peer": ["h", 1, 0, 0], "listener": "web"}),
    Message(CONN, {"id": 7, "peer": ["\udc80", 1], "listener": "web"}),
    Message(CONN, {"id": -1, "peer": ["h", 1], "listener": "web"}),
    Message(CONN, {"id": 7, "peer": ["h", True], "listener": "web"}),
    Message(CONN, {"id": 7, "listener": "web"}),
    Message(ACK, {"id": True, "busy": 0}),
    Message(ACK, {"id": 1.5, "busy": 0}),
    Message(ACK, {"id": -1, "busy": 0}),
    Message(ACK, {"id": 2**64, "busy": 0}),
    Message(ACK, {"id": 1, "busy": 2**32}),
    Message(ACK, {"id": 1, "busy": 0, "more": 1}),
    Message(ACK, {"id": None, "busy": 0}),
    Message(CLOSED, {"id": 1}),
    Message(CLOSED),
    Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1, "oldest_s": 3}),
    Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1}),
    Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1, "other": None}),
    Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": -1, "oldest_s": None}),
]

# Every other kind, as the rest of Baton sends them.
RARE = [
    Message(READY, {"pid": 42}),
    Message(READY),
    Message(BOOT_FAILED, {"traceback": "Traceback...\nImportError: ü"}),
    Message(STOP, {"graceful": True, "handback": False}),
    Message(CHANGED, {"topics": ["config", "app:web"]}),
    Message(ROUTES, {"routes": {"web": {"hosts": ["*"]}}, "open": ["web", "tls"]}),
    Message(TAKEOVER, {"pid": 1}),
    Message(SOCKETS, {"names": ["web"]}),
    Message(TAKEN, {"pid": 2}),
    Message(RELEASED),
    Message(UPSTREAM),
    Message(METRICS, {"apps": {}, "overall": {"requests": 1.5}}),
    Message(DRAIN),
    Message(REOPEN, {"numbers": [1, 2]}),
    Message(ATTACH, {"key": -1, "app": ""}),
    Message(DETACH, {"key": 12}),
    Message(HANDBACK, {"peer": ["10.0.0.1", 4], "listener": "web", "data": "eA==", "app": "a"}),
]


def test_the_cases_cover_every_kind():
    assert {m.kind for m, _ in BINARY} | {m.kind for m in RARE} == KINDS


@pytest.mark.parametrize("message,length", BINARY)
@pytest.mark.parametrize("fd_count", [0, 1, 255])
def test_hot_kinds_take_the_binary_form_and_round_trip(message, length, fd_count):
    data = messages.encode(message, fd_count)
    assert data[0] == fd_count
    assert data[1] < 0x20
    assert len(data) == length
    decoded, announced = messages.decode(data)
    assert (decoded, announced) == (message, fd_count)


@pytest.mark.parametrize("message", TEXT_FALLBACK + RARE)
@pytest.mark.parametrize("fd_count", [0, 3])
def test_everything_else_takes_the_text_form_and_round_trips(message, fd_count):
    data = messages.encode(message, fd_count)
    assert data[1] >= 0x20
    assert data == bytes((fd_count,)) + message.kind.encode() + b"\0" + json.dumps(
        message.fields, separators=(",", ":")).encode()
    assert messages.decode(data) == (message, fd_count)


def test_binary_layout_is_pinned():
    # The layout is a contract between processes of one release: pin it byte for byte.
    assert messages.encode(Message(ACK, {"id": 0x0102, "busy": 5}), 0) == b"\0\x02\x02\x01" + bytes(6) + b"\5\0\0\0"
    assert messages.encode(Message(CLOSED, {"id": 1, "busy": 0}), 0)[:2] == b"\0\x03"
    assert messages.encode(Message(CONN, dict(CONN_FIELDS, proxy=True, data="QQ==")), 1) == (
        b"\1\1" + struct.pack("<QHBBB", 7, 51234, 3, 11, 3) + b"203.0.113.7" + b"web" + b"QQ==")
    assert messages.encode(Message(HEARTBEAT, {"requests": 1, "connections": 2, "busy": 3, "oldest_s": None})) == (
        b"\0\4" + struct.pack("<QIId", 1, 2, 3, math.nan))


def test_heartbeat_nan_is_not_confused_with_none():
    message = Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1, "oldest_s": math.nan})
    data = messages.encode(message)
    assert data[1] >= 0x20  # NaN means None in the binary form, so NaN itself goes as text
    assert math.isnan(messages.decode(data)[0]["oldest_s"])


def test_hot_kinds_are_still_read_in_the_text_form():
    data = b'\1conn\0{"id":3,"peer":["h",1],"listener":"web"}'
    assert messages.decode(data) == (Message(CONN, {"id": 3, "peer": ["h", 1], "listener": "web"}), 1)
    assert messages.decode(b'\0ack\0{"id":3,"busy":0}') == (Message(ACK, {"id": 3, "busy": 0}), 0)


def test_a_decoded_message_is_an_ordinary_message():
    message, _ = messages.decode(messages.encode(Message(ACK, {"id": 4, "busy": 1})))
    assert type(message) is Message
    assert message["id"] == 4 and message.fields == {"id": 4, "busy": 1} and message.kind == ACK
    assert repr(message) == "Message(kind='ack', fields={'id': 4, 'busy': 1})"
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.kind = CONN
    assert Message(READY).fields == {} and Message(READY).fields is not Message(READY).fields


def _truncations(data):
    return [data[:end] for end in range(len(data))]


HOSTILE = [
    *_truncations(messages.encode(Message(ACK, {"id": 1, "busy": 2}), 0)),
    *_truncations(messages.encode(Message(CLOSED, {"id": 1, "busy": 2}), 0)),
    *_truncations(messages.encode(Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1, "oldest_s": 1.0}))),
    *_truncations(messages.encode(Message(CONN, CONN_FIELDS), 1)),
    *_truncations(messages.encode(Message(CONN, dict(CONN_FIELDS, data="QQ==")), 1))[:15 + 11 + 3],
    messages.encode(Message(ACK, {"id": 1, "busy": 2})) + b"\0",               # trailing bytes
    messages.encode(Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1, "oldest_s": 1.0})) + b"x",
    messages.encode(Message(CONN, CONN_FIELDS), 1) + b"x",                      # trailing, no data flag
    b"\0\0" + bytes(12),                                                        # kind code 0
    b"\0\5" + bytes(12),                                                        # unassigned kind codes
    b"\0\x1f" + bytes(24),
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 4, 0, 0),                            # unknown CONN flag
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0x80, 0, 0),
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 255, 0) + b"h",                   # host longer than the datagram
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 1, 255) + b"hw",                  # listener longer than the datagram
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 2, 1, 200) + b"hweb",                # with data flag too
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 1, 3) + b"\xffweb",              # host not UTF-8
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 1, 3) + b"h\xc3(b",              # listener not UTF-8
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 2, 1, 3) + b"hweb\x80",              # data not UTF-8
]


@pytest.mark.parametrize("data", HOSTILE)
def test_decode_rejects_hostile_binary(data):
    with pytest.raises(MessageError):
        messages.decode(data)


@pytest.mark.parametrize("fd_count", [-1, 256])
def test_encode_rejects_an_impossible_fd_count(fd_count):
    with pytest.raises(ValueError):
        messages.encode(Message(ACK, {"id": 1, "busy": 0}), fd_count)


def test_encode_rejects_an_oversized_message_in_either_form():
    with pytest.raises(ValueError):
        messages.encode(Message(CONN, dict(CONN_FIELDS, data="A" * messages.MAX_MESSAGE_BYTES)), 1)
    with pytest.raises(ValueError):
        messages.encode(Message(HANDBACK, {"data": "A" * messages.MAX_MESSAGE_BYTES}), 1)
