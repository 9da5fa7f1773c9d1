"""The control socket: how `baton ctl` talks to a running master.

Wire protocol: a UNIX stream socket; the client sends one JSON object on one line
(`{"command": "scale", "app": "blog", "workers": 4}` + "\\n"), the server answers with one
JSON object on one line and closes. An answer is `{"ok": true, ...}` or
`{"ok": false, "errors": ["...", ...]}`.

Promises:

- The master never blocks on a client. `ControlServer` does only non-blocking I/O, on
  the process's one event loop (`supervisor.system.loop`): it registers its listening
  socket and every client socket there itself, and gives each client a loop timer at
  its deadline, so the master has nothing to fold into its wait. A client has
  `CLIENT_TIMEOUT_S` to send its line and take the answer, and at most
  `MAX_REQUEST_BYTES` to say it in.
- Who may ask is decided by the kernel's `SO_PEERCRED`, never by anything the client
  says: root, the master's own user, the users named in `admins` and the members of
  the groups named there as "@group". Anyone else is answered "permission denied" and
  logged; their bytes are read (bounded) but never parsed.
- No other user can keep root out (with `admins` the socket is 0666, so anyone can
  connect and say nothing): root and the master's own user may use every one of the
  `MAX_CLIENTS` slots; any other uid at most `MAX_CLIENTS_PER_USER` at once, and only
  the slots not kept back for those two (`RESERVED_CLIENTS`). A connection over its
  limit is answered "busy: ..." and closed at accept; the refusals of one uid are
  logged once per `REFUSAL_LOG_INTERVAL_S`, with a count of those left unsaid.
- `parse_request` is the one judge of a request's shape; `handle(command, args)` (the
  master's `command` method, the same one its signal handlers lead to) only ever sees
  a known command with arguments of the right types. `check_arguments` is its
  judgement of one command's arguments, for the master to apply the same rules (and
  messages) to commands that come from signals.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from supervisor.config.model import MAX_WORKERS
from supervisor.ipc import messages
from supervisor.ipc.fields import FieldError
from supervisor.system import users
from supervisor.system.loop import WRITE, Loop, Timer

MAX_REQUEST_BYTES = 64 * 1024      # one request line, newline excluded
CLIENT_TIMEOUT_S = 5.0             # from accept to the last byte of the answer
MAX_CLIENTS = 32                   # connections at once; beyond this, a new one is refused at accept
RESERVED_CLIENTS = 8               # of those, kept for root and the master's own user
MAX_CLIENTS_PER_USER = 4           # at once, for any other one uid (admins too: `baton ctl` needs one)
REFUSAL_LOG_INTERVAL_S = 60.0      # one uid's refused connections are logged once per this
ACCEPT_BATCH = 16                  # accepts per readiness event; epoll is level-triggered
DEFAULT_CALL_TIMEOUT_S = 30.0      # the client's patience
PRIVATE_MODE = 0o600               # only the master's user (and root) may connect
SHARED_MODE = 0o666                # with admins: anyone may connect, SO_PEERCRED decides
PERMISSION_DENIED = "permission denied"

# The default of an argument that has none: a spec is {argument: (checker, default or REQUIRED)}.
REQUIRED = object()


def _app_name(value: Any) -> str:
    if isinstance(value, str) and value and "\0" not in value:
        return value
    raise ValueError("an app name")


def _workers(value: Any) -> int:
    """The bound an app's `workers` has in the config: `scale` cannot fork past it either."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f"an integer from 1 to {MAX_WORKERS}")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("true or false")


def _tag(value: Any) -> str:
    try:
        return messages.TAG(value)
    except FieldError:
        raise ValueError("a tag of up to 64 letters, digits and ._:+-") from None


COMMANDS: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "status": {},
    "stats": {},
    "reload": {},
    "restart": {"app": (_app_name, REQUIRED)},
    "scale": {"app": (_app_name, REQUIRED), "workers": (_workers, REQUIRED)},
    "stop": {"now": (_flag, False)},
    "upgrade": {},
    "promote": {"app": (_app_name, REQUIRED), "tag": (_tag, REQUIRED)},
}


