"""TOML configuration -> frozen dataclasses.

Promises: `load(path)` either returns a complete, validated `Config` or raises
`ConfigError` carrying *every* problem found, each naming the file, the dotted key and
what was expected versus found. Nothing here forks, binds or imports application code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class BindAddress:
    """A parsed `bind` spec. kind is "tcp", "unix" or "fd"."""
    kind: str
    host: str | None = None      # tcp: "127.0.0.1", "::", "0.0.0.0" (no brackets)
    port: int | None = None      # tcp
    path: str | None = None      # unix: absolute path (relative specs resolved against the config dir)
    fd: int | None = None        # fd://N

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"{host}:{self.port}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"fd://{self.fd}"


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: BindAddress
    mode: str = "share"
    backlog: int = 2048
    proxy_protocol: bool = False


@dataclass(frozen=True)
class AppConfig:
    name: str
    module: str                       # "pkg.mod:callable" or "pkg:create_app()"
    listeners: tuple[str, ...]
    workers: int = 1
    threads: int = 1
    user: str | None = None           # as written; None -> "nobody" when the master is root
    group: str | None = None
    chdir: str | None = None          # absolute (resolved against the config file's directory)
    pythonpath: tuple[str, ...] = ()  # absolute
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    umask: int | None = None
    keepalive: float = 5.0            # seconds a keep-alive connection may sit idle
    graceful_timeout: float | None = None  # None: the master's
    limit_request_line: int = 8190
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    max_body_size: int | None = None
    header_timeout: float = 10.0
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class MasterConfig:
    graceful_timeout: float = 30.0
    boot_timeout: float = 30.0
    log_level: str = "info"
    access_log: str | None = None     # path, "-" for stdout, None for off
    error_log: str | None = None      # path, "-"/None for stderr
    pidfile: str | None = None


@dataclass(frozen=True)
class Config:
    path: str | None                  # None when built from `baton serve` arguments
    master: MasterConfig
    listeners: Mapping[str, ListenerConfig]
    apps: Mapping[str, AppConfig]


class ConfigError(Exception):
    """Every problem found in one config; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
