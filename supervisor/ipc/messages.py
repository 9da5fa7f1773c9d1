"""Channel messages: one frozen class per kind, and their wire forms (pure).

Every link between Baton's processes is a SOCK_SEQPACKET socket, so one datagram is
one message, and it may carry file descriptors. Each kind of message is a class below
(`Ready`, `Heartbeat`, `Conn`, `Report`, `HandBack`, ...): a frozen, slotted dataclass
whose fields state their types and bounds (the checks of `fields.py`), and which says
how many fds travel with it.

Promises:

1. `decode` answers an instance of one of these classes whose every field holds what
   the class says, or raises MessageError naming the kind and the field. A receiver
   dispatches on the class and reads attributes; it never checks a field again. This
   matters because a worker runs untrusted app code that can write anything on its
   channels, and the master may be root.
2. The fds belong to the kind. Byte 0 of a message announces how many it carries, and
   that must be exactly its class's `fd_count()` (one for CONN, HANDBACK, ATTACH, TAKEN
   and UPSTREAM; one per name or number for SOCKETS, ROUTES and REOPEN; none for the
   others); `channel.receive` then insists that exactly that many arrived.
3. `encode` refuses, with ValueError (we broke the protocol, not the peer), a message
   that `decode` would refuse: the text form runs the same checks; the binary forms
   rely on their layout (struct's ranges are the bounds the decoder applies), so the
   hot path pays for no checks of its own. A message never exceeds MAX_MESSAGE_BYTES.
4. The bytes are those of the previous release, so a master or balancer of that release
   still talks to this one across an upgrade (TAKEOVER, SOCKETS, TAKEN, RELEASED,
   HANDBACK cross it).

Wire form: byte 0 is the fd count; byte 1 says which of two forms follows.

* Text form (every kind; byte 1 is the first letter of the kind): the kind in ASCII, a
  NUL, then compact ASCII JSON of the fields in the class's order. An optional field
  (CONN's data and proxy, HANDBACK's app) is left out when it has its default value, as
  the previous release did. Bytes fields travel as base64 text.
* Binary form (byte 1 is a kind code below 0x20), for the kinds sent per connection,
  per serving-loop iteration or per heartbeat. Little-endian, no padding:

    HEARTBEAT    code 4     requests u64, connections u32, busy u32,
                            oldest_s f64 (NaN means None)                26 bytes
    CONN         code 1     id u64, peer port u16, flags u8, host length u8,
                            listener length u8; then the peer host and the listener
                            name (UTF-8); then, if flag 2, the rest of the datagram
                            is `data` (as base64 text). Flag 1: `proxy` is true.
                            Other flags are an error.
    REPORT       code 5     busy u32, acked count u16, closed count u16;
                            then their u64 ids, the acked first   10 + 8 per id bytes
                 code 6     the same with threads u32 after busy (a report that says
                            how many threads the worker has)      14 + 8 per id bytes

    STATS        code 7     in_flight u32, duration_sum_s f64, then the
                            responses and the durations, u64 each (their
                            counts are fixed by STATUS_CLASSES and
                            REQUEST_DURATION_BOUNDS_S)               174 bytes

  Codes 2 and 3 belonged to ACK and CLOSED, one message per connection each, which
  REPORT replaced; they are not reused.

`encode` always takes the binary form for those four kinds, except for a CONN whose
host or listener is longer than its length byte can say (or cannot be encoded as
UTF-8), and a REPORT with `refused` ids (rare: a worker out of fds): they go as text.
`decode` accepts both forms for those kinds and rejects anything else with
MessageError: a short or long binary message, an unknown kind code, lengths that do
not add up, undecodable text.
"""
from __future__ import annotations

import binascii
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, ClassVar

from supervisor.ipc import fields
from supervisor.ipc.fields import FDS_MAX, NAME, NAME_MAX, FieldError, show

MAX_MESSAGE_BYTES = 64 * 1024
# A boot failure's traceback is cut to its last TRACEBACK_MAX characters: JSON may
# escape each as 12 bytes (a surrogate pair), and it must still fit one message.
TRACEBACK_MAX = 5000
_REPORT_HEAD_SIZE = 14   # the larger of REPORT's two layouts
# The most connection ids one REPORT carries; a sender with more sends several.
REPORT_MAX_IDS = (MAX_MESSAGE_BYTES - _REPORT_HEAD_SIZE) // 8
# The most refused ids one REPORT carries: they travel as JSON text (up to 21 bytes each).
REFUSED_MAX = 1024
# A balancer may send a worker this many connections beyond its threads when no worker
# of the app is free (so a saturated worker finds its next connection waiting instead of
# idling through a round trip, and serves several per wakeup: each wakeup costs both
# processes a context switch); a worker therefore reports each time its busy count
# drops below its threads, and below its threads plus this.
PREFETCH = 8


