"""The reload plan: what must change to go from one config to the next (pure).

`diff(old, new)` compares two validated configs and says, by name, which listeners to
open, close or keep and which apps to start, stop, restart, rescale or keep, with the
reason for each. It never touches a socket or a process; the master applies the plan.

Promises:
- Every name of `old` and `new` appears in exactly one of the listener lists, except a
  re-created listener, which is in both `listeners_open` and `listeners_close`: the new
  socket opens at once, the old one closes only after the workers holding it drained.
- Every app appears in exactly one of start, stop, restart, rescale, keep.
- An app is restarted only when its workers would behave differently: a field they read
  changed, a listener socket they hold is replaced, or every app is restarted
  (`restart_all`, SIGHUP). Routing fields (`hosts`, `default`, `balance`), `workers`
  and `reload_on` (the watcher's business) never restart an app.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Mapping

from supervisor.config.model import AppConfig, Config, ListenerConfig, MasterConfig
from supervisor.system.words import count as counted

# Changing one of these needs a new socket; anything else about a listener keeps it.
RECREATE_FIELDS = ("bind", "backlog", "mode")
# AppConfig fields the workers do not read: changing them never restarts an app.
# `workers` rescales, the routing ones go to the balancer, `reload_on` to the watcher, and
# the recycling limits are judged by the master from heartbeats.
ROUTING_FIELDS = ("hosts", "default", "balance")
MASTER_FIELDS = ("max_requests", "max_requests_jitter", "max_rss")
# Attached workers' socket and policy: the master applies them (master.attaching).
ATTACH_FIELDS = ("attach", "attach_mode", "attach_group", "attach_allow", "attach_promote")
NO_RESTART_FIELDS = ("name", "workers", *ROUTING_FIELDS, *MASTER_FIELDS, "reload_on", *ATTACH_FIELDS)
# Listener modes in which workers hold the listening socket themselves.
WORKER_HELD_MODES = ("share", "reuseport")
# A UNIX socket file's permissions: the master applies a change to the live file
# (chmod, chown) and no worker sees it, so it neither re-creates the socket nor restarts apps.
SOCKET_FILE_FIELDS = ("socket_mode", "socket_owner", "socket_group", "socket_dir_mode")
# Listener settings a worker reads itself, whatever the mode (it checks the PROXY peer,
# terminates TLS, answers the redirect to https).
WORKER_READ_FIELDS = ("proxy_allow_ips", "tls", "redirect_https")

# [master] settings a reload applies at once, and those that wait for a master upgrade
# (`baton ctl upgrade`): the log files and their format are opened before any child
# exists and shared by all of them; the health socket and the balancer's user belong
# to the balancer process, which must not restart just for them (it holds connections
# being routed); so does how many balancers there are (each worker is forked with a
# channel per balancer). Every field of MasterConfig is in exactly one of the two.
MASTER_LIVE = ("graceful_timeout", "boot_timeout", "crash_backoff_max", "log_level", "pidfile",
               "control_socket", "admins", "include")
MASTER_AFTER_UPGRADE = ("access_log", "error_log", "log_format", "access_log_format", "health",
                        "balancer_user", "balancers")

RESTART_ALL = "restart_all"       # reason: every app restarts (SIGHUP)
VIA_LISTENER = "listener:"        # reason prefix: a listener the app's workers hold changed


@dataclass(frozen=True)
class Plan:
    """What to do to go from the running config to a new one; every field names things.

    `reasons` maps "app NAME" / "listener NAME" to what changed: the names of the fields
    that differ (in declaration order), then "listener:L" when the app's workers hold
    listener L which changed, and "restart_all" under SIGHUP. Only things that differ
    (or restart) have reasons; a restarted app lists every changed field, including
    those that alone would not restart it.
    `addresses` maps each opened or closed listener to its address for the log
    ("old -> new" when re-created).
    """
    listeners_open: tuple[str, ...] = ()
    listeners_close: tuple[str, ...] = ()
    listeners_keep: tuple[str, ...] = ()
    apps_start: tuple[str, ...] = ()
    apps_stop: tuple[str, ...] = ()
    apps_restart: tuple[str, ...] = ()
    apps_rescale: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    apps_keep: tuple[str, ...] = ()
    routing_changed: bool = False
    master_changed: tuple[str, ...] = ()
    reasons: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    addresses: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    rescale_from: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def empty(self) -> bool:
        """Nothing to do and nothing differs."""
        return not (self.listeners_open or self.listeners_close or self.apps_start or self.apps_stop
                    or self.apps_restart or self.apps_rescale or self.routing_changed
                    or self.master_changed or self.reasons)

    def describe(self) -> list[str]:
        """One log line per action, with its reason."""
        lines = []
        reopened = set(self.listeners_open) & set(self.listeners_close)
        for name in self.listeners_close:
            if name not in reopened:
                lines.append(f"close listener {name} ({self.addresses.get(name, '?')})")
        for name in self.listeners_open:
            if name in reopened:
                lines.append(f"re-create listener {name} ({self.addresses.get(name, '?')}): "
                             f"{_because(self.reasons.get(f'listener {name}', ()))}")
            else:
                lines.append(f"open listener {name} ({self.addresses.get(name, '?')})")
        for name in self.listeners_keep:
            if f"listener {name}" in self.reasons:
                lines.append(f"update listener {name}: {_because(self.reasons[f'listener {name}'])}")
        for name in self.apps_stop:
            lines.append(f"stop app {name}")
        for name in self.apps_start:
            lines.append(f"start app {name}")
        for name in self.apps_restart:
            lines.append(f"restart app {name}: {_because(self.reasons.get(f'app {name}', ()))}")
        for name, count in self.apps_rescale.items():
            lines.append(f"rescale app {name}: {self.rescale_from.get(name, '?')} -> {counted(count, 'worker')}")
        for name in (*self.apps_rescale, *self.apps_keep):
            others = tuple(r for r in self.reasons.get(f"app {name}", ()) if r != "workers")
            if others:
                lines.append(f"update app {name}: {_because(others)}")
        if self.routing_changed:
            lines.append("new routing table for the balancer")
        if self.master_changed:
            lines.append(f"master: {_because(self.master_changed)}")
        return lines or ["no change"]


def diff(old: Config, new: Config, *, restart_all: bool = False) -> Plan:
    """The plan that takes a master running `old` to `new` (both already validated)."""
    reasons: dict[str, tuple[str, ...]] = {}
    addresses: dict[str, str] = {}

    # Listeners.
    opened, closed, kept = [], [], []
    for name, listener in new.listeners.items():
        before = old.listeners.get(name)
        if before is None:
            opened.append(name)
            addresses[name] = str(listener.bind)
            continue
        changed = _changed(ListenerConfig, before, listener)
        if changed:
            reasons[f"listener {name}"] = changed
        if set(changed) & set(RECREATE_FIELDS):
            opened.append(name)
            closed.append(name)
            addresses[name] = (str(listener.bind) if before.bind == listener.bind
                               else f"{before.bind} -> {listener.bind}")
        else:
            kept.append(name)
    for name, listener in old.listeners.items():
        if name not in new.listeners:
            closed.append(name)
            addresses[name] = str(listener.bind)
    # Listeners whose workers must get a new socket (or lose the old one), or read a
    # changed listener setting (proxy_protocol, proxy_allow_ips) themselves.
    worker_visible = {
        name for name in new.listeners
        if set(reasons.get(f"listener {name}", ())) - set(SOCKET_FILE_FIELDS)
        and (old.listeners[name].mode in WORKER_HELD_MODES
                                              or new.listeners[name].mode in WORKER_HELD_MODES
                                              or set(reasons[f"listener {name}"]) & set(WORKER_READ_FIELDS))
    }

    # Apps.
    started, restarted, kept_apps = [], [], []
    rescale: dict[str, int] = {}
    rescale_from: dict[str, int] = {}
    for name, app in new.apps.items():
        before = old.apps.get(name)
        if before is None:
            started.append(name)
            continue
        changed = _changed(AppConfig, before, app)
        forced = [VIA_LISTENER + listener for listener in dict.fromkeys(before.listeners + app.listeners)
                  if listener in worker_visible]
        if restart_all:
            forced.append(RESTART_ALL)
        if changed or forced:
            reasons[f"app {name}"] = changed + tuple(forced)
        if forced or set(changed) - set(NO_RESTART_FIELDS):
            restarted.append(name)
            continue
        if "workers" in changed:
            rescale[name] = app.workers
            rescale_from[name] = before.workers
        else:
            kept_apps.append(name)
    stopped = [name for name in old.apps if name not in new.apps]

    return Plan(
        listeners_open=tuple(opened),
        listeners_close=tuple(closed),
        listeners_keep=tuple(kept),
        apps_start=tuple(started),
        apps_stop=tuple(stopped),
        apps_restart=tuple(restarted),
        apps_rescale=MappingProxyType(rescale),
        apps_keep=tuple(kept_apps),
        routing_changed=bool(opened or closed) or _routes(old) != _routes(new),
        master_changed=_changed(MasterConfig, old.master, new.master),
        reasons=MappingProxyType(reasons),
        addresses=MappingProxyType(addresses),
        rescale_from=MappingProxyType(rescale_from),
    )


def _changed(cls, before, after) -> tuple[str, ...]:
    """Names of the dataclass fields that differ, in declaration order."""
    return tuple(f.name for f in fields(cls) if getattr(before, f.name) != getattr(after, f.name))


def _routes(config: Config) -> tuple:
    """Everything the balancer's routing table is built from, comparable."""
    users = {name: tuple(app.name for app in config.apps.values() if name in app.listeners)
             for name in config.listeners}
    apps = {name: tuple(getattr(app, f) for f in ROUTING_FIELDS) for name, app in config.apps.items()}
    modes = {name: (listener.mode, listener.proxy_protocol) for name, listener in config.listeners.items()}
    return users, apps, modes


def _because(reasons: tuple[str, ...]) -> str:
    fields_changed = [r for r in reasons if r != RESTART_ALL and not r.startswith(VIA_LISTENER)]
    parts = []
    if fields_changed:
        parts.append(f"{', '.join(fields_changed)} changed")
    parts += [f"listener {r[len(VIA_LISTENER):]} changed" for r in reasons if r.startswith(VIA_LISTENER)]
    if RESTART_ALL in reasons:
        parts.append("restart of every app requested")
    return "; ".join(parts) or "changed"
