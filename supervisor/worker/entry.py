"""How a worker process starts: a fork of the master that execs a fresh interpreter.

A plain fork would leave the whole master in the worker's memory: every app's config,
with every app's `env` secrets, where app code can find it (`gc.get_objects()`). So
the forked child, still running only the master's code:

1. points its stdout and stderr at its error pipe (stdin at /dev/null), so anything it
   says from here on reaches the master's error log, tagged;
2. enters the new, empty namespaces the app's `isolate` names (`namespaces.enter`,
   which needs root), then drops to the app's user (`privileges.drop`), so the new
   interpreter, its site imports and `.pth` files never run as root;
3. asks to be killed when the master dies (`PR_SET_PDEATHSIG`, which the credential
   change of step 2 would have cleared, so it comes after), and checks that the master
   is still its parent, closing the race with the master's death;
4. writes its `WorkerSpec` as JSON into a memfd and execs `python -c BOOTSTRAP <fd>`
   (this interpreter, its flags) with the master's environment plus the app's `env`
   and nothing else. Only the spec's fds survive the exec: the channels, the listeners,
   the log pipes and the memfd. argv holds no secret: /proc/PID/cmdline is world-readable.

The new interpreter (`run`) reads the spec, takes the master's `sys.path` (so the
`supervisor` package and the app are found exactly as the master found them), builds
its loggers over its pipes, and hands over to `process.main`, which imports the app
(or, for a preloaded app's template, to `template.main`, which imports it once and
forks the workers: the same steps 1-4 got it here).

A failure before the exec is a boot failure like an import error: BOOT_FAILED with the
traceback on the channel, and `EXIT_BOOT_FAILED`. So is a new interpreter that could
not start as the app's user (its venv or standard library unreadable to it: the exec
fails, or Python dies before any Baton code runs): after the drop, the child checks
what the new interpreter will read (`access.startup_needs`) and, rather than exec,
reports each path the user cannot read and how to fix it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import traceback
import types
from collections.abc import Mapping

from supervisor.ipc import channel
from supervisor.ipc.messages import TRACEBACK_MAX, BootFailed
from supervisor.system import log as log_mod
from supervisor.system import namespaces, privileges, spawn
from supervisor.worker import access, tlsboot
from supervisor.worker.spec import EXIT_BOOT_FAILED, WorkerSpec

# Runs before `supervisor` can be imported: standard library only, and short (it is argv).
BOOTSTRAP = ("import json, os, sys\n"
             "with open(int(sys.argv[1]), 'rb') as f: p = json.load(f)\n"
             "sys.path[:] = p['path']\n"
             "from supervisor.worker.entry import run\n"
             "sys.exit(run(p))\n")

class Record(types.SimpleNamespace):
    """A dataclass's fields as a worker received them: the same attributes, plain data."""


# -- the spec as plain data ------------------------------------------------------------
# Every value is tagged, so no user string (an env variable called "$fd") can be read
# as one: [tag, value] with tag "fd" (a socket: its fd number), "record" (a dataclass),
# "map" (a mapping of str), "list" (any array), or "" (a JSON scalar).

def encode_spec(spec) -> dict:
    """`spec`'s fields (all but `logs`) as JSON-ready data. Raises TypeError, naming the
    field, for a value that is not plain data."""
    out = {}
    for f in dataclasses.fields(spec):
        if f.name == "logs":
            continue
        try:
            out[f.name] = _encode(getattr(spec, f.name))
        except TypeError as exc:
            raise TypeError(f"WorkerSpec.{f.name}: {exc}") from None
    return out


def decode_spec(data: dict):
    """The `WorkerSpec` `encode_spec` described, in the worker: sockets over the same fds."""
    return WorkerSpec(**{name: _decode(value) for name, value in data.items()})


