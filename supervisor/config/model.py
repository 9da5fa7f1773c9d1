"""Baton's configuration as frozen dataclasses: what `reader.load` returns.

Pure data and a few questions answered from it alone (where the control socket lives,
which user an app runs as); no file is read here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from supervisor.config.binds import BindAddress


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: BindAddress
    mode: str = "balance"             # "balance", "share" or "reuseport"
    backlog: int = 2048
    proxy_protocol: bool = False
    # Direct peers whose PROXY headers are believed (addresses, CIDR networks, "*").
    proxy_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    # A "unix:" socket's file (see listeners.socket_permissions for the defaults of None).
    socket_mode: int | None = None
    socket_owner: str | None = None   # a user name or uid, as written
    socket_group: str | None = None   # a group name or gid, as written
    socket_dir_mode: int | None = None   # create the socket's missing directory with this mode
    tls: bool = False                 # its apps' workers terminate TLS (each with its own certificate)
    redirect_https: int | None = None  # a plain listener answering 308 to https:// on this port (None: off)


@dataclass(frozen=True)
class AppConfig:
    name: str
    module: str | None                # "pkg.mod:callable" or "pkg:create_app()" (None: attached workers only)
    listeners: tuple[str, ...]
    workers: int = 1
    threads: int = 1
    user: str | None = None           # as written; None -> "nobody" when the master is root
    group: str | None = None
    chdir: str | None = None          # absolute (resolved against the config file's directory)
    pythonpath: tuple[str, ...] = ()  # absolute
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    umask: int | None = None
    # Namespaces its workers (and its template) run in, new and empty: system.namespaces.NAMES.
    isolate: tuple[str, ...] = ()
    keepalive: float = 5.0            # seconds a keep-alive connection may sit idle
    # Seconds a `balance` connection may sit idle at its worker before it is parked in
    # the balancer (which passes its next request to a free worker); 0: never.
    park_after: float = 0.002        # idle this long, a `balance` connection goes back to the balancer
    graceful_timeout: float | None = None  # None: the master's
    limit_request_line: int = 8190
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    # Bytes a request body may have (413 past it, read or announced); 0: no limit.
    max_body_size: int = 100 << 20
    # Bodies up to this many bytes are read by the worker's loop before the app runs
    # (a slow client then holds no thread); larger ones are streamed to wsgi.input.
    buffer_body: int = 65536
    header_timeout: float = 10.0
    write_timeout: float = 30.0       # seconds a client may take no byte of its response before it is closed
    # Direct peers whose proxy headers are believed (addresses, CIDR networks, "*").
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    forwarded_header: str = "x-forwarded-for"   # or "forwarded" (RFC 7239): the one read for the client
    # Header -> the value meaning https (gunicorn's secure_scheme_headers), from those peers only.
    secure_scheme_headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(
        {"X-Forwarded-Protocol": "ssl", "X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "on"}))
    hosts: tuple[str, ...] = ()       # Host/SNI names routed to this app on a shared listener
    default: bool = False             # takes the hosts no other app on the listener claims
    balance: str = "least-connections"
    timeout: float | None = 30.0      # a request running longer (or a silent worker) is aborted; None: never
    max_requests: int = 0             # recycle a worker after this many requests; 0: never
    max_requests_jitter: int = 0      # plus a random 0..jitter, so workers don't recycle together
    max_rss: int = 0                  # recycle a worker whose resident memory exceeds this many MB; 0: never
    reload_on: tuple[str, ...] = ()   # absolute globs: a change restarts just this app (the watcher's)
    # One template process per generation imports the app once and forks its workers
    # (worker.template); `preload_hook`, "pkg.mod:function", runs there after the import.
    preload: bool = False
    preload_hook: str | None = None
    # Lifecycle hooks, "pkg.mod:function", called in the worker (worker.hooks); None: none.
    post_fork: str | None = None
    post_worker_init: str | None = None
    worker_exit: str | None = None
    pre_request: str | None = None
    post_request: str | None = None
    # TLS, for its listeners with `tls = true` (absolute paths; see config.tls).
    certificate: str | None = None    # PEM: the certificate, then its chain
    private_key: str | None = None    # PEM, unencrypted; may be readable by root only
    client_ca: str | None = None      # PEM CAs a client certificate must chain to (mutual TLS)
    tls_min_version: str = "1.2"      # "1.2" or "1.3"
    # Workers started elsewhere (`baton worker --attach PATH`) attach through this UNIX
    # socket (absolute path; None: none may). See master.attach_points.
    attach: str | None = None
    attach_mode: int = 0o660
    attach_group: str | None = None   # the socket file's group (None: the app's)
    # Who may attach: user names, "@group" names, numeric uids (None: the app's user only).
    attach_allow: tuple[str | int, ...] | None = None
    attach_promote: int = 0           # N ready workers of a new tag take over routing (0: `baton ctl promote`)


@dataclass(frozen=True)
class MasterConfig:
    graceful_timeout: float = 30.0
    boot_timeout: float = 30.0
    log_level: str = "info"
    access_log: str | None = None     # path, "-" for stdout, None for off
    error_log: str | None = None      # path, "-"/None for stderr
    pidfile: str | None = None
    balancer_user: str | None = None  # None: under root an id no app uses (privileges.balancer_identity), else ourselves
    crash_backoff_max: float = 30.0   # cap on the delay before respawning a crash-looping app
    health: BindAddress | None = None  # where the balancer answers /healthz and /metrics
    include: tuple[str, ...] = ()     # absolute globs of files adding [listeners.*] and [apps.*]
    control_socket: str | None = None  # absolute; None: beside the config file (see control_socket_path)
    admins: tuple[str, ...] = ()      # users, and "@group"s, allowed on the control socket besides root and us
    log_format: str = "text"          # "text" or "json" (one object per line), for both logs
    access_log_format: str | None = None  # gunicorn-style atoms; None: accesslog's default for log_format
    balancers: int = 1                # balancer processes, all accepting on the same listeners


@dataclass(frozen=True)
class Config:
    path: str | None                  # None when built from `baton serve` arguments
    master: MasterConfig
    listeners: Mapping[str, ListenerConfig]
    apps: Mapping[str, AppConfig]
    sources: tuple[str, ...] = ()     # absolute paths of every file read, the main one first


class ConfigError(Exception):
    """Every problem found in one config; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


