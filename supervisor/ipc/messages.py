"""Channel message encoding and decoding (pure).

Every link between Baton's processes is a SOCK_SEQPACKET socket, so one datagram is
one message. A message is a kind plus a small JSON-able dict of fields, and it may
carry file descriptors; the fd *count* is part of the encoding, so a receiver can
insist on getting exactly the fds the sender announced (see `channel.py`).

Wire form: byte 0 is the fd count; byte 1 says which of two forms follows.

* Text form (every kind; byte 1 is the first letter of the kind): the kind in ASCII, a
  NUL, then compact JSON of the fields. This is the form Baton always used, so the
  rare kinds that cross a master upgrade (TAKEOVER, SOCKETS, HANDBACK, ...) still
  reach a master or balancer of the previous release.
* Binary form (byte 1 is a kind code below 0x20), for the kinds sent per connection,
  per serving-loop iteration or per heartbeat. Little-endian, no padding:

    HEARTBEAT    code 4     requests u64, connections u32, busy u32,
                            oldest_s f64 (NaN means None)                26 bytes
    CONN         code 1     id u64, peer port u16, flags u8, host length u8,
                            listener length u8; then the peer host and the listener
                            name (UTF-8); then, if flag 2, the rest of the datagram
                            is `data` (UTF-8; the base64 text, passed as is).
                            Flag 1: "proxy" is True. Other flags are an error.
    REPORT       code 5     busy u32, acked count u16, closed count u16;
                            then their u64 ids, the acked first   10 + 8 per id bytes

  Codes 2 and 3 belonged to ACK and CLOSED, one message per connection each, which
  REPORT replaced; they are not reused.

The encoder takes the binary form only when the fields match the layout exactly (the
same keys, ints that fit, a str where a str belongs), else the text form, so decode
always gives back the fields it was given. The decoder accepts both forms for every
kind and rejects anything else with MessageError: a short or long binary message, an
unknown kind code, lengths that do not add up, undecodable text.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from math import isnan

# Master <-> worker lifecycle.
READY = "ready"              # worker -> master: app imported, serving
BOOT_FAILED = "boot_failed"  # worker -> master: fields: traceback
HEARTBEAT = "heartbeat"      # worker -> master, from its serving loop: fields: requests,
                             # connections, busy, oldest_s (age of the oldest running request)
REOPEN = "reopen"            # master -> any child: log files were reopened (logrotate); fields:
                             # numbers (the fd numbers to replace); fds: the new files, same order
STOP = "stop"                # master -> worker: fields: graceful (bool), handback (bool: give idle
                             # keep-alive connections to the balancer instead of closing them)

# Watcher -> master: files changed on disk (debounced). topics: "config", "app:NAME".
CHANGED = "changed"          # fields: topics

# Master -> balancer: the routing table, with the fds of listeners it newly serves.
ROUTES = "routes"            # fields: routes (see balancer.routing_payload), open (names, in fd order)

# Master upgrade (see handoff.py), old master <-> new master.
TAKEOVER = "takeover"        # new -> old: fields: pid
SOCKETS = "sockets"          # old -> new: fields: names; fds: one per name
TAKEN = "taken"              # new -> old: fields: pid; fds: [channel to the new balancer]
RELEASED = "released"        # old -> new: the old master let go and drains
# Master -> balancer: where to send hand-backs once a new master took over (fds: [channel]).
UPSTREAM = "upstream"

# Master -> balancer: the master's figures for /metrics (fields: apps, overall), and the
# start of a graceful stop (stop accepting; /healthz answers 503).
METRICS = "metrics"
DRAIN = "drain"

# Master -> balancer: a worker's balancer-side channel end (one fd) once it is READY,
# and its removal when it retires or exits.
ATTACH = "attach"            # fields: key (worker pid), app; fds: [channel end]
DETACH = "detach"            # fields: key

# Balancer <-> worker: connections travel as fds.
CONN = "conn"                # balancer -> worker: fields: id, peer, listener; fds: [connection]
REPORT = "report"            # worker -> balancer: fields: busy, acked (ids of connections the
                             # worker now owns: the balancer closes its copies), closed (ids of
                             # connections that ended). Sent per batch of connections received
                             # and per serving-loop iteration, never per connection.
HANDBACK = "handback"        # worker -> balancer: fields: peer, listener, data (base64 of bytes
                             # read but not parsed); fds: [connection]. A retiring worker's idle
                             # keep-alive connection, for another worker of the same app.

KINDS = frozenset({REOPEN, TAKEOVER, SOCKETS, TAKEN, RELEASED, UPSTREAM, READY, BOOT_FAILED, HEARTBEAT, STOP, CHANGED, ROUTES, METRICS, DRAIN, ATTACH, DETACH, CONN, REPORT, HANDBACK})

MAX_MESSAGE_BYTES = 64 * 1024


class MessageError(ValueError):
    """A peer sent bytes that are not a well-formed message."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: str
    fields: dict = field(default_factory=dict)

    def __getitem__(self, name):
        return self.fields[name]