class MessageError(ValueError):
    """A peer sent bytes that are not a well-formed message."""


def _field(check: fields.Check, default: Any = MISSING, dump=None):
    """A message field: `check` turns what JSON gave into the field's value (or raises
    FieldError); `dump` turns the value into JSON (default: as it is). A field with a
    default may be left out of the text form, and is left out when it has that value."""
    return field(default=default, metadata={"check": check, "dump": dump})


def _base64_text(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


class Message:
    """What every message class shares: `KIND` names it on the wire and `FDS` is how
    many fds travel with it (`fd_count()`, for the kinds where that depends on the
    fields). The classes below are frozen, slotted dataclasses; `decode` builds them."""

    __slots__ = ()
    KIND: ClassVar[str]
    FDS: ClassVar[int] = 0

    def fd_count(self) -> int:
        return self.FDS

    def inconsistency(self) -> str | None:
        """Why the fields disagree with one another, if they do (checked on both ends)."""
        return None


# -- master <-> worker: the lifecycle -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready(Message):
    """Worker -> master: the app imported, serving. Watcher -> master: watching."""
    KIND = "ready"
    pid: int = _field(fields.PID)


@dataclass(frozen=True, slots=True)
class BootFailed(Message):
    """Worker -> master: the app could not be imported; the traceback's last lines."""
    KIND = "boot_failed"
    traceback: str = _field(fields.text(TRACEBACK_MAX))


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Worker -> master, from its serving loop (so a stuck loop goes silent): requests
    served, open connections, busy threads, and the age of the oldest running request
    (None when none runs). Balancer -> master too, from its loop: its sign of life
    (requests: connections accepted; the rest zero and None)."""
    KIND = "heartbeat"
    requests: int = _field(fields.unsigned(64))
    connections: int = _field(fields.unsigned(32))
    busy: int = _field(fields.unsigned(32))
    oldest_s: float | None = _field(fields.duration_or_none)


# A request's duration (its head complete to its response done) is counted in the
# first bucket whose bound it does not exceed, else in the last (+Inf): STATS carries
# one count per bucket, not cumulative ones. Statuses are counted by class, 1xx to 5xx.
REQUEST_DURATION_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _counts(length: int) -> fields.Check:
    """Exactly `length` unsigned 64-bit counts, as a tuple."""
    counts = fields.array(fields.unsigned(64), length)

    def check(value):
        checked = counts(value)
        if len(checked) != length:
            raise FieldError(f"expected {length} counts, found {len(checked)}")
        return checked
    return check


def _seconds(value):
    if type(value) is not float and type(value) is not int:
        raise FieldError(f"expected a finite number of seconds >= 0, found {show(value)}")
    return float(fields.figure(value))


@dataclass(frozen=True, slots=True)
class Stats(Message):
    """Worker -> master: the worker's request figures since it started (so a lost one
    costs nothing: the next says it all): requests running now, responses by status
    class (STATUS_CLASSES), and their durations, bucketed (REQUEST_DURATION_BOUNDS_S
    and +Inf) and summed. Sent from the serving loop soon after the figures change (at
    most every `worker.stats.STATS_MIN_INTERVAL_S`), and before the worker exits."""
    KIND = "stats"
    in_flight: int = _field(fields.unsigned(32))
    responses: tuple[int, ...] = _field(_counts(len(STATUS_CLASSES)))
    durations: tuple[int, ...] = _field(_counts(len(REQUEST_DURATION_BOUNDS_S) + 1))
    duration_sum_s: float = _field(_seconds)


@dataclass(frozen=True, slots=True)
class Reopen(Message):
    """Master -> any child: the log files were reopened (logrotate); fds: the new files,
    one per fd number to replace, in the same order."""
    KIND = "reopen"
    numbers: tuple[int, ...] = _field(fields.array(fields.FD_NUMBER, FDS_MAX, unique=True))

    def fd_count(self) -> int:
        return len(self.numbers)


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Master -> worker: stop; `graceful` lets running requests finish, `handback` gives
    idle keep-alive connections to the balancer instead of closing them."""
    KIND = "stop"
    graceful: bool = _field(fields.boolean)
    handback: bool = _field(fields.boolean)


