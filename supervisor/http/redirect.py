"""Where a plain listener with `redirect_https` sends a request: pure, fed the request.

`https_location` keeps the host the client asked for (its port replaced by the https
one, left out for 443) and the whole target (path and query), as nginx's
``return 308 https://$host$request_uri`` does. The host was checked by the HTTP layer
already (a host name or an IP address, IPv6 in brackets, an optional port), so it can
go into a header as it is.
"""
from __future__ import annotations

HTTPS_PORT = 443


def split_host(host: str) -> str:
    """`host` without its port: "example.com:8080" -> "example.com", "[::1]:80" -> "[::1]"."""
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else host
    name, _, _ = host.partition(":")
    return name


def https_location(host: str | None, target: str, port: int, server_name: str) -> str:
    """The https URL for a request for `target` on `host` (its Host value; None or ""
    when the client sent none: then `server_name`). An absolute-form target gives its
    own path; "*" and an empty one give "/"."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        if not host:
            host = rest[:slash] if slash >= 0 else rest
        target = rest[slash:] if slash >= 0 else "/"
    if not target.startswith("/"):
        target = "/"
    name = split_host(host) if host else server_name
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"   # a bare IPv6 server name
    authority = name if port == HTTPS_PORT else f"{name}:{port}"
    return f"https://{authority}{target}"
