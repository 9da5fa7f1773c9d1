"""Typed channel messages: every kind in both wire forms, the bytes of the previous
release, strict decoding of malformed fields, and hostile binary."""
import dataclasses
import json
import math
import struct

import pytest

from supervisor.ipc import messages
from supervisor.ipc.fields import NAME_MAX
from supervisor.ipc.messages import (
    CLASSES,
    KINDS,
    REPORT_MAX_IDS,
    TRACEBACK_MAX,
    Attach,
    BootFailed,
    Changed,
    Conn,
    Detach,
    Drain,
    Gone,
    HandBack,
    Heartbeat,
    Hello,
    Introduce,
    MessageError,
    Metrics,
    Ready,
    Reclaim,
    Refusal,
    Released,
    Relink,
    Reopen,
    Report,
    Routes,
    Sockets,
    Spawn,
    Standby,
    Stats,
    Stop,
    Taken,
    Takeover,
    Upstream,
    Welcome,
)

PEER = ("203.0.113.7", 51234)
ROUTING = {
    "listeners": {"web": ("a", "b"), "tls": ("a",)},
    "proxy": ("tls",),
    "apps": {"a": {"hosts": ("a.example", "*.a.example"), "default": True, "balance": "least-connections"},
             "b": {"hosts": ("b.example",), "default": False, "balance": "round-robin"}},
}
ROUTING_JSON = ('{"listeners":{"web":["a","b"],"tls":["a"]},"proxy":["tls"],"apps":{"a":{"hosts":'
                '["a.example","*.a.example"],"default":true,"balance":"least-connections"},"b":'
                '{"hosts":["b.example"],"default":false,"balance":"round-robin"}}}')

