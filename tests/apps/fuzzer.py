"""Random and mutated channel messages, and an app that sends them from inside a worker.

`messages(seed, count)` yields (bytes, fd kinds) pairs: valid messages of every class
in `ipc.messages.CLASSES` (built from `SAMPLES`, or, for a class added since, from
values its fields' own checks accept), then those mutated: bytes flipped, cut,
extended; the fd count byte and the kind byte changed; JSON fields swapped for values
of other types; and a random number of fds of random kinds attached, whatever the
message announces. Bounded: `count` messages, each under the channel's size limit.

The app (`/?to=master|balancer&seed=N&count=M[&leading=K][&tally=PATH]`; K random
valid REPORTs, to the balancer, or HEARTBEATs, to the master, lead) writes them on its worker's channel to
the master or to the balancer, as untrusted app code can, and answers how many went
out before the peer stopped reading (a receiver that drops the channel ends the run).
"""
from __future__ import annotations

import array
import dataclasses
import gc
import json
import os
import random
import select
import socket
from urllib.parse import parse_qs

from supervisor.ipc import messages as m

SAMPLES = {
    "ready": {"pid": 4242},
    "boot_failed": {"traceback": "Traceback: it broke"},
    "heartbeat": {"requests": 3, "connections": 1, "busy": 0, "oldest_s": None},
    "reopen": {"numbers": (3,)},
    "stop": {"graceful": True, "handback": True},
    "changed": {"topics": ("config", "app:a")},
    "routes": {"routes": {"listeners": {"web": ("a",)}, "proxy": (),
                          "apps": {"a": {"hosts": (), "default": False, "balance": "least-connections"}}},
               "open": ("web",)},
    "metrics": {"apps": {"a": {"baton_x": 1.0}}, "overall": {"baton_y": 2.0}},
    "drain": {},
    "attach": {"key": 4242, "app": "a"},
    "detach": {"key": 4242},
    "upstream": {},
    "takeover": {"pid": 4242},
    "sockets": {"names": ("web", "health")},
    "taken": {"pid": 4242},
    "released": {},
    "conn": {"id": 1, "peer": ("192.0.2.1", 80), "listener": "web", "data": b"GET /", "proxy": False},
    "report": {"busy": 1, "acked": (1, 2), "closed": (3,)},
    "handback": {"peer": ("192.0.2.1", 80), "listener": "web", "data": b"GET /"},
}
# For a field of a class added since: the first of these its check accepts.
_CANDIDATES = (1, "a", (), {}, False, 0.5, None, ("192.0.2.1", 80), "")
_JUNK = (None, True, -1, 2**70, 1.5, float("1e308"), "", "x" * 2000, [], {}, [1, "a"], {"a": 1},
         [[[[]]]], "\u0000", "\ud800")
FD_KINDS = ("pipe", "devnull", "tcp", "udp", "pair", "listening", "eventfd", "directory", "self")


def valid_messages() -> list[m.Message]:
    made = []
    for cls in m.CLASSES:
        values = SAMPLES.get(cls.KIND)
        if values is None:
            values = {}
            for f in dataclasses.fields(cls):
                for candidate in _CANDIDATES:
                    try:
                        f.metadata["check"](candidate)
                    except Exception:   # noqa: BLE001 - not this one
                        continue
                    values[f.name] = candidate
                    break
        try:
            message = cls(**values)
            m.encode(message)
        except Exception:   # noqa: BLE001 - a class we cannot build blind: skipped
            continue
        made.append(message)
    return made


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    how = rng.randrange(8)
    if how == 0 and data:       # flip some bytes
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == 1:              # cut
        del data[rng.randrange(len(data) + 1):]
    elif how == 2:              # extend
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif how == 3 and data:     # another fd count
        data[0] = rng.choice((0, 1, 2, 3, 255))
    elif how == 4 and len(data) > 1:   # another kind: a binary code, or another word
        if rng.random() < 0.5:
            data[1] = rng.randrange(0x20)
        else:
            end = data.find(b"\0", 1)
            if end > 0:
                data[1:end] = rng.choice(sorted(m.KINDS)).encode()
    elif how == 5:              # a field of another type, or one too many, or one missing
        end = data.find(b"\0", 1)
        if end > 0 and data[1] >= 0x20:
            try:
                body = json.loads(data[end + 1:])
            except ValueError:
                body = None
            if isinstance(body, dict):
                choice = rng.randrange(3)
                if choice == 0 and body:
                    body[rng.choice(sorted(body))] = rng.choice(_JUNK)
                elif choice == 1:
                    body["extra"] = rng.choice(_JUNK)
                elif body:
                    del body[rng.choice(sorted(body))]
                data[end + 1:] = json.dumps(body).encode("utf-8", "surrogatepass")
    elif how == 6:              # garbage of any length
        data = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    else:                       # deep nesting, or a huge text
        data = bytearray(b"\0report\0" + (b"[" * 100_000 if rng.random() < 0.5 else b'"' + b"x" * 60_000 + b'"'))
    return bytes(data[:m.MAX_MESSAGE_BYTES])


