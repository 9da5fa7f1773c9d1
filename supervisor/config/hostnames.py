"""What a host name is, written once for every place Baton reads one (pure).

One grammar serves three readers, for two purposes:

- Routing. An `[apps.X] hosts` entry (`host_pattern`) and the Host field or TLS SNI
  name the balancer peeks (`normalise_name`, `normalise_ipv6`) go through the same
  normalisation, so a name the config accepts always matches the requests that carry
  it, however the client spells its case, port or trailing dot.
- Binding. The host of a `bind = "NAME:PORT"` is handed to the resolver when the
  listener is bound. It must pass the same grammar, so it is a name the resolver looks
  up as a name: never one that `inet_aton` would quietly read as a number ("0x7f.1",
  "127.1"). binds.py keeps it as written, since a trailing dot means something to the
  resolver (no search domains).

The grammar is stricter than RFC 3986's reg-name (which admits percent-encoding and
sub-delims): DNS-style names, i.e. dot-separated labels of 1-63 letters, digits,
hyphens or underscores (underscores appear in internal names such as compose
services), not starting or ending with a hyphen, 253 characters at most, one trailing
dot allowed. A name whose last label is all digits must be a dotted-quad IPv4 address
(no TLD is numeric, RFC 3696 §2), so "999.1.1.1" and "01.2.3.4" are refused rather than
guessed at.

Normalised form: ASCII lowercase, no trailing dot, IPv6 literals without brackets in
`ipaddress`'s compressed form ("0:0::1" -> "::1").
"""
from __future__ import annotations

import ipaddress
import re
from typing import Literal

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DEC_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")

PATTERN_FORMS = "a host name, an IP address or '*.' and a domain, without a port"


def normalise_name(text: str, *, allow_ipv4: bool = True) -> str | None:
    """A lowercase DNS-style name or dotted-quad IPv4 without its trailing dot; else None."""
    if not text.isascii():
        return None
    text = text.lower()
    if text.endswith(".") and len(text) > 1:
        text = text[:-1]
    if not text or len(text) > 253:
        return None
    labels = text.split(".")
    if labels[-1].isdigit():
        ok = (allow_ipv4 and len(labels) == 4
              and all(_DEC_OCTET.fullmatch(label) and int(label) <= 255 for label in labels))
        return text if ok else None
    if all(_LABEL.fullmatch(label) for label in labels):
        return text
    return None


def normalise_ipv6(literal: str) -> str | None:
    """An IPv6 literal (no brackets) in compressed form, or None; zones are refused."""
    # ipaddress accepts "%zone" suffixes; a zone has no meaning in a Host header (RFC 9110
    # uses RFC 3986's IP-literal, which has none), so refuse it before asking ipaddress.
    if "%" in literal or not literal.isascii():
        return None
    try:
        return str(ipaddress.IPv6Address(literal))
    except ValueError:
        return None


def host_pattern(pattern: str) -> tuple[Literal["exact", "wildcard"], str]:
    """One `hosts` entry -> ("exact", normalised host) or ("wildcard", normalised suffix).

    An exact entry is a name, a dotted-quad IPv4 address or an IPv6 address, bracketed
    or not; "*.example.org" is a wildcard with the suffix "example.org" (never an IP
    address). Raises ValueError saying what is wrong.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"host pattern {pattern!r} is not a string")
    if pattern.startswith("*."):
        suffix = normalise_name(pattern[2:], allow_ipv4=False)
        if suffix is None:
            raise ValueError(f"invalid wildcard host pattern {pattern!r}")
        return "wildcard", suffix
    if pattern.startswith("[") and pattern.endswith("]"):
        host = normalise_ipv6(pattern[1:-1])
    elif ":" in pattern:
        host = normalise_ipv6(pattern)
    else:
        host = normalise_name(pattern)
    if host is None:
        raise ValueError(f"invalid host pattern {pattern!r} (no ports, no wildcards "
                         "other than a leading '*.')")
    return "exact", host