# Every kind as Baton sends it, with the bytes the previous release sent for it: these
# cross an upgrade (or did, between processes of one release), so they must not change.
WIRE = [
    (Ready(pid=42), b'\0ready\0{"pid":42}'),
    (BootFailed(traceback="Traceback...\nImportError: \u00fc"),
     b'\0boot_failed\0{"traceback":"Traceback...\\nImportError: \\u00fc"}'),
    (Heartbeat(requests=1, connections=2, busy=3, oldest_s=None), b"\0\4" + struct.pack("<QIId", 1, 2, 3, math.nan)),
    (Heartbeat(requests=10, connections=2, busy=1, oldest_s=0.125), b"\0\4" + struct.pack("<QIId", 10, 2, 1, 0.125)),
    (Reopen(numbers=(2, 5)), b'\2reopen\0{"numbers":[2,5]}'),
    (Stop(graceful=True, handback=False), b'\0stop\0{"graceful":true,"handback":false}'),
    (Changed(topics=("config", "app:web")), b'\0changed\0{"topics":["config","app:web"]}'),
    (Routes(routes=ROUTING, open=("web", "tls")), b'\2routes\0{"routes":' + ROUTING_JSON.encode() + b',"open":["web","tls"]}'),
    (Routes(routes=ROUTING, open=()), b'\0routes\0{"routes":' + ROUTING_JSON.encode() + b',"open":[]}'),
    (Metrics(apps={"a": {"baton_requests_total": 3, "baton_workers": 2}}, overall={"baton_reloads_total": 1}),
     b'\0metrics\0{"apps":{"a":{"baton_requests_total":3,"baton_workers":2}},"overall":{"baton_reloads_total":1}}'),
    (Drain(), b"\0drain\0{}"),
    (Stats(in_flight=1, responses=(0, 5, 0, 2, 1), durations=(1,) * 15, duration_sum_s=0.5),
     b"\0\7" + struct.pack("<Id20Q", 1, 0.5, 0, 5, 0, 2, 1, *(1,) * 15)),
    (Attach(key=4242, app="a"), b'\1attach\0{"key":4242,"app":"a"}'),
    (Attach(key=-1, app=""), b'\1attach\0{"key":-1,"app":""}'),
    (Detach(key=12), b'\0detach\0{"key":12}'),
    (Reclaim(key=12), b'\2reclaim\0{"key":12}'),
    (Upstream(), b"\1upstream\0{}"),
    (Relink(index=1), b'\1relink\0{"index":1}'),
    (Spawn(index=2, listeners=("web",), balancers=1, access=True, log_level="info", routes={}),
     b'\5spawn\0{"index":2,"listeners":["web"],"balancers":1,"access":true,"log_level":"info","routes":{}}'),
    (Spawn(index=1, listeners=(), balancers=0, access=False, log_level="debug", routes=ROUTING),
     b'\2spawn\0{"index":1,"listeners":[],"balancers":0,"access":false,"log_level":"debug","routes":'
     + ROUTING_JSON.encode() + b'}'),
    (Hello(pid=4243), b'\0hello\0{"pid":4243}'),
    (Introduce(app="", pid=9, tag="v2.1-rc:1"), b'\0introduce\0{"app":"","pid":9,"tag":"v2.1-rc:1"}'),
    (Welcome(balancers=2, key=1 << 30, access=True), b'\5welcome\0{"balancers":2,"key":1073741824,"access":true}'),
    (Refusal(reason="uid 33 is not in attach_allow"), b'\0refusal\0{"reason":"uid 33 is not in attach_allow"}'),
    (Standby(standby=True), b'\0standby\0{"standby":true}'),
    (Gone(key=1 << 30), b'\0gone\0{"key":1073741824}'),
    (Takeover(pid=1), b'\0takeover\0{"pid":1}'),
    (Sockets(names=("listener:web", "reuseport:r:a:0", "health")),
     b'\3sockets\0{"names":["listener:web","reuseport:r:a:0","health"]}'),
    (Taken(pid=2), b'\1taken\0{"pid":2}'),
    (Released(), b"\0released\0{}"),
    (Conn(id=7, peer=PEER, listener="web"), b"\1\1" + struct.pack("<QHBBB", 7, 51234, 0, 11, 3) + b"203.0.113.7web"),
    (Conn(id=7, peer=PEER, listener="web", data=b"A", proxy=True),
     b"\1\1" + struct.pack("<QHBBB", 7, 51234, 3, 11, 3) + b"203.0.113.7web" + b"QQ=="),
    (Report(busy=5, acked=(0x0102,), closed=(7, 8)),
     b"\0\5" + b"\5\0\0\0" + b"\1\0" + b"\2\0" + b"\x02\x01" + bytes(6) + b"\7" + bytes(7) + b"\x08" + bytes(7)),
    (HandBack(peer=("10.0.0.1", 4), listener="web", data=b"x"), b'\1handback\0{"peer":["10.0.0.1",4],"listener":"web","data":"eA=="}'),
    (HandBack(peer=("10.0.0.1", 4), listener="web", data=b"x", app="a"),
     b'\1handback\0{"peer":["10.0.0.1",4],"listener":"web","data":"eA==","app":"a"}'),
    (HandBack(peer=("10.0.0.1", 4), listener="web", data=b"", keepalive_s=4.5),   # parked
     b'\1handback\0{"peer":["10.0.0.1",4],"listener":"web","data":"","keepalive_s":4.5}'),
]


def test_the_cases_cover_every_kind():
    assert {type(message) for message, _ in WIRE} == set(CLASSES)
    assert {cls.KIND for cls in CLASSES} == KINDS and len(KINDS) == 29


@pytest.mark.parametrize("message,data", WIRE)
def test_every_kind_keeps_the_bytes_of_the_previous_release(message, data):
    assert messages.encode(message) == data
    assert messages.decode(data) == message


# The hot kinds also in the text form (a receiver accepts both); the others have one form.
@pytest.mark.parametrize("message", [message for message, _ in WIRE])
def test_every_kind_round_trips_in_the_text_form(message):
    data = messages.encode_text(message)
    assert data[0] == message.fd_count() and data[1] >= 0x20
    kind, body = data[1:].split(b"\0", 1)
    assert kind == message.KIND.encode() and type(json.loads(body)) is dict
    decoded = messages.decode(data)
    assert decoded == message and type(decoded) is type(message)


