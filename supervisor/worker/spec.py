"""What a worker is started with: its `WorkerSpec`, decided by the master.

Its own module so that the master, which builds specs and reads exit statuses, never
imports the worker's serving code (the HTTP server, httptools, ssl): every module the
master imports is memory its balancer and watcher carry too, and nobody uses.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.config.model import AppConfig
    from supervisor.system import privileges
    from supervisor.system.log import Logs

EXIT_BOOT_FAILED = 3


@dataclass
class WorkerSpec:
    """Everything a worker needs, decided by the master before the fork.

    It reaches the worker's new interpreter as plain data (`entry.encode_spec`), so
    every field holds plain data, a dataclass of plain data, or sockets: in the worker
    `app` and `identity` are `entry.Record`s with the same fields, arrays are tuples,
    and each socket is the same fd. `logs` alone never travels: the worker builds its
    own over its pipes."""
    app: AppConfig
    index: int
    generation: int
    identity: privileges.Identity
    graceful_timeout_s: float
    master_pid: int
    heartbeat_s: float
    channel: socket.socket
    listeners: dict[str, socket.socket]
    log_level: str = "info"
    log_format: str = "text"
    access_log_format: str | None = None
    # Connections arrive on these in `balance` mode: one channel per balancer of
    # `[master] balancers`, by balancer index.
    balancers: tuple[socket.socket, ...] = ()
    proxy_listeners: frozenset[str] = frozenset()  # listeners whose streams open with a PROXY header
    proxy_allow_ips: dict[str, tuple[str, ...]] = field(default_factory=dict)  # theirs, by name
    # The routing of the balance listeners it shares with other apps by Host, which it
    # checks every request against (hostcheck.routes_for: plain data, as ROUTES has it).
    host_routes: dict = field(default_factory=dict)
    log_fds: tuple[int, int] = (-1, -1)     # write ends of the error and access pipes (-1: no access log)
    config_source: str | None = None        # the file whose [apps.NAME] defines the app, for messages
    # TLS (see worker.tlsboot): the listeners whose connections speak it, and the memfds
    # with the app's key and chain and its client CAs (made by the forked child, as root).
    tls_listeners: frozenset[str] = frozenset()
    tls_fds: tuple[int, int] = (-1, -1)
    tls_ticket_secret: str = ""             # hex: the app's session-ticket secret (the master's, per app)
    redirect_https: dict[str, int] = field(default_factory=dict)   # plain listeners sending 308s, by name
    tls_context: object | None = None       # built in the worker, from tls_fds
    logs: Logs | None = None                # the worker's loggers, built in the worker

    def owned_fds(self) -> list[int]:
        fds = [self.channel.fileno(), *(s.fileno() for s in self.listeners.values()),
               *(fd for fd in self.log_fds if fd >= 0)]
        fds.extend(sock.fileno() for sock in self.balancers)
        return fds