class ControlError(Exception):
    """A request broke the protocol (the peer's fault); `errors` holds one line per problem."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


class ControlUnreachable(Exception):
    """The client got no valid answer: no socket, refused, timed out or garbled.
    The message says what to check."""


# -- the protocol (pure) --------------------------------------------------------


def parse_request(obj: Any) -> tuple[str, dict]:
    """Judge one decoded request: return (command, args) with every optional argument
    filled in, or raise ControlError listing every problem."""
    if not isinstance(obj, dict):
        raise ControlError(f"expected a JSON object, found {_describe(obj)}")
    if "command" not in obj:
        raise ControlError(f"expected a 'command' ({_choices()}), found nothing")
    command = obj["command"]
    if not isinstance(command, str) or command not in COMMANDS:
        raise ControlError(f"expected 'command' to be one of {_choices()}, found {_describe(command)}")
    args = {name: value for name, value in obj.items() if name != "command"}
    return command, check_arguments(command, COMMANDS[command], args)


def check_arguments(command: str, spec: dict[str, tuple[Callable[[Any], Any], Any]], args: dict) -> dict:
    """Judge `args` (without "command") against `spec`, one command's entry of the
    `COMMANDS` shape ({argument: (checker, default or REQUIRED)}): return what the
    checkers made of them, with every absent optional argument set to its default, or
    raise ControlError listing every problem (missing, mistyped, unknown), each line
    starting with `command`. A checker raises ValueError("what it expects")."""
    errors = []
    checked = {}
    for name, (check, default) in spec.items():
        if name not in args:
            if default is REQUIRED:
                errors.append(f"{command}: expected '{name}', found nothing (it is required)")
            else:
                checked[name] = default
            continue
        value = args[name]
        try:
            checked[name] = check(value)
        except ValueError as exc:
            errors.append(f"{command}: '{name}': expected {exc}, found {_describe(value)}")
    for name in args:
        if name not in spec:
            takes = ", ".join(repr(n) for n in spec) or "no arguments"
            errors.append(f"{command}: unknown argument {name!r} (it takes {takes})")
    if errors:
        raise ControlError(errors)
    return checked


def decode_request(line: bytes) -> tuple[str, dict]:
    """One request line (without its newline) -> parse_request of its JSON."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ControlError("expected UTF-8 text") from None
    except ValueError as exc:
        raise ControlError(f"expected one JSON object on one line: {exc}") from None
    return parse_request(obj)