# Hot kinds whose fields fit the binary layout: (message, encoded length).
BINARY = [
    (Conn(id=7, peer=PEER, listener="web"), 15 + 11 + 3),
    (Conn(id=2**64 - 1, peer=("", 0), listener=""), 15),  # an AF_UNIX peer
    (Conn(id=1, peer=("2001:db8::1%eth0", 65535), listener="tls-\u00fc"), 15 + 16 + 6),
    (Conn(id=7, peer=PEER, listener="web", proxy=True), 15 + 11 + 3),
    (Conn(id=7, peer=PEER, listener="web", data=b"GET / HTTP/1.1\r\n"), 15 + 11 + 3 + 24),
    (Conn(id=7, peer=("h" * 255, 1), listener="l" * 255, data=bytes(range(256))), 15 + 510 + 344),
    (Report(busy=0, acked=(), closed=()), 10),
    (Report(busy=2, acked=(1, 2), closed=(3,)), 10 + 3 * 8),
    (Report(busy=2**32 - 1, acked=(), closed=(2**64 - 1, 0)), 10 + 2 * 8),
    (Report(busy=1, acked=tuple(range(100)), closed=tuple(range(REPORT_MAX_IDS - 100))), 10 + REPORT_MAX_IDS * 8),
    (Report(busy=1, acked=(5,), closed=(), threads=4), 14 + 8),   # says its threads: code 6
    (Report(busy=0, acked=(), closed=(), threads=2**32 - 1), 14),
    (Report(busy=1, acked=tuple(range(100)), closed=tuple(range(REPORT_MAX_IDS - 100)), threads=1),
     14 + REPORT_MAX_IDS * 8),
    (Heartbeat(requests=0, connections=0, busy=0, oldest_s=0.0), 26),
    (Heartbeat(requests=2**64 - 1, connections=2**32 - 1, busy=2**32 - 1, oldest_s=1e9), 26),
]


@pytest.mark.parametrize("message,length", BINARY)
def test_hot_kinds_take_the_binary_form_and_round_trip(message, length):
    data = messages.encode(message)
    assert (data[0], data[1] < 0x20, len(data)) == (message.fd_count(), True, length)
    assert messages.decode(data) == message
    assert messages.decode(messages.encode_text(message)) == message


# A CONN the layout cannot carry (a length byte too small, no UTF-8) travels as text.
TEXT_CONN = [
    Conn(id=7, peer=("x" * 256, 1), listener="web"),
    Conn(id=7, peer=("h", 1), listener="l" * 256),
    Conn(id=7, peer=("\u00fc" * 200, 1), listener="web"),     # 200 characters, 400 bytes
    Conn(id=7, peer=("/run/\udc80.sock", 0), listener="web"),  # a UNIX path that is not UTF-8
    Conn(id=7, peer=("x" * NAME_MAX, 1), listener="web", data=b"\0", proxy=True),
]


@pytest.mark.parametrize("message", TEXT_CONN)
def test_a_conn_that_does_not_fit_the_layout_goes_as_text(message):
    data = messages.encode(message)
    assert data[:6] == b"\1conn\0"
    assert messages.decode(data) == message
    assert messages.encode_conn(message.id, message.peer, message.listener, message.data, message.proxy) == data


ENCODE_CONN = [
    ((7, ["203.0.113.7", 51234], "web"), Conn(7, PEER, "web")),
    ((7, PEER, "web", b"A", True), Conn(7, PEER, "web", b"A", True)),
    ((7, PEER, "web", b"", True), Conn(7, PEER, "web", proxy=True)),
    ((7, ("", 0), "web", b"A"), Conn(7, ("", 0), "web", b"A")),
]