def encode(message: Message, fd_count: int = 0) -> bytes:
    if not 0 <= fd_count <= 255:
        raise ValueError("a message carries at most 255 fds")
    binary = _BINARY_ENCODERS.get(message.kind)
    if binary is not None:
        data = binary(message.fields, fd_count)
        if data is not None:
            return data
    return _encode_text(message, fd_count)


def decode(data: bytes) -> tuple[Message, int]:
    """Return the message and the number of fds its sender announced."""
    if len(data) < 2:
        raise MessageError("message too short")
    code = data[1]
    if code >= _FIRST_TEXT_BYTE:
        return _decode_text(data)
    binary = _BINARY_DECODERS.get(code)
    if binary is None:
        raise MessageError(f"unknown message kind code {code}")
    return binary(data)


# -- text form -----------------------------------------------------------------

_FIRST_TEXT_BYTE = 0x20  # kinds are lowercase words; binary kind codes sit below this


def _encode_text(message: Message, fd_count: int) -> bytes:
    if message.kind not in KINDS:
        raise ValueError(f"unknown message kind {message.kind!r}")
    body = json.dumps(message.fields, separators=(",", ":")).encode()
    data = bytes((fd_count,)) + message.kind.encode("ascii") + b"\0" + body
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def _decode_text(data: bytes) -> tuple[Message, int]:
    fd_count = data[0]
    kind_end = data.find(b"\0", 1)
    if kind_end < 0:
        raise MessageError("message kind is not terminated")
    try:
        kind = data[1:kind_end].decode("ascii")
        fields = json.loads(data[kind_end + 1:])
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"undecodable message: {exc}") from None
    if kind not in KINDS:
        raise MessageError(f"unknown message kind {kind!r}")
    if not isinstance(fields, dict):
        raise MessageError("message fields are not an object")
    return _message(kind, fields), fd_count


# -- binary form -----------------------------------------------------------------
# Each encoder returns None when the fields do not fit its layout exactly; the caller
# then falls back to the text form. `type(x) is int` keeps bools (and floats) out:
# struct would quietly turn True into 1, and the round trip would change the field.

_CONN_CODE, _HEARTBEAT_CODE, _REPORT_CODE = 1, 4, 5

_HEARTBEAT = struct.Struct("<BBQIId")      # fd count, code, requests, connections, busy, oldest_s
_CONN_HEAD = struct.Struct("<BBQHBBB")     # fd count, code, id, port, flags, host len, listener len
_CONN_HEAD_SIZE = _CONN_HEAD.size
_CONN_PROXY, _CONN_DATA = 1, 2
_CONN_KEYS = frozenset({"id", "peer", "listener", "data", "proxy"})
_REPORT_HEAD = struct.Struct("<BBIHH")     # fd count, code, busy, acked count, closed count
_REPORT_HEAD_SIZE = _REPORT_HEAD.size
_NAN = float("nan")                        # a heartbeat's oldest_s of None

# The most connection ids one REPORT carries; a sender with more sends several.
REPORT_MAX_IDS = (MAX_MESSAGE_BYTES - _REPORT_HEAD_SIZE) // 8

# Building the frozen dataclass through its slots skips the generated __init__ and its
# object.__setattr__ calls: about a third of the cost, paid on every message received.
_new_object = object.__new__
_set_kind = Message.__dict__["kind"].__set__
_set_fields = Message.__dict__["fields"].__set__


def _message(kind: str, fields: dict) -> Message:
    message = _new_object(Message)
    _set_kind(message, kind)
    _set_fields(message, fields)
    return message


def _encode_heartbeat(fields: dict, fd_count: int) -> bytes | None:
    if len(fields) != 4:
        return None
    requests, connections, busy = fields.get("requests"), fields.get("connections"), fields.get("busy")
    oldest_s = fields.get("oldest_s", _NAN)  # missing: not None, and NaN is refused below
    if oldest_s is None:
        oldest_s = _NAN
    elif type(oldest_s) is not float or isnan(oldest_s):
        return None
    if type(requests) is int and type(connections) is int and type(busy) is int:
        try:
            return _HEARTBEAT.pack(fd_count, _HEARTBEAT_CODE, requests, connections, busy, oldest_s)
        except struct.error:
            pass
    return None


def _decode_heartbeat(data: bytes) -> tuple[Message, int]:
    try:
        fd_count, _, requests, connections, busy, oldest_s = _HEARTBEAT.unpack(data)
    except struct.error:
        raise MessageError(f"heartbeat message of {len(data)} bytes, not {_HEARTBEAT.size}") from None
    return _message(HEARTBEAT, {"requests": requests, "connections": connections, "busy": busy,
                                "oldest_s": None if isnan(oldest_s) else oldest_s}), fd_count