# -- master <-> template (a preloaded app's, see worker.template) ---------------------


@dataclass(frozen=True, slots=True)
class Spawn(Message):
    """Master -> template: fork worker `index`. The fds, in this order: the worker's
    channel to the master, its error pipe, its access pipe (if `access`), its channel
    to each balancer (`balancers` of them, by index), then one listening socket per
    name in `listeners` (share and reuseport modes). `routes` is its host routing
    (`hostcheck.routes_for`), `log_level` the master's at the time of the fork."""
    KIND = "spawn"
    index: int = _field(fields.integer(1, 1 << 16))
    listeners: tuple[str, ...] = _field(fields.array(NAME, FDS_MAX, unique=True))
    balancers: int = _field(fields.integer(0, 64))
    access: bool = _field(fields.boolean)
    log_level: str = _field(NAME)
    routes: Mapping[str, Any] = _field(lambda value: _routing_table(value) if value else {})

    def fd_count(self) -> int:
        return 2 + self.access + self.balancers + len(self.listeners)


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """A worker a template forked -> master, its first words on its own channel: its
    pid (checked by the master: its child, of the app's user)."""
    KIND = "hello"
    pid: int = _field(fields.PID)


# -- an attached worker <-> master (see master.attach_points) ----------------------------

_TAG = re.compile(r"[A-Za-z0-9._:+-]{0,64}")


def TAG(value):
    """An attached worker's version tag: up to 64 of A-Z a-z 0-9 . _ : + - ("" is one)."""
    if type(value) is not str or not _TAG.fullmatch(value):
        raise FieldError(f"expected a tag of up to 64 letters, digits and ._:+-, found {show(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Introduce(Message):
    """A worker started elsewhere -> master, its first words on an attach socket: the
    app it serves ("": the socket's), its pid as it sees it (for the log: the master
    believes SO_PEERCRED), and its version tag."""
    KIND = "introduce"
    app: str = _field(NAME)
    pid: int = _field(fields.PID)
    tag: str = _field(TAG)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Master -> an attached worker: its settings. The fds, in this order: a memfd with
    the worker spec (JSON, as `worker.entry` writes it, without fds), the worker's end of
    its life line (it holds the only other copy: its exit is seen there), its access log
    pipe's write end (if `access`), then its channel to each balancer (`balancers` of
    them). `key` is what the master knows it by."""
    KIND = "welcome"
    balancers: int = _field(fields.integer(0, 64))
    key: int = _field(fields.PID)
    access: bool = _field(fields.boolean)

    def fd_count(self) -> int:
        return 2 + self.access + self.balancers


@dataclass(frozen=True, slots=True)
class Refusal(Message):
    """Master -> a process on an attach socket: why it may not attach (then the end)."""
    KIND = "refusal"
    reason: str = _field(fields.text(1000))


@dataclass(frozen=True, slots=True)
class Standby(Message):
    """Master -> an attached worker: `standby` true, its tag no longer serves (it gets no
    new connections, and hands each kept connection back once idle, at once); false,
    it serves again (parking as configured)."""
    KIND = "standby"
    standby: bool = _field(fields.boolean)


# -- watcher -> master ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Changed(Message):
    """Files changed on disk (debounced). Topics: "config", "app:NAME"."""
    KIND = "changed"
    topics: tuple[str, ...] = _field(fields.array(NAME))


# -- master -> balancer ---------------------------------------------------------------

# The routing table, as `balancer.process.routing_payload` builds it and `build_routes`
# reads it. Only its shape is checked here: host patterns and policy names are checked
# where they are used (`routing.HostTable` and `policies.make_policy` raise ValueError).
_ROUTING_TABLE = fields.record(
    listeners=fields.table(NAME, fields.array(NAME, unique=True)),  # listener -> its apps
    proxy=fields.array(NAME),                                         # listeners with PROXY headers
    apps=fields.table(NAME, fields.record(hosts=fields.array(NAME), default=fields.boolean, balance=NAME)),
)


def _routing_table(value):
    table = _ROUTING_TABLE(value)
    for listener, apps in table["listeners"].items():
        for app in apps:
            if app not in table["apps"]:
                raise FieldError(f"listeners[{show(listener)}] names app {show(app)}, which apps does not describe")
    return table


@dataclass(frozen=True, slots=True)
class Routes(Message):
    """The routing table, with the fds of the listeners the balancer newly serves (one
    per name in `open`, in that order; each names a listener of the table)."""
    KIND = "routes"
    routes: Mapping[str, Any] = _field(_routing_table)
    open: tuple[str, ...] = _field(fields.array(NAME, FDS_MAX, unique=True))

    def fd_count(self) -> int:
        return len(self.open)

    def inconsistency(self) -> str | None:
        unknown = [name for name in self.open if name not in self.routes["listeners"]]
        return f"open names listeners the routes do not: {show(unknown)}" if unknown else None


@dataclass(frozen=True, slots=True)
class Metrics(Message):
    """The master's figures for /metrics: per app (app -> metric -> value) and overall
    (the keys are `balancer.health`'s). Too many apps for one message travel in several:
    each but the last says `more`, and the receiver takes the figures once all came."""
    KIND = "metrics"
    apps: Mapping[str, Mapping[str, float]] = _field(fields.table(NAME, fields.table(NAME, fields.figure)))
    overall: Mapping[str, float] = _field(fields.table(NAME, fields.figure))
    more: bool = _field(fields.boolean, False)


@dataclass(frozen=True, slots=True)
class Drain(Message):
    """A graceful stop began: stop accepting; /healthz answers 503."""
    KIND = "drain"


def _link_key(value):
    if type(value) is int and value == -1:
        return value
    try:
        return fields.PID(value)
    except FieldError:
        raise FieldError(f"expected a worker's pid or -1, found {show(value)}") from None


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """A worker's balancer-side channel end (the fd), once it is READY. Key -1 (with app
    "") is the old master's balancer after an upgrade: it only hands connections over."""
    KIND = "attach"
    FDS = 1
    key: int = _field(_link_key)
    app: str = _field(NAME)