@pytest.mark.parametrize("args,message", ENCODE_CONN)
def test_encode_conn_is_encode_without_the_message(args, message):
    data = messages.encode_conn(*args)
    assert data == messages.encode(message)
    assert messages.decode(data) == message


def test_a_decoded_message_is_a_frozen_slotted_instance_of_its_class():
    message = messages.decode(messages.encode(Report(busy=1, acked=(4,), closed=())))
    assert type(message) is Report and message.acked == (4,) and message.closed == ()
    assert repr(message) == "Report(busy=1, acked=(4,), closed=(), refused=(), threads=0)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.busy = 2
    for sample, _ in WIRE:
        assert type(sample).__dataclass_params__.frozen and not hasattr(sample, "__dict__")


@pytest.mark.parametrize("message,count", [
    (Ready(1), 0), (Conn(1, PEER, "web"), 1), (HandBack(PEER, "web", b""), 1), (Attach(1, "a"), 1),
    (Reclaim(1), 2), (Taken(1), 1), (Upstream(), 1), (Sockets(("a", "b")), 2), (Routes(ROUTING, ("web",)), 1),
    (Reopen((1, 2, 3)), 3), (Report(0, (), ()), 0), (Heartbeat(0, 0, 0, None), 0),
])
def test_the_fds_a_kind_carries(message, count):
    assert message.fd_count() == count == messages.encode(message)[0]


# -- strict decoding --------------------------------------------------------------------

# Per kind, fields that decode, the fds they carry, and for each field values that must
# not: JSON of the right shape whose fields are wrong in every way listed in the brief.
U64, U32 = ["x", True, -1, 2**64, 1.5, None, [1]], ["x", False, -1, 2**32, 2.0, None]
PID = ["1", True, 0, -1, 2**31, 1.0, None]
BOOL = [1, 0, "true", None, []]
NAME = [1, None, True, ["web"], "x" * (NAME_MAX + 1)]
PEERS = [["h"], ["h", 1, 0, 0], [1, 1], ["h", "1"], ["h", -1], ["h", 65536], ["h", True], "h:1", None,
         {"host": "h", "port": 1}, ["x" * (NAME_MAX + 1), 1]]
BASE64 = ["not base64!", "QQ=", "QQ===", "QQ==QQ==", "\u00fcA==", 1, None, ["QQ=="]]
DURATION = [-0.5, -1, True, "1", [0.5]]
FIGURES = [{"m": -1}, {"m": True}, {"m": "1"}, {"m": None}, [], {"m": {"n": 1}}]


def _names(bad_item):
    return [None, "web", [bad_item], ["web", "web"]]


