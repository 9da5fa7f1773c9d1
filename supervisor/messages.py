"""Channel message encoding and decoding (pure).

Every link between Baton's processes is a SOCK_SEQPACKET socket, so one datagram is
one message. A message is a kind plus a small JSON-able dict of fields, and it may
carry file descriptors; the fd *count* is part of the encoding, so a receiver can
insist on getting exactly the fds the sender announced (see `channel.py`).

Wire form: one byte fd count, then the kind in ASCII, a NUL, then compact JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

# Master <-> worker lifecycle.
READY = "ready"              # worker -> master: app imported, serving
BOOT_FAILED = "boot_failed"  # worker -> master: fields: traceback
HEARTBEAT = "heartbeat"      # worker -> master, from its serving loop: fields: requests,
                             # connections, busy, oldest_s (age of the oldest running request)
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
ACK = "ack"                  # worker -> balancer: fields: id, busy (the worker now owns it)
CLOSED = "closed"            # worker -> balancer: fields: id, busy (connection ended)
HANDBACK = "handback"        # worker -> balancer: fields: peer, listener, data (base64 of bytes
                             # read but not parsed); fds: [connection]. A retiring worker's idle
                             # keep-alive connection, for another worker of the same app.

KINDS = frozenset({TAKEOVER, SOCKETS, TAKEN, RELEASED, UPSTREAM, READY, BOOT_FAILED, HEARTBEAT, STOP, CHANGED, ROUTES, METRICS, DRAIN, ATTACH, DETACH, CONN, ACK, CLOSED, HANDBACK})

MAX_MESSAGE_BYTES = 64 * 1024


class MessageError(ValueError):
    """A peer sent bytes that are not a well-formed message."""


@dataclass(frozen=True)
class Message:
    kind: str
    fields: dict = field(default_factory=dict)

    def __getitem__(self, name):
        return self.fields[name]


def encode(message: Message, fd_count: int = 0) -> bytes:
    if message.kind not in KINDS:
        raise ValueError(f"unknown message kind {message.kind!r}")
    if not 0 <= fd_count <= 255:
        raise ValueError("a message carries at most 255 fds")
    body = json.dumps(message.fields, separators=(",", ":")).encode()
    data = bytes((fd_count,)) + message.kind.encode("ascii") + b"\0" + body
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes) -> tuple[Message, int]:
    """Return the message and the number of fds its sender announced."""
    if len(data) < 2:
        raise MessageError("message too short")
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
    return Message(kind, fields), fd_count