@dataclass(frozen=True, slots=True)
class Reclaim(Message):
    """Master -> balancer, right after a worker's ATTACH: a copy of the worker's own end
    of that channel, and a pidfd of the worker (the two fds, in that order). When the
    pidfd says the worker exited, the balancer reads back from that end the connections
    the worker never read and passes them on; so a worker acknowledges what it took in
    the REPORT it sends anyway, not one the moment it reads a connection."""
    KIND = "reclaim"
    FDS = 2
    key: int = _field(fields.PID)


@dataclass(frozen=True, slots=True)
class Detach(Message):
    """The worker `key` retires or exited: send it no more connections."""
    KIND = "detach"
    key: int = _field(fields.PID)


@dataclass(frozen=True, slots=True)
class Gone(Message):
    """Master -> balancer: the attached worker `key` is gone for the master (silent, or
    it broke the protocol): read back what it never read, and end its link now."""
    KIND = "gone"
    key: int = _field(fields.PID)


@dataclass(frozen=True, slots=True)
class Relink(Message):
    """Master -> worker: balancer `index` (of `[master] balancers`) was replaced; the fd
    is the worker's end of a fresh channel to the new one, which knows nothing of what
    the old one gave (so nothing that was in flight to the old one can reach it)."""
    KIND = "relink"
    FDS = 1
    index: int = _field(fields.integer(0, 63))


@dataclass(frozen=True, slots=True)
class Upstream(Message):
    """Where to send hand-backs once a new master took over (the fd: a channel to its
    balancer)."""
    KIND = "upstream"
    FDS = 1


# -- master upgrade (see handoff.py): old master <-> new master -------------------------


@dataclass(frozen=True, slots=True)
class Takeover(Message):
    """New -> old: hand me your sockets."""
    KIND = "takeover"
    pid: int = _field(fields.PID)


@dataclass(frozen=True, slots=True)
class Sockets(Message):
    """Old -> new: every listening socket, one fd per name (see `handoff.socket_names`)."""
    KIND = "sockets"
    # "reuseport:LISTENER:APP:INDEX" holds two names.
    names: tuple[str, ...] = _field(fields.array(fields.text(2 * NAME_MAX + 32), FDS_MAX, unique=True))

    def fd_count(self) -> int:
        return len(self.names)


@dataclass(frozen=True, slots=True)
class Taken(Message):
    """New -> old: every app is READY; the fd is a channel to the new balancer."""
    KIND = "taken"
    FDS = 1
    pid: int = _field(fields.PID)


@dataclass(frozen=True, slots=True)
class Released(Message):
    """Old -> new: the old master let go and drains."""
    KIND = "released"


# -- balancer <-> worker: connections travel as fds ----------------------------------