MALFORMED_FIELDS = {
    Ready: ({"pid": 42}, 0, {"pid": PID}),
    BootFailed: ({"traceback": "t"}, 0, {"traceback": [None, 1, ["t"], "t" * (TRACEBACK_MAX + 1)]}),
    Heartbeat: ({"requests": 1, "connections": 1, "busy": 1, "oldest_s": 0.5}, 0,
                {"requests": U64, "connections": U32, "busy": U32, "oldest_s": DURATION}),
    Reopen: ({"numbers": [3]}, 1, {"numbers": [None, 3, [-1], ["3"], [True], [2**31], [3, 3], list(range(256))]}),
    Stop: ({"graceful": True, "handback": True}, 0, {"graceful": BOOL, "handback": BOOL}),
    Changed: ({"topics": ["config"]}, 0, {"topics": [None, "config", [1], ["x" * (NAME_MAX + 1)],
                                                     ["t"] * 4097]}),
    Routes: ({"routes": json.loads(ROUTING_JSON), "open": ["web"]}, 1, {
        "routes": [None, [], {}, {"listeners": {}, "proxy": []},                                   # missing apps
                   dict(json.loads(ROUTING_JSON), extra=1),
                   dict(json.loads(ROUTING_JSON), listeners={"web": "a"}),
                   dict(json.loads(ROUTING_JSON), listeners={"web": ["a", "a"]}),
                   dict(json.loads(ROUTING_JSON), listeners={"web": ["c"]}),                     # no such app
                   dict(json.loads(ROUTING_JSON), listeners={"web": [1]}),
                   dict(json.loads(ROUTING_JSON), proxy="tls"),
                   dict(json.loads(ROUTING_JSON), apps={"a": {"hosts": [], "default": 1, "balance": "x"},
                                                        "b": {"hosts": [], "default": False, "balance": "x"}}),
                   dict(json.loads(ROUTING_JSON), apps={"a": {"hosts": "a.example", "default": True, "balance": "x"},
                                                        "b": {"hosts": [], "default": False, "balance": "x"}}),
                   dict(json.loads(ROUTING_JSON), apps={"a": {"hosts": [], "default": True},
                                                        "b": {"hosts": [], "default": False, "balance": "x"}}),
                   dict(json.loads(ROUTING_JSON), apps={"a": {"hosts": [], "default": True, "balance": None},
                                                        "b": {"hosts": [], "default": False, "balance": "x"}})],
        "open": [None, "web", ["web", "web"], ["nowhere"], [1]]}),
    Metrics: ({"apps": {"a": {"m": 1}}, "overall": {"m": 1.5}}, 0, {
        "apps": [None, [], {"a": None}, {"a": 1}] + [{"a": figures} for figures in FIGURES],
        "overall": [None, {"m": -1}, {"m": False}, {"x" * (NAME_MAX + 1): 1}] + FIGURES}),
    Drain: ({}, 0, {}),
    Attach: ({"key": 7, "app": "a"}, 1, {"key": [0, -2, True, "7", 2**31, None, -1.0], "app": NAME}),
    Detach: ({"key": 7}, 0, {"key": PID}),
    Reclaim: ({"key": 7}, 2, {"key": PID}),
    Upstream: ({}, 1, {}),
    Takeover: ({"pid": 7}, 0, {"pid": PID}),
    Sockets: ({"names": ["listener:web"]}, 1, {"names": [None, "listener:web", [1], ["a", "a"],
                                                          ["x" * (3 * NAME_MAX)]]}),
    Taken: ({"pid": 7}, 1, {"pid": PID}),
    Released: ({}, 0, {}),
    Conn: ({"id": 3, "peer": ["h", 1], "listener": "web", "data": "QQ==", "proxy": True}, 1,
           {"id": U64, "peer": PEERS, "listener": NAME, "data": BASE64, "proxy": BOOL}),
    Report: ({"busy": 1, "acked": [1], "closed": [2]}, 0, {
        "busy": U32, "acked": [None, 1, {"1": 1}] + [[bad] for bad in U64] + [[0] * (REPORT_MAX_IDS + 1)],
        "closed": [None, "1"] + [[bad] for bad in U64]}),
    HandBack: ({"peer": ["h", 1], "listener": "web", "data": "QQ==", "app": "a"}, 1,
               {"peer": PEERS, "listener": NAME, "data": BASE64, "app": NAME}),
    # What a process on an attach socket (anyone allowed, running its own code) sends.
    Introduce: ({"app": "a", "pid": 7, "tag": "v1"}, 0, {
        "app": [None, 1, "x" * (NAME_MAX + 1)], "pid": PID,
        "tag": [None, 1, "a b", "v1\n", "x" * 65, "\u00e9", "$(id)", ["v1"]]}),
    Welcome: ({"balancers": 1, "key": 7, "access": True}, 4, {"balancers": [None, -1, 65, True], "key": PID,
                                                             "access": BOOL}),
    Refusal: ({"reason": "no"}, 0, {"reason": [None, 1, "x" * 1001]}),
    Standby: ({"standby": True}, 0, {"standby": BOOL}),
    Gone: ({"key": 7}, 0, {"key": PID}),
}
OPTIONAL = {(Conn, "data"), (Conn, "proxy"), (HandBack, "app")}