def encode(obj: dict) -> bytes:
    """One message on the wire: compact JSON (which never holds a raw newline) + "\\n"."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def error(*errors: str) -> dict:
    return {"ok": False, "errors": list(errors)}


def _choices() -> str:
    return ", ".join(repr(name) for name in COMMANDS)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        text = repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
        return f"string {text}" if value else "an empty string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- who may ask ------------------------------------------------------------------


def peer_allowed(uid: int, gid: int, admins: tuple[str, ...], *, master_uid: int) -> bool:
    """Root, the master's own user, a user named in `admins`, or a member of a group
    named there as "@group": the peer's gid from SO_PEERCRED, or any group the group
    database gives its user (primary or supplementary, `os.getgrouplist`). Entries are
    names or numeric ids (`system.users`' rule) looked up on each call, so a user added
    to a group since the master started counts; entries that no longer resolve are
    skipped."""
    if uid in (0, master_uid):
        return True
    user = users.user(uid)
    groups: set[int] | None = None
    for entry in admins:
        if entry.startswith("@"):
            wanted = users.group(entry[1:])
            if wanted is None:
                continue
            if groups is None:
                groups = {gid}
                if user is not None:
                    groups.update(os.getgrouplist(user.pw_name, user.pw_gid))
            if wanted.gr_gid in groups:
                return True
        else:
            allowed = users.user(entry)
            if allowed is not None and allowed.pw_uid == uid:
                return True
    return False


def admission(uid: int, held: int, total: int, *, master_uid: int) -> str | None:
    """None if a new connection from `uid` may be served, else why not (said to the
    client and logged). `held` is how many of the `total` open connections are that
    uid's. Root and `master_uid` may use every slot; any other uid at most
    MAX_CLIENTS_PER_USER at once and none of the RESERVED_CLIENTS, so however many
    silent connections other users hold, root's `baton ctl` is answered."""
    if total >= MAX_CLIENTS:
        return f"{MAX_CLIENTS} control connections are open already"
    if uid in (0, master_uid):
        return None
    if held >= MAX_CLIENTS_PER_USER:
        return (f"uid {uid} holds {held} control connections already "
                f"(at most {MAX_CLIENTS_PER_USER} at once)")
    shared = MAX_CLIENTS - RESERVED_CLIENTS
    if total >= shared:
        return (f"the {shared} control connections other users may hold are open already "
                f"({RESERVED_CLIENTS} more are kept for root and the master's user)")
    return None


def _describe_peer(uid: int, pid: int) -> str:
    user = users.user(uid)
    return f"uid {uid} ({user.pw_name if user else '?'}), pid {pid}"


# -- the server ---------------------------------------------------------------------


@dataclass
class _Client:
    sock: socket.socket
    pid: int
    uid: int
    allowed: bool
    timer: Timer | None = None        # its deadline on the loop; cancelled when it is dropped
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray | None = None   # None while reading the request

    def describe(self) -> str:
        return _describe_peer(self.uid, self.pid)


@dataclass
class _Refusals:
    """One uid's refused connections: when the last was logged, how many since were not."""
    logged_at: float
    unsaid: int = 0


class ControlServer:
    """The master's end of the control socket, on the process's event loop.

    Contract:
      - The server registers its listening socket, and each client it accepts, on
        `loop` itself; the master registers nothing and calls nothing per iteration.
        Its handlers accept, read, answer and write, never blocking, and call
        `handle(command, args) -> dict` synchronously for each authorised, well-formed
        request. `handle` must return quickly (start long work, report it later in
        `status`) and must not call `close()`.
      - Time is the loop's: a client accepted on the iteration whose `loop.now` is `t`
        gets a `loop.call_at(t + timeout_s)` timer. A client that has not sent its line
        and taken its answer by then is dropped (one still reading is told why).
        Dropping a client, for whatever reason, cancels its timer, so the loop keeps
        no deadline of a client that is gone.
      - A connection `admission` refuses is answered "busy: ..." with one non-blocking
        send and closed at accept: it never holds a slot or a timer. Its uid's
        refusals are logged once per REFUSAL_LOG_INTERVAL_S of loop time.
      - `close()` at exit, before the loop's own `close()`: pending answers get one
        last non-blocking send, the socket file is unlinked, and every fd the server
        registered on the loop is unregistered and closed. Closing twice is harmless.

    The socket file is created with mode 0600 (under umask 0177, so it is never wider,
    even for an instant), then widened to 0666 when `admins` is not empty: other users
    must be able to connect(), and SO_PEERCRED decides. `admins` may be replaced while
    the server runs (on reload); it is read on every connection. A stale socket file is
    replaced; a live one (another master answers) or any other kind of file is an error.
    """

    def __init__(self, path: str, *, admins: tuple[str, ...], handle: Callable[[str, dict], dict],
                 log: logging.Logger, loop: Loop, timeout_s: float = CLIENT_TIMEOUT_S):
        self.path = os.path.abspath(path)
        self.admins = tuple(admins)     # may be replaced on reload; read on every connection
        self.handle = handle
        self.log = log
        self.loop = loop
        self.timeout_s = timeout_s
        self._master_uid = os.geteuid()
        self._clients: dict[int, _Client] = {}
        self._refusals: dict[int, _Refusals] = {}   # by uid, those logged within the interval
        self._handling: _Client | None = None
        self._closed = False
        self._listener = self._bind()
        try:
            loop.register(self._listener, self._accept)
        except BaseException:
            self._listener.close()
            self._unlink()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in list(self._clients.values()):
            if client is self._handling:
                continue   # _answer() finishes it once handle() returns
            if client.outbox:
                self._try_send_once(client.sock, bytes(client.outbox))
            self._drop(client)
        self.loop.unregister(self._listener)
        self._listener.close()
        self._unlink()

    def _unlink(self) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- binding ------------------------------------------------------------

    def _bind(self) -> socket.socket:
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o177)   # the master is single-threaded: no one else sees this umask
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, SHARED_MODE if self.admins else PRIVATE_MODE)
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind the control socket {self.path}: {exc.strerror or exc}") from None
        return sock

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"cannot inspect {self.path}: {exc.strerror or exc}") from None
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it "
                               "(remove it, or set [master] control_socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            status = probe.connect_ex(self.path)
        finally:
            probe.close()
        if status in (0, errno.EAGAIN):
            raise ControlError(f"another master answers on the control socket {self.path}")
        os.unlink(self.path)   # ECONNREFUSED: nobody listens; a leftover from a master that died

    # -- clients ------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # e.g. EMFILE: keep serving; the connection stays queued
                self.log.error("control socket: accept failed: %s", exc)
                return
            sock.setblocking(False)
            try:
                pid, uid, gid = users.peer_credentials(sock)
            except OSError as exc:
                self.log.error("control socket: cannot read the peer's credentials: %s", exc)
                sock.close()
                continue
            held = sum(1 for client in self._clients.values() if client.uid == uid)
            refusal = admission(uid, held, len(self._clients), master_uid=self._master_uid)
            if refusal is not None:
                self._refuse(sock, uid, pid, refusal)
                continue
            allowed = peer_allowed(uid, gid, self.admins, master_uid=self._master_uid)
            client = _Client(sock, pid, uid, allowed)
            self._clients[sock.fileno()] = client
            self.loop.register(sock, partial(self._read, client))
            client.timer = self.loop.call_at(self.loop.now + self.timeout_s, partial(self._expire, client))

    def _refuse(self, sock: socket.socket, uid: int, pid: int, reason: str) -> None:
        self._try_send_once(sock, encode(error(f"busy: {reason}")))
        sock.close()
        now = self.loop.now
        last = self._refusals.get(uid)
        if last is not None and now - last.logged_at < REFUSAL_LOG_INTERVAL_S:
            last.unsaid += 1
            return
        for stale in [u for u, r in self._refusals.items() if now - r.logged_at >= REFUSAL_LOG_INTERVAL_S]:
            del self._refusals[stale]
        self._refusals[uid] = _Refusals(now)
        unsaid = last.unsaid if last is not None else 0
        since = f" ({unsaid} more refused since the last message)" if unsaid else ""
        self.log.warning("control socket: refused a connection from %s: %s%s; this uid's refusals are "
                         "logged once per %gs", _describe_peer(uid, pid), reason, since, REFUSAL_LOG_INTERVAL_S)

    def _expire(self, client: _Client) -> None:
        """The client's deadline passed: drop it; one still reading is told why."""
        if client.outbox is None:
            self.log.warning("control socket: dropped %s: no complete request within %gs",
                             client.describe(), self.timeout_s)
            self._try_send_once(client.sock, encode(error(f"timed out after {self.timeout_s:g}s "
                                                          "waiting for the request line")))
        else:
            self.log.warning("control socket: dropped %s: it did not take its answer within %gs",
                             client.describe(), self.timeout_s)
        self._drop(client)

    def _read(self, client: _Client) -> None:
        while True:
            try:
                chunk = client.sock.recv(MAX_REQUEST_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(client)
                return
            if not chunk:
                self.log.debug("control socket: %s closed without a request", client.describe())
                self._drop(client)
                return
            client.inbox += chunk
            end = client.inbox.find(b"\n")
            if end >= 0 and end <= MAX_REQUEST_BYTES:
                self._answer(client, bytes(client.inbox[:end]))
                return
            if len(client.inbox) > MAX_REQUEST_BYTES:
                self.log.warning("control socket: refused a request over %d bytes from %s",
                                 MAX_REQUEST_BYTES, client.describe())
                self._reply(client, error(f"request longer than {MAX_REQUEST_BYTES} bytes"))
                return

    def _answer(self, client: _Client, line: bytes) -> None:
        if not client.allowed:
            self.log.warning("control socket: permission denied to %s: not root, not the master's user "
                             "and not in [master] admins", client.describe())
            self._reply(client, error(PERMISSION_DENIED))
            return
        try:
            command, args = decode_request(line)
        except ControlError as exc:
            self._reply(client, error(*exc.errors))
            return
        level = logging.DEBUG if command in ("status", "stats") else logging.INFO
        self.log.log(level, "control socket: %s %s from %s", command, json.dumps(args), client.describe())
        self._handling = client
        try:
            response = self.handle(command, args)
            data = encode(response) if _is_response(response) else None
            if data is None:
                self.log.error("control socket: %s returned %r, not a response", command, response)
        except Exception as exc:
            self.log.exception("control socket: %s failed", command)
            data = encode(error(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self._handling = None
        if data is None:
            data = encode(error(f"internal error: {command} returned no valid response"))
        if self._closed:   # handle() closed us (it should not): one last try, then let go
            self._try_send_once(client.sock, data)
            self._drop(client)
            return
        self._start_writing(client, data)

    def _reply(self, client: _Client, response: dict) -> None:
        self._start_writing(client, encode(response))

    def _start_writing(self, client: _Client, data: bytes) -> None:
        client.outbox = bytearray(data)
        self.loop.modify(client.sock, WRITE, partial(self._flush, client))
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        while client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except (BlockingIOError, InterruptedError):
                return   # the loop calls again when the socket is writable
            except OSError:
                break    # the client went away; nothing to do
            del client.outbox[:sent]
        self._drop(client)

    def _drop(self, client: _Client) -> None:
        """Forget the client: its timer, its registration, its socket."""
        self._clients.pop(client.sock.fileno(), None)
        if client.timer is not None:
            client.timer.cancel()
        self.loop.unregister(client.sock)
        client.sock.close()

    @staticmethod
    def _try_send_once(sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)
        except OSError:
            pass


def _is_response(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("ok"), bool)


# -- the client ---------------------------------------------------------------------


class ControlClient:
    """`baton ctl`'s end: one blocking request, one answer, within `timeout_s`."""

    def __init__(self, path: str, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S):
        self.path = path
        self.timeout_s = timeout_s

    def call(self, command: str, **args: Any) -> dict:
        """Send `command` with `args`; return the master's answer, `ok` true or false.
        Raise ControlUnreachable when there is no valid answer."""
        request = encode({"command": command, **args})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(self.timeout_s)
            self._connect(sock)
            try:
                sock.sendall(request)
            except BrokenPipeError:
                pass   # the master answered early (a refusal) and closed: its answer is waiting
            except TimeoutError:
                raise ControlUnreachable(self._no_answer()) from None
            except OSError as exc:
                raise ControlUnreachable(f"cannot talk to the master on {self.path}: {exc.strerror or exc}") from None
            return self._receive(sock)

    def _connect(self, sock: socket.socket) -> None:
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            raise ControlUnreachable(f"is the master running? no control socket at {self.path}") from None
        except ConnectionRefusedError:
            raise ControlUnreachable(f"is the master running? nothing answers on {self.path} "
                                     "(a control socket left behind)") from None
        except PermissionError:
            raise ControlUnreachable(f"permission denied connecting to {self.path}: run as root, as the "
                                     "master's user, or as a user listed in [master] admins") from None
        except TimeoutError:
            raise ControlUnreachable(self._no_answer()) from None
        except OSError as exc:
            raise ControlUnreachable(f"cannot connect to {self.path}: {exc.strerror or exc}") from None

    def _receive(self, sock: socket.socket) -> dict:
        data = bytearray()
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlUnreachable(self._no_answer())
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise ControlUnreachable(self._no_answer()) from None
            except OSError as exc:
                if data and exc.errno == errno.ECONNRESET:
                    break
                raise ControlUnreachable(f"lost the connection to the master on {self.path}: "
                                         f"{exc.strerror or exc}") from None
            if not chunk:
                break
            data += chunk
        line, newline, _ = bytes(data).partition(b"\n")
        if not newline:
            raise ControlUnreachable(f"the master on {self.path} closed the connection without an answer")
        try:
            response = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            raise ControlUnreachable(f"the master on {self.path} sent a malformed answer: {exc}") from None
        if not _is_response(response):
            raise ControlUnreachable(f"the master on {self.path} sent an answer without 'ok'")
        return response

    def _no_answer(self) -> str:
        return f"no answer from the master on {self.path} within {self.timeout_s:g}s"
