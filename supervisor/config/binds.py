"""Bind specs: "HOST:PORT", "[IPV6]:PORT", ":PORT", "unix:PATH", "fd://N", "systemd:NAME".

Parsing is pure; `parse_bind` raises ValueError with a readable reason, and config.py
turns that into a problem naming the key. `clash` says which two binds cannot both
be listened on.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from supervisor.config import hostnames
from supervisor.config.tables import absolute_path


@dataclass(frozen=True)
class BindAddress:
    """A parsed `bind` spec. kind is "tcp", "unix", "fd" or "systemd"."""
    kind: str
    host: str | None = None      # tcp: "127.0.0.1", "::", "0.0.0.0" (no brackets)
    port: int | None = None      # tcp
    path: str | None = None      # unix: absolute path (relative specs resolved against the config dir)
    fd: int | None = None        # fd://N
    fdname: str | None = None    # systemd:NAME, the socket unit's FileDescriptorName= (not a path: never unlinked)

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"{host}:{self.port}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "systemd":
            return f"systemd:{self.fdname}"
        return f"fd://{self.fd}"


UNIX_PATH_MAX = 107  # sun_path holds 108 bytes on Linux, one of them the terminating NUL
BIND_FORMS = "HOST:PORT, [IPV6]:PORT, :PORT, unix:PATH, fd://N or systemd:NAME"
_FDNAME_MAX = 255  # systemd's limit on FileDescriptorName=


def parse_bind(spec: str, base_dir: str) -> BindAddress:
    """Parse one `bind` spec; raise ValueError with a readable reason when it is wrong.

    "HOST:PORT" keeps a host name as written (the listener resolves it) and normalises
    IP literals; ":PORT" and "*:PORT" mean every IPv4 interface. A relative unix path
    resolves against `base_dir`. "systemd:NAME" names a socket systemd passes (socket
    activation): NAME is the socket unit's FileDescriptorName=.
    """
    if spec.startswith("unix:"):
        return _parse_unix(spec[len("unix:"):], base_dir)
    if spec.startswith("fd://"):
        number = spec[len("fd://"):]
        if not (number.isascii() and number.isdigit()):
            raise ValueError(f"expected a file descriptor number >= 0 after 'fd://', found {number!r}")
        return BindAddress("fd", fd=int(number))
    if spec.startswith("systemd:"):
        return _parse_systemd(spec[len("systemd:"):])
    host, colon, port_text = spec.rpartition(":")
    if not colon:
        hint = f"; did you mean ':{spec}'?" if spec.isascii() and spec.isdigit() else ""
        raise ValueError(f"expected {BIND_FORMS}, found {spec!r}{hint}")
    port = _parse_port(port_text)
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"expected an IPv6 address between the brackets, found {host[1:-1]!r}") from None
        return BindAddress("tcp", host=str(address), port=port)
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"expected an IPv6 address in brackets, as in '[::1]:8000', found {spec!r}")
    if host in ("", "*"):
        return BindAddress("tcp", host="0.0.0.0", port=port)
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return BindAddress("tcp", host=str(ipaddress.IPv4Address(host)), port=port)
        except ValueError:
            raise ValueError(f"expected an IPv4 address, found {host!r}") from None
    # The name is kept as written: the listener resolves it, and a trailing dot means
    # something to the resolver. The grammar is the one every host name passes.
    if hostnames.normalise_name(host, allow_ipv4=False) is None:
        raise ValueError(f"expected a host name or IP address before ':{port_text}', found {host!r}")
    return BindAddress("tcp", host=host, port=port)


def clash(a: BindAddress, b: BindAddress) -> bool:
    """Whether two addresses cannot both be bound (IPv6 listeners are IPV6_V6ONLY)."""
    if a.kind != "tcp" or b.kind != "tcp":
        return a == b
    if a.port != b.port or a.port == 0:  # port 0: the kernel picks a fresh port each time
        return False
    if a.host == b.host:
        return True
    wildcards = {"0.0.0.0": 4, "::": 6}
    return any(x.host in wildcards and ip_version(y.host) == wildcards[x.host] for x, y in ((a, b), (b, a)))


def _parse_unix(path: str, base_dir: str) -> BindAddress:
    if not path or "\0" in path:
        raise ValueError(f"expected a socket path after 'unix:', found {path!r}")
    path = absolute_path(base_dir, path)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ValueError(f"expected a unix socket path of at most {UNIX_PATH_MAX} bytes, "
                         f"found {path!r} ({len(os.fsencode(path))} bytes)")
    return BindAddress("unix", path=path)


def _parse_systemd(name: str) -> BindAddress:
    # systemd accepts up to 255 printable ASCII characters except ':', its LISTEN_FDNAMES separator.
    if not name or len(name) > _FDNAME_MAX or not all(" " <= char <= "~" and char != ":" for char in name):
        raise ValueError(f"expected a socket name after 'systemd:' (the socket unit's FileDescriptorName=: "
                         f"1 to {_FDNAME_MAX} printable ASCII characters, no ':'), found {name!r}")
    return BindAddress("systemd", fdname=name)


def _parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"expected a port number after the last ':', found {text!r}")
    port = int(text)
    if port > 65535:
        raise ValueError(f"expected a port from 0 to 65535, found {port}")
    return port


def ip_version(host: str | None) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None  # a host name: resolved only when bound