def _text(cls, body, fd_count) -> bytes:
    return bytes((fd_count,)) + cls.KIND.encode() + b"\0" + json.dumps(body, separators=(",", ":")).encode()


def _malformed():
    for cls, (good, fd_count, bad_values) in MALFORMED_FIELDS.items():
        kind = cls.KIND
        for name, values in bad_values.items():
            for value in values:
                yield pytest.param(_text(cls, dict(good, **{name: value}), fd_count), f"{kind} message: {name}",
                                   id=f"{kind}-{name}-{str(value)[:20]}")
            if (cls, name) not in OPTIONAL:
                body = {key: value for key, value in good.items() if key != name}
                yield pytest.param(_text(cls, body, fd_count), f"{kind} message: {name} is missing",
                                   id=f"{kind}-{name}-missing")
        yield pytest.param(_text(cls, dict(good, surprise=1), fd_count), f"{kind} message: unknown field 'surprise'",
                           id=f"{kind}-unknown-field")
        for announced in {fd_count - 1, fd_count + 1, 255} - {-1}:
            yield pytest.param(_text(cls, good, announced), f"{kind} message announces {announced} fds",
                               id=f"{kind}-announces-{announced}-fds")
        for body in (b"[]", b'"x"', b"1", b"null", b"", b"{", b"{}}", b'{"a":NaN}', b'{"a":-Infinity}',
                     b"[" * 100000, b'{"a":"\xff"}', b"{\"a\":1" + b"0" * 5000 + b"}"):
            yield pytest.param(bytes((fd_count,)) + kind.encode() + b"\0" + body, f"{kind} message",
                               id=f"{kind}-body-{body[:8]!r}")


MALFORMED = [
    pytest.param(b'\0heartbeat\0{"requests":"x"}', "heartbeat message: requests", id="the-crafted-heartbeat"),
    pytest.param(b'\0heartbeat\0{"requests":"x","connections":0,"busy":0,"oldest_s":null}',
                 "heartbeat message: requests", id="the-crafted-heartbeat-whole"),
    *_malformed(),
    # JSON without NaN or Infinity can still say infinity: a number too big for a float.
    pytest.param(b'\0heartbeat\0{"requests":1,"connections":1,"busy":1,"oldest_s":1e400}',
                 "heartbeat message: oldest_s", id="heartbeat-oldest_s-1e400"),
    pytest.param(b'\0heartbeat\0{"requests":1,"connections":1,"busy":1,"oldest_s":NaN}',
                 "heartbeat message: undecodable", id="heartbeat-oldest_s-NaN"),
    pytest.param(b'\0metrics\0{"apps":{"a":{"m":1e400}},"overall":{}}', "metrics message: apps", id="metrics-1e400"),
    pytest.param(b'\0metrics\0{"apps":{},"overall":{"m":-1e400}}', "metrics message: overall", id="metrics--1e400"),
    pytest.param(b"\0launch\0{}", "unknown message kind", id="unknown-kind"),
    pytest.param(b"\0READY\0{}", "unknown message kind", id="kind-is-case-sensitive"),
    pytest.param(b"\0r\xffady\0{}", "unknown message kind", id="kind-not-ascii"),
    pytest.param(b"\0ready", "not terminated", id="kind-not-terminated"),
    pytest.param(b"", "too short", id="empty"),
    pytest.param(b"\0", "too short", id="one-byte"),
]


@pytest.mark.parametrize("data,says", MALFORMED)
def test_malformed_text_is_rejected_naming_the_kind_and_the_field(data, says):
    with pytest.raises(MessageError) as caught:
        messages.decode(data)
    assert says in str(caught.value)
    assert len(str(caught.value)) < 400  # a peer's megabytes never reach a log line whole


def test_every_good_case_of_the_malformed_table_decodes():
    for cls, (good, fd_count, _) in MALFORMED_FIELDS.items():
        assert type(messages.decode(_text(cls, good, fd_count))) is cls


