"""A worker's TLS at boot: its app's context from the memfds, and its ticket keys.

Both ends of the key's journey live here: `material` runs in the master's forked
child, still root, before it drops to the app's user (it may be the only one who can
read the key); `load` runs in the worker's new interpreter and closes the memfds.
A certificate or key that does not load is a boot failure naming the app's files, so
a rotation to a broken key is rolled back while the old generation serves.
"""
from __future__ import annotations

import os

from supervisor.config import tls as tls_config

# `supervisor.http.tls` and `.tickets` (ssl, OpenSSL) are imported by the functions that
# use them, for an app with TLS only: the master imports this module, and what it
# imports its balancer and watcher carry too.


def material(app) -> tuple[int, int]:
    """The memfds for `app`'s workers ((-1, -1) for an app without TLS), or ValueError
    saying which file is wrong."""
    if app.certificate is None:
        return -1, -1
    from supervisor.http import tls as http_tls
    problems = tls_config.check_files(app.certificate, app.private_key, app.client_ca)
    if problems:
        raise ValueError("; ".join(f"apps.{app.name}.{key}: {message}" for key, message in problems))
    return http_tls.write_material(app.certificate, app.private_key, app.client_ca)


def load(spec, log):
    """The worker's SSLContext (None without TLS), its ticket key set."""
    material_fd, ca_fd = spec.tls_fds
    spec.tls_fds = (-1, -1)
    if material_fd < 0:
        return None
    from supervisor.http import tickets
    from supervisor.http import tls as http_tls
    app = spec.app
    try:
        context = http_tls.context_for(material_fd, ca_fd, app.tls_min_version)
    except (OSError, ValueError, http_tls.EncryptedKey) as exc:
        raise RuntimeError(f"app {app.name!r}: cannot load its certificate {app.certificate} and private key "
                           f"{app.private_key}: {exc}") from None
    if spec.tls_ticket_secret:
        keys = http_tls.TicketKeys(bytes.fromhex(spec.tls_ticket_secret))
        if tickets.install_ticket_callback(context, keys.keys) is not None:
            _set_ticket_key(context, keys, log)   # one key at a time (see keep_rotating)
    return context


def keep_rotating(spec, loop, log) -> None:
    """Without the ticket callback (which asks for the keys at every handshake), set
    the next period's key when it starts: every worker of the app does the same at the
    same wall-clock time."""
    context = spec.tls_context
    if context is None or not spec.tls_ticket_secret:
        return
    from supervisor.http import tickets
    from supervisor.http import tls as http_tls
    if tickets.has_ticket_callback(context):
        return
    keys = http_tls.TicketKeys(bytes.fromhex(spec.tls_ticket_secret))

    def rotate() -> None:
        _set_ticket_key(context, keys, log)
        loop.call_later(keys.seconds_to_next() + 0.5, rotate)
    loop.call_later(keys.seconds_to_next() + 0.5, rotate)


def _set_ticket_key(context, keys, log) -> None:
    from supervisor.http import tickets
    why = tickets.set_ticket_key(context, keys.key(keys.period()))
    if why is not None:
        log.warning("session tickets are not shared with the app's other workers (%s): a client resumes "
                    "its TLS session only at the worker that issued its ticket", why)


def close_fds(fds: tuple[int, int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)
