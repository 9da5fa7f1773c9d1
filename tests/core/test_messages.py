"""Message encoding: both wire forms, the choice between them, and hostile bytes."""
import dataclasses
import json
import math
import struct

import pytest

from supervisor.ipc import messages
from supervisor.ipc.messages import (
    ATTACH,
    BOOT_FAILED,
    CHANGED,
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
    REPORT,
    REPORT_MAX_IDS,
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
    (Message(REPORT, {"busy": 0, "acked": [], "closed": []}), 10),
    (Message(REPORT, {"busy": 2, "acked": [1, 2], "closed": [3]}), 10 + 3 * 8),
    (Message(REPORT, {"busy": 2**32 - 1, "acked": [], "closed": [2**64 - 1, 0]}), 10 + 2 * 8),
    (Message(REPORT, {"busy": 1, "acked": list(range(100)), "closed": list(range(REPORT_MAX_IDS - 100))}),
     10 + REPORT_MAX_IDS * 8),
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
    Message(REPORT, {"busy": True, "acked": [], "closed": []}),
    Message(REPORT, {"busy": -1, "acked": [], "closed": []}),
    Message(REPORT, {"busy": 2**32, "acked": [], "closed": []}),
    Message(REPORT, {"busy": 0, "acked": [True], "closed": []}),
    Message(REPORT, {"busy": 0, "acked": [1], "closed": [1.5]}),
    Message(REPORT, {"busy": 0, "acked": [-1], "closed": []}),
    Message(REPORT, {"busy": 0, "acked": [], "closed": [2**64]}),
    Message(REPORT, {"busy": 0, "acked": [None], "closed": []}),
    Message(REPORT, {"busy": 0, "acked": None, "closed": []}),
    Message(REPORT, {"busy": 0, "acked": []}),
    Message(REPORT, {"busy": 0, "acked": [], "closed": [], "more": 1}),
    Message(REPORT, {"busy": 0, "acked": [1], "closed": list(range(REPORT_MAX_IDS))}),  # one id too many
    Message(REPORT),
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
    assert messages.encode(Message(REPORT, {"busy": 5, "acked": [0x0102], "closed": [7, 8]}), 0) == (
        b"\0\x05" + b"\5\0\0\0" + b"\1\0" + b"\2\0"
        + b"\x02\x01" + bytes(6) + b"\7" + bytes(7) + b"\x08" + bytes(7))
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
    assert messages.decode(b'\0report\0{"busy":0,"acked":[3],"closed":[]}') == (
        Message(REPORT, {"busy": 0, "acked": [3], "closed": []}), 0)


def test_a_decoded_message_is_an_ordinary_message():
    message, _ = messages.decode(messages.encode(Message(REPORT, {"busy": 1, "acked": [4], "closed": []})))
    assert type(message) is Message
    assert message["acked"] == [4] and message.fields == {"busy": 1, "acked": [4], "closed": []}
    assert message.kind == REPORT
    assert repr(message) == "Message(kind='report', fields={'busy': 1, 'acked': [4], 'closed': []})"
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.kind = CONN
    assert Message(READY).fields == {} and Message(READY).fields is not Message(READY).fields


def _truncations(data):
    return [data[:end] for end in range(len(data))]


HOSTILE = [
    *_truncations(messages.encode(Message(REPORT, {"busy": 2, "acked": [], "closed": []}), 0)),
    *_truncations(messages.encode(Message(REPORT, {"busy": 2, "acked": [1], "closed": [2]}), 0)),
    *_truncations(messages.encode(Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1, "oldest_s": 1.0}))),
    *_truncations(messages.encode(Message(CONN, CONN_FIELDS), 1)),
    *_truncations(messages.encode(Message(CONN, dict(CONN_FIELDS, data="QQ==")), 1))[:15 + 11 + 3],
    messages.encode(Message(REPORT, {"busy": 2, "acked": [1], "closed": []})) + b"\0",  # trailing bytes
    messages.encode(Message(REPORT, {"busy": 2, "acked": [1], "closed": []})) + bytes(8),  # an id not counted
    b"\0\5" + struct.pack("<IHH", 0, 0xFFFF, 0xFFFF),                            # ids announced, none sent
    b"\0\5" + struct.pack("<IHH", 0, 1, 0) + bytes(4),                           # half an id
    messages.encode(Message(HEARTBEAT, {"requests": 1, "connections": 1, "busy": 1, "oldest_s": 1.0})) + b"x",
    messages.encode(Message(CONN, CONN_FIELDS), 1) + b"x",                      # trailing, no data flag
    b"\0\0" + bytes(12),                                                        # kind code 0
    b"\0\2" + bytes(12),                                                        # retired: ACK, CLOSED
    b"\0\3" + bytes(12),
    b"\0\6" + bytes(12),                                                        # unassigned kind codes
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
        messages.encode(Message(REPORT, {"busy": 0, "acked": [], "closed": []}), fd_count)


def test_encode_rejects_an_oversized_message_in_either_form():
    with pytest.raises(ValueError):
        messages.encode(Message(CONN, dict(CONN_FIELDS, data="A" * messages.MAX_MESSAGE_BYTES)), 1)
    with pytest.raises(ValueError):
        messages.encode(Message(HANDBACK, {"data": "A" * messages.MAX_MESSAGE_BYTES}), 1)


ENCODE_CONN = [
    ((7, ["203.0.113.7", 51234], "web"), CONN_FIELDS),
    ((7, ["203.0.113.7", 51234], "web", "QQ==", True), dict(CONN_FIELDS, data="QQ==", proxy=True)),
    ((7, ["203.0.113.7", 51234], "web", "", True), dict(CONN_FIELDS, proxy=True)),
    ((7, ["", 0], "web", "QQ=="), {"id": 7, "peer": ["", 0], "listener": "web", "data": "QQ=="}),
    ((7, ["x" * 256, 1], "web"), {"id": 7, "peer": ["x" * 256, 1], "listener": "web"}),  # as text
    ((7, ["h", 65536], "web"), {"id": 7, "peer": ["h", 65536], "listener": "web"}),
    ((7, ["\udc80", 1], "web", "", True), {"id": 7, "peer": ["\udc80", 1], "listener": "web", "proxy": True}),
]


@pytest.mark.parametrize("args,fields", ENCODE_CONN)
def test_encode_conn_is_encode_without_the_message(args, fields):
    data = messages.encode_conn(*args)
    assert data == messages.encode(Message(CONN, fields), 1)
    assert messages.decode(data) == (Message(CONN, fields), 1)