@dataclass(frozen=True, slots=True)
class Conn(Message):
    """Balancer -> worker: a connection (the fd), numbered `id` for the worker's REPORT;
    `data`: bytes a previous worker read but did not parse; `proxy`: a PROXY protocol
    header leads the stream. Sent per connection: see `encode_conn`."""
    KIND = "conn"
    FDS = 1
    id: int = _field(fields.unsigned(64))
    peer: tuple[str, int] = _field(fields.peer)
    listener: str = _field(NAME)
    data: bytes = _field(fields.base64_bytes, b"", _base64_text)
    proxy: bool = _field(fields.boolean, False)


@dataclass(frozen=True, slots=True)
class Report(Message):
    """Worker -> balancer: busy threads (counting the connections it acknowledges here,
    which it has not served yet) and `threads`, how many it has (0: not said);
    `acked`, the ids of connections the worker now
    owns (the balancer closes its copies); `closed`, the ids of those that ended;
    `refused`, the ids of connections whose fd never reached the worker (it was at its
    fd limit: the CONN arrived truncated), which the balancer passes on elsewhere. Sent
    per batch of connections received, per serving-loop iteration in which some ended,
    and when a thread frees while the balancer was last told none was; never per
    connection. At most REPORT_MAX_IDS ids in all (REFUSED_MAX refused: a report with
    any travels in the text form, which is rare and so may be slow)."""
    KIND = "report"
    busy: int = _field(fields.unsigned(32))
    acked: tuple[int, ...] = _field(fields.array(fields.unsigned(64), REPORT_MAX_IDS))
    closed: tuple[int, ...] = _field(fields.array(fields.unsigned(64), REPORT_MAX_IDS))
    refused: tuple[int, ...] = _field(fields.array(fields.unsigned(64), REFUSED_MAX), ())
    threads: int = _field(fields.unsigned(32), 0)


@dataclass(frozen=True, slots=True)
class HandBack(Message):
    """Worker -> balancer: a retiring worker's idle keep-alive connection (the fd), with
    the bytes it read but did not parse, for another worker of the same app. Between
    balancers (after an upgrade) `app` names that app; from a worker it is left out.
    `keepalive_s` is set when a worker that goes on serving parks the connection (it sat
    idle past the app's `park_after`): the balancer watches it, passes it on when the
    next request's bytes arrive, and closes it if none come within that many seconds
    (what was left of its keep-alive timeout). Left out otherwise, so the previous
    release's balancers read this kind as they always did.
    A balancer trusts a worker's HANDBACK for little more than `data`: the fd must be
    one it gave that worker (then the peer and listener are those it recorded) or a
    connection the worker accepted itself on a `share` or `reuseport` listener (then
    the peer is the kernel's); the app is always the worker's own (see links.py)."""
    KIND = "handback"
    FDS = 1
    peer: tuple[str, int] = _field(fields.peer)
    listener: str = _field(NAME)
    data: bytes = _field(fields.base64_bytes, dump=_base64_text)
    app: str = _field(NAME, "")
    keepalive_s: float | None = _field(fields.duration_or_none, None)


CLASSES = (Ready, BootFailed, Heartbeat, Stats, Reopen, Stop, Changed, Routes, Metrics, Drain, Attach, Detach,
           Upstream, Takeover, Sockets, Taken, Released, Conn, Report, HandBack, Relink, Reclaim, Spawn, Hello,
           Introduce, Welcome, Refusal, Standby, Gone)
KINDS = frozenset(cls.KIND for cls in CLASSES)

# Per class, its fields in wire order: (name, check, dump, default or MISSING).
_SCHEMAS = {cls: tuple((f.name, f.metadata["check"], f.metadata["dump"], f.default)
                       for f in dataclass_fields(cls)) for cls in CLASSES}
_NAMES = {cls: frozenset(name for name, *_ in schema) for cls, schema in _SCHEMAS.items()}
_BY_KIND = {cls.KIND.encode("ascii"): cls for cls in CLASSES}


def encode(message: Message) -> bytes:
    """The bytes of `message`, its fd count included: binary for CONN, HEARTBEAT and
    REPORT, text for the others. ValueError if it must not be sent (see promise 3)."""
    binary = _BINARY_ENCODERS.get(message.__class__)
    if binary is not None:
        return binary(message)
    return encode_text(message)


def decode(data: bytes) -> Message:
    """The message in `data`; MessageError if it is not a well-formed one, or if the fd
    count it announces is not its kind's (the caller checks that many arrived)."""
    if len(data) < 2:
        raise MessageError("message too short")
    code = data[1]
    if code >= _FIRST_TEXT_BYTE:
        return _decode_text(data)
    binary = _BINARY_DECODERS.get(code)
    if binary is None:
        raise MessageError(f"unknown message kind code {code}")
    return binary(data)


