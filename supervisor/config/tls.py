"""TLS settings: which apps need a certificate, and whether their files load.

Promises:

* `consistency` is pure: from an app and its listeners alone it says, per key, what
  is missing or out of place (a TLS listener's app without a certificate, a
  certificate on an app no TLS listener serves, a key without its certificate).
* `check_files` loads a certificate chain and its key the way a worker will (OpenSSL,
  through `ssl`), and names the file that is wrong: unreadable, not PEM, an encrypted
  key (nobody is there to type its password), or a key that does not match the
  certificate. It reads the files only through OpenSSL and `os.open` (no key byte
  becomes a Python object), and a password prompt can never block it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl  # imported where OpenSSL is used: the master imports this module for every config

TLS_VERSIONS = ("1.2", "1.3")
TLS_KEYS = ("certificate", "private_key", "client_ca", "tls_min_version")
HTTPS_PORT = 443


class EncryptedKey(Exception):
    """OpenSSL asked for a password: the key is encrypted."""


def _no_password() -> str:
    raise EncryptedKey()


def consistency(app, listeners: Iterable) -> list[tuple[str, str]]:
    """(key, problem) pairs for `app` (an AppConfig) on `listeners` (its ListenerConfigs)."""
    tls_names = [listener.name for listener in listeners if listener.tls]
    problems = []
    if tls_names:
        names = ", ".join(repr(name) for name in tls_names)
        for key in ("certificate", "private_key"):
            if getattr(app, key) is None:
                what = "a PEM certificate file (the certificate, then its chain)" if key == "certificate" \
                    else "a PEM private key file"
                problems.append((key, f"expected {what}: listener {names} has tls = true"))
        return problems
    for key in TLS_KEYS:
        value = getattr(app, key)
        if key == "tls_min_version" and value == "1.2":
            continue   # the default, however it came
        if value is not None:
            problems.append((key, "applies to an app on a listener with tls = true; none of its listeners is"))
    return problems


def check_files(certificate: str, private_key: str, client_ca: str | None) -> list[tuple[str, str]]:
    """(key, problem) pairs for files that would not load; [] when all do."""
    problems = []
    for key, path in (("certificate", certificate), ("private_key", private_key), ("client_ca", client_ca)):
        if path is None:
            continue
        why = unreadable(path)
        if why:
            problems.append((key, f"cannot read {path}: {why}"))
    if problems:
        return problems
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=certificate)
    except ssl.SSLError as exc:
        return [("certificate", f"expected PEM certificates in {certificate}: {_reason(exc)}")]
    try:
        context.load_cert_chain(certificate, private_key, password=_no_password)
    except EncryptedKey:
        return [("private_key", f"expected an unencrypted PEM private key, found an encrypted one in "
                                f"{private_key}")]
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [("private_key", f"the private key in {private_key} does not match the certificate "
                                    f"in {certificate}")]
        return [("private_key", f"expected a PEM private key in {private_key}: {_reason(exc)}")]
    if client_ca is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            return [("client_ca", f"expected PEM CA certificates in {client_ca}: {_reason(exc)}")]
    return []


def unreadable(path: str) -> str | None:
    """Why `path` cannot be opened for reading (None: it can), without reading it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if not os.path.isfile(f"/proc/self/fd/{fd}"):
            return "not a regular file"
    finally:
        os.close(fd)
    return None


def tls_files(app) -> tuple[str, ...]:
    """The files whose change rotates the app's certificate (watched like reload_on)."""
    return tuple(path for path in (app.certificate, app.private_key, app.client_ca) if path is not None)


def redirect_port(value) -> int | None:
    """A listener's `redirect_https`: true (port 443), false (off) or a port number.
    ValueError for anything else."""
    if value is True:
        return HTTPS_PORT
    if value is False:
        return None
    if type(value) is int and 1 <= value <= 65535:
        return value
    raise ValueError("true, false or a port number from 1 to 65535")


def _reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or exc.strerror or str(exc)
    return str(reason).replace("_", " ").lower()