def encode_conn(conn_id: int, peer: list, listener: str, data: str = "", proxy: bool = False) -> bytes:
    """`encode(Message(CONN, fields), 1)` without building the fields first: the
    balancer sends one per connection. An empty `data` and a false `proxy` are left out."""
    binary = _pack_conn(1, conn_id, peer, listener, data or None, proxy)
    if binary is not None:
        return binary
    fields = {"id": conn_id, "peer": peer, "listener": listener}
    if data:
        fields["data"] = data
    if proxy:
        fields["proxy"] = True
    return _encode_text(Message(CONN, fields), 1)


def _encode_conn(fields: dict, fd_count: int) -> bytes | None:
    conn_id, peer, listener = fields.get("id"), fields.get("peer"), fields.get("listener")
    if not (type(conn_id) is int and type(peer) is list and len(peer) == 2 and type(listener) is str):
        return None
    host, port = peer
    if type(host) is not str or type(port) is not int:
        return None
    if len(fields) != 3:
        if not fields.keys() <= _CONN_KEYS:
            return None
        if "proxy" in fields and fields["proxy"] is not True:
            return None
        if type(fields.get("data", "")) is not str:
            return None
    return _pack_conn(fd_count, conn_id, peer, listener, fields.get("data"), "proxy" in fields)


def _pack_conn(fd_count: int, conn_id: int, peer: list, listener: str, data: str | None,
               proxy: bool) -> bytes | None:
    """The binary CONN, or None if a field does not fit; `data` None means absent."""
    flags = (_CONN_PROXY if proxy else 0) | (_CONN_DATA if data is not None else 0)
    try:
        host_bytes, listener_bytes = peer[0].encode(), listener.encode()
        head = _CONN_HEAD.pack(fd_count, _CONN_CODE, conn_id, peer[1], flags, len(host_bytes), len(listener_bytes))
        tail = data.encode() if data is not None else b""
    except (UnicodeEncodeError, struct.error):  # lone surrogates, or too long or big
        return None
    message = head + host_bytes + listener_bytes + tail
    if len(message) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return message


def _decode_conn(data: bytes) -> tuple[Message, int]:
    try:
        fd_count, _, conn_id, port, flags, host_len, listener_len = _CONN_HEAD.unpack_from(data)
    except struct.error:
        raise MessageError(f"conn message of {len(data)} bytes is shorter than its header") from None
    if flags & ~(_CONN_PROXY | _CONN_DATA):
        raise MessageError(f"conn message with unknown flags {flags:#x}")
    host_end = _CONN_HEAD_SIZE + host_len
    listener_end = host_end + listener_len
    if len(data) < listener_end or (len(data) != listener_end and not flags & _CONN_DATA):
        raise MessageError(f"conn message of {len(data)} bytes does not match its lengths")
    try:
        fields = {"id": conn_id, "peer": [data[_CONN_HEAD_SIZE:host_end].decode(), port],
                  "listener": data[host_end:listener_end].decode()}
        if flags & _CONN_DATA:
            fields["data"] = data[listener_end:].decode()
    except UnicodeDecodeError as exc:
        raise MessageError(f"undecodable conn message: {exc}") from None
    if flags & _CONN_PROXY:
        fields["proxy"] = True
    return _message(CONN, fields), fd_count


def _encode_report(fields: dict, fd_count: int) -> bytes | None:
    if len(fields) != 3:
        return None
    busy, acked, closed = fields.get("busy"), fields.get("acked"), fields.get("closed")
    if type(busy) is not int or type(acked) is not list or type(closed) is not list:
        return None
    ids = acked + closed
    if len(ids) > REPORT_MAX_IDS or not all(type(conn_id) is int for conn_id in ids):
        return None
    try:
        return (_REPORT_HEAD.pack(fd_count, _REPORT_CODE, busy, len(acked), len(closed))
                + struct.pack(f"<{len(ids)}Q", *ids))
    except struct.error:
        return None


def _decode_report(data: bytes) -> tuple[Message, int]:
    try:
        fd_count, _, busy, acked_count, closed_count = _REPORT_HEAD.unpack_from(data)
    except struct.error:
        raise MessageError(f"report message of {len(data)} bytes is shorter than its header") from None
    count = acked_count + closed_count
    if len(data) != _REPORT_HEAD_SIZE + 8 * count:
        raise MessageError(f"report message of {len(data)} bytes does not carry {count} ids")
    ids = struct.unpack_from(f"<{count}Q", data, _REPORT_HEAD_SIZE)
    return _message(REPORT, {"busy": busy, "acked": list(ids[:acked_count]),
                             "closed": list(ids[acked_count:])}), fd_count


_BINARY_ENCODERS = {CONN: _encode_conn, HEARTBEAT: _encode_heartbeat, REPORT: _encode_report}
_BINARY_DECODERS = {_CONN_CODE: _decode_conn, _HEARTBEAT_CODE: _decode_heartbeat, _REPORT_CODE: _decode_report}