# Values that JSON allows and a field accepts, read the way the class says.
LENIENT = [
    (b'\0heartbeat\0{"requests":1,"connections":1,"busy":1,"oldest_s":3}', Heartbeat(1, 1, 1, 3.0)),
    (b'\0heartbeat\0{"requests":1,"connections":1,"busy":1,"oldest_s":null}', Heartbeat(1, 1, 1, None)),
    (b'\1conn\0{"id":3,"peer":["h",1],"listener":"web","data":"","proxy":false}', Conn(3, ("h", 1), "web")),
    (b'\0metrics\0{"apps":{},"overall":{"m":0}}', Metrics({}, {"m": 0})),
    (b'\1handback\0{"listener":"web","data":"","peer":["",0]}', HandBack(("", 0), "web", b"")),  # any key order
]


@pytest.mark.parametrize("data,message", LENIENT)
def test_json_a_field_accepts_decodes_to_the_fields_type(data, message):
    decoded = messages.decode(data)
    assert decoded == message
    assert [type(getattr(decoded, f.name)) for f in dataclasses.fields(decoded)] == \
        [type(getattr(message, f.name)) for f in dataclasses.fields(message)]


def _truncations(data):
    return [data[:end] for end in range(len(data))]


HOSTILE = [
    *_truncations(messages.encode(Report(2, (), ()))),
    *_truncations(messages.encode(Report(2, (1,), (2,)))),
    *_truncations(messages.encode(Heartbeat(1, 1, 1, 1.0))),
    *_truncations(messages.encode(Conn(7, PEER, "web"))),
    messages.encode(Report(2, (1,), ())) + b"\0",                                 # trailing bytes
    messages.encode(Report(2, (1,), ())) + bytes(8),                              # an id not counted
    b"\0\5" + struct.pack("<IHH", 0, 0xFFFF, 0xFFFF),                            # ids announced, none sent
    b"\0\5" + struct.pack("<IHH", 0, 1, 0) + bytes(4),                           # half an id
    b"\0\5" + struct.pack("<IHH", 0, REPORT_MAX_IDS, 1) + bytes(8 * (REPORT_MAX_IDS + 1)),  # too many ids
    b"\1\5" + struct.pack("<IHH", 0, 0, 0),                                       # a report with an fd
    b"\0\6" + struct.pack("<IHH", 0, 0, 0),                                       # threads missing
    b"\0\6" + struct.pack("<IIHH", 0, 1, 1, 0),                                   # an id announced, none sent
    b"\1\6" + struct.pack("<IIHH", 0, 1, 0, 0),
    messages.encode(Heartbeat(1, 1, 1, 1.0)) + b"x",
    b"\1\4" + struct.pack("<QIId", 1, 1, 1, 1.0),                                 # a heartbeat with an fd
    b"\0\4" + struct.pack("<QIId", 1, 1, 1, math.inf),                            # not a duration
    b"\0\4" + struct.pack("<QIId", 1, 1, 1, -math.inf),
    b"\0\4" + struct.pack("<QIId", 1, 1, 1, -0.5),
    messages.encode(Conn(7, PEER, "web")) + b"x",                                 # trailing, no data flag
    b"\0\1" + messages.encode(Conn(7, PEER, "web"))[2:],                          # a conn without its fd
    b"\2\1" + messages.encode(Conn(7, PEER, "web"))[2:],                          # or with two
    b"\0\0" + bytes(12),                                                          # kind code 0
    b"\0\2" + bytes(12),                                                          # retired: ACK, CLOSED
    b"\0\3" + bytes(12),
    b"\0\7" + bytes(12),                                                          # unassigned kind codes
    b"\0\x1f" + bytes(24),
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 4, 0, 0),                              # unknown CONN flag
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0x80, 0, 0),
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 255, 0) + b"h",                     # host longer than the datagram
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 1, 255) + b"hw",                    # listener longer than the datagram
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 2, 1, 200) + b"hweb",                  # with data flag too
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 1, 3) + b"\xffweb",                 # host not UTF-8
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 0, 1, 3) + b"h\xc3(b",                 # listener not UTF-8
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 2, 1, 3) + b"hweb\x80",                # data not base64
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 2, 1, 3) + b"hwebQQ=",                 # badly padded
    b"\1\1" + struct.pack("<QHBBB", 7, 80, 2, 1, 3) + b"hwebQ Q==",               # not only base64
]