# -- text form -------------------------------------------------------------------------

_FIRST_TEXT_BYTE = 0x20  # kinds are lowercase words; binary kind codes sit below this


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# json.loads would take NaN and Infinity, which are not JSON, as floats.
_parse_json = json.JSONDecoder(parse_constant=_refuse_constant).decode


def encode_text(message: Message) -> bytes:
    """The text form of any message (the hot kinds too: `encode` prefers their binary
    form, a receiver accepts either)."""
    cls = message.__class__
    schema = _SCHEMAS.get(cls)
    if schema is None:
        raise TypeError(f"not a message: {message!r}")
    body = {}
    for name, check, dump, default in schema:
        value = getattr(message, name)
        if default is not MISSING and value == default:
            continue
        wire = dump(value) if dump is not None else value
        try:
            check(wire)
        except FieldError as exc:
            raise ValueError(f"cannot send this {cls.KIND} message: {name}: {exc}") from None
        body[name] = wire
    problem = message.inconsistency()
    if problem:
        raise ValueError(f"cannot send this {cls.KIND} message: {problem}")
    fd_count = message.fd_count()
    if fd_count > FDS_MAX:
        raise ValueError(f"a message carries at most {FDS_MAX} fds, not {fd_count}")
    data = (bytes((fd_count,)) + cls.KIND.encode("ascii") + b"\0"
            + json.dumps(body, separators=(",", ":"), allow_nan=False).encode("ascii"))
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{cls.KIND} message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def _decode_text(data: bytes) -> Message:
    kind_end = data.find(b"\0", 1)
    if kind_end < 0:
        raise MessageError("message kind is not terminated")
    cls = _BY_KIND.get(bytes(data[1:kind_end]))
    if cls is None:
        raise MessageError(f"unknown message kind {show(bytes(data[1:kind_end]))}")
    kind = cls.KIND
    try:
        body = _parse_json(data[kind_end + 1:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        raise MessageError(f"{kind} message: undecodable fields: {exc}") from None
    if type(body) is not dict:
        raise MessageError(f"{kind} message: its fields are not a JSON object")
    unknown = body.keys() - _NAMES[cls]
    if unknown:
        raise MessageError(f"{kind} message: unknown field {', '.join(sorted(map(show, unknown)))}")
    values = {}
    for name, check, _, default in _SCHEMAS[cls]:
        if name in body:
            try:
                values[name] = check(body[name])
            except FieldError as exc:
                raise MessageError(f"{kind} message: {name}: {exc}") from None
        elif default is MISSING:
            raise MessageError(f"{kind} message: {name} is missing")
    message = cls(**values)
    problem = message.inconsistency()
    if problem:
        raise MessageError(f"{kind} message: {problem}")
    if data[0] != message.fd_count():
        raise MessageError(f"{kind} message announces {data[0]} fds; it carries {message.fd_count()}")
    return message


# -- binary form ----------------------------------------------------------------------
# The decoders build their message through its slots: that skips the dataclass's
# generated __init__ and its object.__setattr__ per field (a frozen class's way in),
# about a third of the cost, paid on every message received.

_CONN_CODE, _HEARTBEAT_CODE, _REPORT_CODE, _REPORT_THREADS_CODE, _STATS_CODE = 1, 4, 5, 6, 7

_HEARTBEAT = struct.Struct("<BBQIId")      # fd count, code, requests, connections, busy, oldest_s
_CONN_HEAD = struct.Struct("<BBQHBBB")     # fd count, code, id, port, flags, host len, listener len
_CONN_PROXY, _CONN_DATA = 1, 2
assert _CONN_HEAD.size == 15
_REPORT_HEAD = struct.Struct("<BBIHH")     # fd count, code, busy, acked count, closed count
_REPORT_THREADS_HEAD = struct.Struct("<BBIIHH")   # fd count, code, busy, threads, acked count, closed count
assert _REPORT_THREADS_HEAD.size == _REPORT_HEAD_SIZE
_NAN, _INF = float("nan"), float("inf")    # a heartbeat's oldest_s of None is NaN
_a2b_base64, _b2a_base64 = binascii.a2b_base64, binascii.b2a_base64
_new_object = object.__new__


def _setters(cls: type, *names: str):
    return tuple(cls.__dict__[name].__set__ for name in names)


_set_heartbeat = _setters(Heartbeat, "requests", "connections", "busy", "oldest_s")
_set_conn_id, _set_conn_peer, _set_conn_listener, _set_conn_data, _set_conn_proxy = _setters(
    Conn, "id", "peer", "listener", "data", "proxy")
_set_report = _setters(Report, "busy", "acked", "closed", "refused", "threads")
_unpack_conn_head = _CONN_HEAD.unpack_from


def _encode_heartbeat(message: Heartbeat) -> bytes:
    oldest_s = message.oldest_s
    if oldest_s is None:
        oldest_s = _NAN
    elif not 0.0 <= oldest_s < _INF:
        raise ValueError(f"cannot send this heartbeat message: oldest_s is {oldest_s!r}")
    try:
        return _HEARTBEAT.pack(0, _HEARTBEAT_CODE, message.requests, message.connections, message.busy, oldest_s)
    except struct.error as exc:
        raise ValueError(f"cannot send this heartbeat message: {exc}") from None


def _decode_heartbeat(data: bytes) -> Heartbeat:
    try:
        fd_count, _, requests, connections, busy, oldest_s = _HEARTBEAT.unpack(data)
    except struct.error:
        raise MessageError(f"heartbeat message of {len(data)} bytes, not {_HEARTBEAT.size}") from None
    if fd_count:
        raise MessageError(f"heartbeat message announces {fd_count} fds; it carries none")
    if oldest_s != oldest_s:  # noqa: PLR0124 -- only NaN differs from itself (cheaper than isnan)
        oldest_s = None
    elif not 0.0 <= oldest_s < _INF:
        raise MessageError(f"heartbeat message: oldest_s: expected a finite number of seconds >= 0,"
                           f" found {oldest_s!r}")
    message = _new_object(Heartbeat)
    set_requests, set_connections, set_busy, set_oldest = _set_heartbeat
    set_requests(message, requests)
    set_connections(message, connections)
    set_busy(message, busy)
    set_oldest(message, oldest_s)
    return message


def encode_conn(conn_id: int, peer, listener: str, data: bytes = b"", proxy: bool = False) -> bytes:
    """`encode(Conn(conn_id, peer, listener, data, proxy))` without building the Conn:
    the balancer sends one per connection. `peer` is (host, port), a list will do."""
    try:
        host, listener_bytes = peer[0].encode(), listener.encode()
        if len(host) <= 255 and len(listener_bytes) <= 255:
            head = _CONN_HEAD.pack(1, _CONN_CODE, conn_id, peer[1],
                                   (_CONN_PROXY if proxy else 0) | (_CONN_DATA if data else 0),
                                   len(host), len(listener_bytes))
            message = head + host + listener_bytes
            if data:
                message += _b2a_base64(data, newline=False)
            if len(message) > MAX_MESSAGE_BYTES:
                raise ValueError(f"conn message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
            return message
    except (UnicodeEncodeError, struct.error):  # lone surrogates; a number out of range
        pass
    # The text form says what did not fit, or carries what the layout cannot.
    return encode_text(Conn(conn_id, tuple(peer), listener, data, proxy))


def _encode_conn(message: Conn) -> bytes:
    return encode_conn(message.id, message.peer, message.listener, message.data, message.proxy)


def _decode_conn(data: bytes) -> Conn:
    # The layout's sizes and flags are literals here (15: _CONN_HEAD.size; flag 1
    # _CONN_PROXY, flag 2 _CONN_DATA): each global looked up costs a few percent of a
    # decode, paid per connection.
    try:
        fd_count, _, conn_id, port, flags, host_len, listener_len = _unpack_conn_head(data)
    except struct.error:
        raise MessageError(f"conn message of {len(data)} bytes is shorter than its header") from None
    if fd_count != 1:
        raise MessageError(f"conn message announces {fd_count} fds; it carries 1")
    if flags & 0xFC:
        raise MessageError(f"conn message with unknown flags {flags:#x}")
    host_end = 15 + host_len
    listener_end = host_end + listener_len
    size = len(data)
    if size != listener_end and (size < listener_end or not flags & 2):
        raise MessageError(f"conn message of {size} bytes does not match its lengths")
    try:
        host = data[15:host_end].decode()
        listener = data[host_end:listener_end].decode()
    except UnicodeDecodeError as exc:
        raise MessageError(f"undecodable conn message: {exc}") from None
    message = _new_object(Conn)
    _set_conn_id(message, conn_id)
    _set_conn_peer(message, (host, port))
    _set_conn_listener(message, listener)
    if flags & 2:
        try:
            _set_conn_data(message, _a2b_base64(data[listener_end:], strict_mode=True))
        except binascii.Error:
            raise MessageError("conn message: data: expected base64 text") from None
    else:
        _set_conn_data(message, b"")
    _set_conn_proxy(message, flags & 1 == 1)
    return message


def _encode_report(message: Report) -> bytes:
    if message.refused:   # the binary layout has no room for them
        return encode_text(message)
    acked, closed = message.acked, message.closed
    count = len(acked) + len(closed)
    if count > REPORT_MAX_IDS:
        raise ValueError(f"cannot send this report message: {count} ids, at most {REPORT_MAX_IDS}")
    try:
        if message.threads:
            head = _REPORT_THREADS_HEAD.pack(0, _REPORT_THREADS_CODE, message.busy, message.threads,
                                             len(acked), len(closed))
        else:
            head = _REPORT_HEAD.pack(0, _REPORT_CODE, message.busy, len(acked), len(closed))
        return head + struct.pack(f"<{count}Q", *acked, *closed)
    except struct.error as exc:
        raise ValueError(f"cannot send this report message: {exc}") from None


def _decode_report(data: bytes) -> Report:
    try:
        if data[1] == _REPORT_THREADS_CODE:
            head = _REPORT_THREADS_HEAD
            fd_count, _, busy, threads, acked_count, closed_count = head.unpack_from(data)
        else:
            head, threads = _REPORT_HEAD, 0
            fd_count, _, busy, acked_count, closed_count = head.unpack_from(data)
    except struct.error:
        raise MessageError(f"report message of {len(data)} bytes is shorter than its header") from None
    if fd_count:
        raise MessageError(f"report message announces {fd_count} fds; it carries none")
    count = acked_count + closed_count
    if count > REPORT_MAX_IDS or len(data) != head.size + 8 * count:
        raise MessageError(f"report message of {len(data)} bytes does not carry {count} ids")
    ids = struct.unpack_from(f"<{count}Q", data, head.size)
    message = _new_object(Report)
    set_busy, set_acked, set_closed, set_refused, set_threads = _set_report
    set_busy(message, busy)
    set_acked(message, ids[:acked_count])
    set_closed(message, ids[acked_count:])
    set_refused(message, ())
    set_threads(message, threads)
    return message


_STATS = struct.Struct(f"<BBId{len(STATUS_CLASSES) + len(REQUEST_DURATION_BOUNDS_S) + 1}Q")
assert _STATS.size == 174
_set_stats = _setters(Stats, "in_flight", "responses", "durations", "duration_sum_s")


def _encode_stats(message: Stats) -> bytes:
    responses, durations, sum_s = message.responses, message.durations, message.duration_sum_s
    if len(responses) != len(STATUS_CLASSES) or len(durations) != len(REQUEST_DURATION_BOUNDS_S) + 1:
        raise ValueError("cannot send this stats message: wrong number of counts")
    if not 0.0 <= sum_s < _INF:
        raise ValueError(f"cannot send this stats message: duration_sum_s is {sum_s!r}")
    try:
        return _STATS.pack(0, _STATS_CODE, message.in_flight, sum_s, *responses, *durations)
    except struct.error as exc:
        raise ValueError(f"cannot send this stats message: {exc}") from None


def _decode_stats(data: bytes) -> Stats:
    try:
        fd_count, _, in_flight, sum_s, *counts = _STATS.unpack(data)
    except struct.error:
        raise MessageError(f"stats message of {len(data)} bytes, not {_STATS.size}") from None
    if fd_count:
        raise MessageError(f"stats message announces {fd_count} fds; it carries none")
    if not 0.0 <= sum_s < _INF:   # NaN fails too
        raise MessageError(f"stats message: duration_sum_s: expected a finite number >= 0, found {sum_s!r}")
    message = _new_object(Stats)
    set_in_flight, set_responses, set_durations, set_sum = _set_stats
    set_in_flight(message, in_flight)
    set_responses(message, tuple(counts[:len(STATUS_CLASSES)]))
    set_durations(message, tuple(counts[len(STATUS_CLASSES):]))
    set_sum(message, sum_s)
    return message


_BINARY_ENCODERS = {Conn: _encode_conn, Heartbeat: _encode_heartbeat, Report: _encode_report, Stats: _encode_stats}
_BINARY_DECODERS = {_CONN_CODE: _decode_conn, _HEARTBEAT_CODE: _decode_heartbeat, _REPORT_CODE: _decode_report,
                    _REPORT_THREADS_CODE: _decode_report, _STATS_CODE: _decode_stats}