COMMAND_LINE = "<command line>"   # the source named in problems when there is no file
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
LISTENER_MODES = ("balance", "share", "reuseport")
DEFAULT_USER = "nobody"                  # workers of a root master run as this when `user` is unset

# Upper bounds on what a config may say. A value past one used to pass `baton check`
# and fail later, deep in the master: a timeout over ~24.8 days overflows epoll's C int
# of milliseconds (OverflowError in the loop's wait), `workers = 100000` forks until the
# machine gives out. Each is far beyond any setting anyone means; past it, the reader
# names the key and the bound.
MAX_DURATION_S = 86_400.0                # every timeout and delay: one day
MAX_WORKERS = 1024                       # per app (also what `baton ctl scale` may ask)
MAX_BALANCERS = 64                       # [master] balancers: each holds a channel to every worker
MAX_THREADS = 1024                       # per worker
MAX_REQUESTS = 1_000_000_000             # max_requests and max_requests_jitter
MAX_RSS_MB = 1 << 20                     # max_rss: 1 TiB
MAX_BODY_SIZE = 1 << 40                  # max_body_size, bytes: 1 TiB (0: no limit)
MAX_BUFFER_BODY = 64 << 20               # buffer_body, bytes: held in memory per connection
MAX_HEAD_LINE = 65535                    # limit_request_line and limit_request_field_size, bytes
MAX_REQUEST_FIELDS = 32768               # limit_request_fields (gunicorn's own cap)
MAX_BACKLOG = 65535                      # a listener's backlog (the kernel clamps to somaxconn)


def control_socket_path(config: Config) -> str | None:
    """Where the master's control socket lives: `[master] control_socket`, else
    `<config dir>/<config stem>.ctl` beside the config file, else (`baton serve`,
    no file) None: no control socket."""
    if config.master.control_socket is not None:
        return config.master.control_socket
    if config.path is None:
        return None
    stem = os.path.splitext(os.path.basename(config.path))[0]
    return os.path.join(os.path.dirname(config.path), f"{stem}.ctl")


def effective_user(app: AppConfig, running_as_root: bool) -> str | None:
    """The user an app's workers run as: its own, else "nobody" under a root master,
    else None (stay the master's user)."""
    if app.user is not None:
        return app.user
    return DEFAULT_USER if running_as_root else None


def auto_balancers(cores: int) -> int:
    """What `balancers = "auto"` means on a host with `cores` CPUs: one balancer per
    four cores (a balancer's per-connection cost caps it at a fixed rate of new
    connections; at one per four cores that rate stays above what the workers on the
    other three can serve), at least one, at most MAX_BALANCERS."""
    return max(1, min(MAX_BALANCERS, cores // 4))