def _encode(value):
    if value is None or type(value) in (str, int, float, bool):
        return ["", value]
    if isinstance(value, socket.socket):
        return ["fd", value.fileno()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ["record", {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}]
    if isinstance(value, Mapping):
        if not all(type(key) is str for key in value):
            raise TypeError("a mapping whose keys are not all strings")
        return ["map", {key: _encode(item) for key, item in value.items()}]
    if isinstance(value, (set, frozenset)):
        return ["list", [_encode(item) for item in sorted(value)]]
    if isinstance(value, (list, tuple)):
        return ["list", [_encode(item) for item in value]]
    raise TypeError(f"a value of type {type(value).__name__} is not plain data")


def _decode(value):
    tag, inner = value
    if tag == "":
        return inner
    if tag == "fd":
        return socket.socket(fileno=inner)
    if tag == "record":
        return Record(**{name: _decode(item) for name, item in inner.items()})
    if tag == "map":
        return {key: _decode(item) for key, item in inner.items()}
    if tag == "list":
        return tuple(_decode(item) for item in inner)
    raise ValueError(f"unknown tag {tag!r} in a worker spec")


# -- in the master's forked child ----------------------------------------------------------

def exec_worker(spec, role: str = "worker") -> int:
    """Steps 1-4 above; returns (the exit status) only if they failed. `role` "template"
    starts a preloaded app's template (`worker.template`) instead of a worker."""
    error_w, access_w = spec.log_fds
    try:
        os.dup2(error_w, 1)
        os.dup2(error_w, 2)
        if error_w > 2:
            os.close(error_w)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        # Still root: the key may be readable by no one else (see worker.tlsboot).
        spec.tls_fds = tlsboot.material(spec.app)
        # Still root, which making a namespace takes; a template's workers inherit its own.
        try:
            namespaces.enter(spec.app.isolate)
        except namespaces.IsolationError as exc:
            return _refuse(spec, [f"app {spec.app.name}: {exc}"])
        privileges.drop(spec.identity)
        refused = access.denied(access.startup_needs(sys.path))
        if refused:
            return _refuse(spec, [access.explain_for(spec, item) for item in refused])
        spawn.die_with_parent(spec.master_pid)
        env = dict(os.environ)
        env.update(spec.app.env)
        memfd = os.memfd_create("baton-worker-spec", os.MFD_CLOEXEC)
        payload = json.dumps({"path": sys.path, "spec": encode_spec(spec), "role": role}).encode()
        view = memoryview(payload)
        while view:
            view = view[os.write(memfd, view):]
        os.lseek(memfd, 0, os.SEEK_SET)
        keep = [memfd, spec.channel.fileno(), *(s.fileno() for s in spec.listeners.values())]
        keep.extend(sock.fileno() for sock in spec.balancers)
        keep.extend(fd for fd in spec.tls_fds if fd >= 0)
        if access_w >= 0:
            keep.append(access_w)
        spawn.exec_python(BOOTSTRAP, [str(memfd)], env, keep)
    except BaseException as exc:
        text = traceback.format_exc() + access.boot_hint(spec, exc, startup_only=True)
        return _refuse(spec, [text.rstrip("\n")])
    return EXIT_BOOT_FAILED


def _refuse(spec, lines: list[str]) -> int:
    """BOOT_FAILED with `lines`, also written to the error pipe (the master's log)."""
    text = "\n".join(lines) + "\n"
    sys.stderr.write(f"worker {spec.app.name}#{spec.index} could not start:\n{text}")
    try:
        channel.send(spec.channel, BootFailed(traceback=text[-TRACEBACK_MAX:]))
    except OSError:
        pass
    return EXIT_BOOT_FAILED


# -- in the worker's new interpreter -----------------------------------------------------------

def run(payload: dict) -> int:
    """The worker, from the payload `BOOTSTRAP` read: serve until told to stop."""
    # As a forked worker had it: a Ctrl-C on the terminal is the master's to handle.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    spec = decode_spec(payload["spec"])
    # The exec needed them inheritable; nothing the app runs may inherit them.
    for sock in (spec.channel, *spec.balancers, *spec.listeners.values()):
        sock.set_inheritable(False)
    access_fd = spec.log_fds[1] if spec.log_fds[1] >= 0 else None
    if access_fd is not None:
        os.set_inheritable(access_fd, False)
    try:
        spec.logs = log_mod.worker_logs(spec.log_level, spec.log_format, spec.access_log_format, access_fd)
    except ValueError as exc:
        channel.send(spec.channel, BootFailed(traceback=f"bad log settings: {exc}"[-TRACEBACK_MAX:]))
        return EXIT_BOOT_FAILED
    # Imported here, in the new interpreter: the master, which imports this module to
    # start workers, never loads the serving code.
    if payload.get("role") == "template":
        from supervisor.worker import template
        return template.main(spec)
    from supervisor.worker import process
    return process.main(spec)