@pytest.mark.parametrize("data", HOSTILE)
def test_decode_rejects_hostile_binary(data):
    with pytest.raises(MessageError):
        messages.decode(data)


# Messages this process must not send: encode says so (ValueError, not MessageError: the
# fault is ours), rather than let a receiver refuse them.
UNSENDABLE = [
    Conn(-1, PEER, "web"), Conn(2**64, PEER, "web"), Conn(1, ("h", 65536), "web"), Conn(1, ("h", -1), "web"),
    Conn(1, ("x" * (NAME_MAX + 1), 1), "web"), Conn(1, PEER, "x" * (NAME_MAX + 1)),
    Conn(1, PEER, "web", data=bytes(messages.MAX_MESSAGE_BYTES)),
    Heartbeat(1, 1, 1, math.nan), Heartbeat(1, 1, 1, math.inf), Heartbeat(1, 1, 1, -1.0), Heartbeat(-1, 1, 1, None),
    Heartbeat(1, 2**32, 1, None),
    Report(2**32, (), ()), Report(0, (-1,), ()), Report(0, (), (2**64,)), Report(0, (1,), tuple(range(REPORT_MAX_IDS))),
    Ready(0), Takeover(-5), Detach(-1), Attach(-2, "a"), BootFailed("t" * (TRACEBACK_MAX + 1)),
    Stop(1, True), Sockets(("a", "a")), Reopen(tuple(range(256))), Changed(("x" * (NAME_MAX + 1),)),
    Routes(ROUTING, ("nowhere",)), Routes(dict(ROUTING, listeners={"web": ("c",)}), ()),
    Metrics({}, {"m": -1}), Metrics({"a": {"m": math.nan}}, {}),
    HandBack(PEER, "web", bytes(messages.MAX_MESSAGE_BYTES)),
]


@pytest.mark.parametrize("message", UNSENDABLE, ids=repr)
def test_encode_refuses_what_a_receiver_would_refuse(message):
    with pytest.raises(ValueError) as caught:
        messages.encode(message)
    assert not isinstance(caught.value, MessageError)


def test_the_longest_traceback_fits_a_message_however_it_escapes():
    assert messages.decode(messages.encode(BootFailed("\U0001f600" * TRACEBACK_MAX))).traceback == \
        "\U0001f600" * TRACEBACK_MAX


def test_a_nan_heartbeat_age_is_refused_not_confused_with_none():
    with pytest.raises(ValueError):
        messages.encode(Heartbeat(1, 1, 1, math.nan))
    assert messages.decode(b"\0\4" + struct.pack("<QIId", 1, 1, 1, math.nan)).oldest_s is None


@pytest.mark.parametrize("message", [
    Report(busy=1, acked=(), closed=(), refused=(5,)),
    Report(busy=0, acked=(1, 2), closed=(3,), refused=tuple(range(messages.REFUSED_MAX))),
])
def test_a_report_with_refused_ids_travels_as_text_and_round_trips(message):
    data = messages.encode(message)
    assert data.startswith(b"\x00report\x00")
    assert messages.decode(data) == message


def test_a_binary_report_has_no_refused_ids_and_too_many_are_refused():
    assert messages.decode(messages.encode(Report(busy=1, acked=(1,), closed=()))).refused == ()
    with pytest.raises(ValueError):
        messages.encode(Report(busy=0, acked=(), closed=(), refused=tuple(range(messages.REFUSED_MAX + 1))))
    with pytest.raises(MessageError):
        messages.decode(b'\x00report\x00{"busy":0,"acked":[],"closed":[],"refused":[-1]}')