def _random_valid(rng: random.Random, kind: str) -> m.Message:
    """A valid message of a kind its receiver takes from a worker, with random fields."""
    ids = lambda: tuple(rng.randrange(2**64) if rng.random() < 0.2 else rng.randrange(64)   # noqa: E731
                        for _ in range(rng.randrange(8)))
    if kind == "report":
        return m.Report(busy=rng.randrange(2**32), acked=ids(), closed=ids(),
                        refused=ids() if rng.random() < 0.3 else ())
    return m.Heartbeat(requests=rng.randrange(2**64), connections=rng.randrange(2**32), busy=rng.randrange(2**32),
                       oldest_s=None if rng.random() < 0.5 else rng.random())   # not "stuck": see timeout


def messages(seed: int, count: int, lead: str = "", leading: int = 0):
    """(bytes, fd kinds) pairs: first `leading` valid messages of kind `lead` with
    random fields (what the receiver takes from a worker, so they are all read), then
    the valid messages of every kind, each with the fds it carries (of random kinds),
    then mutations of those."""
    rng = random.Random(seed)
    valid = valid_messages()
    for n in range(count):
        if n < leading:
            yield m.encode(_random_valid(rng, lead)), []
            continue
        message = valid[(n - leading) % len(valid)]
        data = m.encode(message)
        fds = message.fd_count()
        if n - leading >= len(valid):
            data = _mutate(rng, data)
            fds = rng.choice((0, 0, 1, 1, 2, 3, fds))
        yield data, [rng.choice(FD_KINDS) for _ in range(fds)]


def _open(kind: str, channel: socket.socket) -> int:
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "devnull":
        return os.open(os.devnull, os.O_RDONLY)
    if kind == "directory":
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    if kind == "eventfd":
        return os.eventfd(0)
    if kind == "self":
        return os.dup(channel.fileno())
    if kind == "pair":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    sock = socket.socket(type=socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    if kind == "listening":
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
    return sock.detach()


def send_all(channel: socket.socket, seed: int, count: int, tally: int = -1, lead: str = "",
             leading: int = 0) -> int:
    """Send the fuzz on `channel`; how many went out before the receiver stopped reading.
    A byte per message sent goes to `tally` (an fd), if one is given: the receiver may
    kill this process before it can answer."""
    sent = 0
    for data, kinds in messages(seed, count, lead, leading):
        fds = [_open(kind, channel) for kind in kinds]
        try:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            for _ in range(50):
                try:
                    channel.sendmsg([data], ancillary)
                    if tally >= 0:
                        os.write(tally, b".")
                    break
                except BlockingIOError:   # the receiver is behind: let it catch up
                    select.select([], [channel], [], 0.1)
            else:
                return sent
            sent += 1
        except OSError:   # it dropped the channel (EPIPE, ECONNREFUSED), or refused a size
            if not data:
                continue
            return sent
        finally:
            for fd in fds:
                os.close(fd)
    return sent


def _channel(to: str) -> socket.socket:
    from supervisor.worker.process import WorkerSpec
    spec = next(obj for obj in gc.get_objects() if type(obj) is WorkerSpec)
    return spec.channel if to == "master" else spec.balancers[0]


def app(environ, start_response):
    query = {key: values[0] for key, values in parse_qs(environ["QUERY_STRING"]).items()}
    body = b"quiet\n"
    if "to" in query:
        tally = os.open(query["tally"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666) if "tally" in query else -1
        try:
            with socket.socket(fileno=os.dup(_channel(query["to"]).fileno())) as sock:
                sock.setblocking(False)
                sent = send_all(sock, int(query.get("seed", "0")), int(query.get("count", "100")), tally,
                                "report" if query["to"] == "balancer" else "heartbeat", int(query.get("leading", "0")))
        finally:
            if tally >= 0:
                os.close(tally)
        body = f"{sent}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
