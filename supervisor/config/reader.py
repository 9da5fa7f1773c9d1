"""TOML configuration -> frozen dataclasses.

Promises: `load(path)` either returns a complete, validated `Config` or raises
`ConfigError` carrying *every* problem found, each naming the file, the dotted key and
what was expected versus found. Every duration and count has an upper bound
(`config.model`'s MAX_*) and every user a process is to become must exist, so such a
value is refused here, not found out later by the master (a timeout epoll cannot wait
for, a balancer that cannot start). Nothing here forks, binds or imports application
code; it only reads the config file, asks the system whether users, groups and
directories exist, and has OpenSSL load each TLS app's certificate and key (config.tls),
so a pair that does not match is a problem here, naming its file. Names follow the rules written once elsewhere: users and groups `system.users`,
host names `config.hostnames`, the `module` spec `config.modulespec`.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping

from supervisor.balancer import policies as balancing
from supervisor.balancer import routing
from supervisor.config import hostnames, modulespec
from supervisor.config import tls as tls_config
from supervisor.config.binds import (
    BIND_FORMS,
    UNIX_PATH_MAX,
    BindAddress,
    clash,
    parse_bind,
)
from supervisor.config.model import (
    COMMAND_LINE,
    DEFAULT_USER,
    LISTENER_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_BACKLOG,
    MAX_BALANCERS,
    MAX_BODY_SIZE,
    MAX_BUFFER_BODY,
    MAX_DURATION_S,
    MAX_HEAD_LINE,
    MAX_REQUEST_FIELDS,
    MAX_REQUESTS,
    MAX_RSS_MB,
    MAX_THREADS,
    MAX_WORKERS,
    AppConfig,
    Config,
    ConfigError,
    ListenerConfig,
    MasterConfig,
    auto_balancers,
    control_socket_path,
    effective_user,
)
from supervisor.config.tables import (
    MISSING,
    Problems,
    Table,
    absolute_path,
    did_you_mean,
    is_int,
    is_text,
    or_list,
)
from supervisor.http import accesslog, proxyproto
from supervisor.http.forwarded import FORWARDED_HEADERS
from supervisor.system import namespaces, users

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")   # no '_': the HTTP layer drops those
_HEADER_VALUE = re.compile(r"[!-~]+(?: [!-~]+)*")
_TOML_POSITION = re.compile(r"(?P<reason>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)", re.DOTALL)


# -- public API ---------------------------------------------------------------


def load(path: str | os.PathLike, *, running_as_root: bool | None = None) -> Config:
    """Read, parse and validate the config file at `path` and the files it includes."""
    path = os.fspath(path)
    return from_mapping(_read_document(path, "the config file"), path, running_as_root=running_as_root)


def parse(text: str, path: str, *, running_as_root: bool | None = None) -> Config:
    """Parse TOML `text`; `path` names the file in problems and anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(path, exc)]) from None
    return from_mapping(data, path, running_as_root=running_as_root)


def from_mapping(data: dict, path: str | None, *, running_as_root: bool | None = None,
                 base_dir: str | None = None) -> Config:
    """Validate already-parsed config data (a TOML document, or `baton serve` arguments).

    `path` None means the data came from the command line. Relative paths resolve
    against `base_dir`, by default the config file's directory (or the current one);
    that holds in included files too, so a table means the same wherever it is written.
    `running_as_root` None asks the system (effective uid 0).

    The files matched by `[master] include` (glob by glob, each glob's matches sorted)
    are read here; each may define [listeners.*] and [apps.*] tables. A problem in one
    names that file, and problems are listed file by file, the main one first.
    """
    if running_as_root is None:
        running_as_root = os.geteuid() == 0
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(path)) if path is not None else os.getcwd()
    main = os.path.abspath(path) if path is not None else None
    problems = Problems(path if path is not None else COMMAND_LINE)
    top = Table(problems, (), data)
    master = _master(top.section("master"), base_dir, running_as_root)
    documents = [_Document(problems, top.table("listeners"), top.table("apps"))]
    documents += _included(master.include, main, problems.source)
    # Which file defined each listener and app, so a later problem names that file.
    owners: dict[tuple[str, str], Problems] = {}
    listener_names: list[str] = []
    listeners: dict[str, ListenerConfig] = {}
    for document in documents:
        defined = _claim(owners, "listeners", document)
        listener_names += defined
        _listeners(document.problems, defined, base_dir, listeners, running_as_root)
    apps = {}
    for document in documents:
        for name, app_data in _claim(owners, "apps", document).items():
            app = _app(document.problems, name, app_data, tuple(listener_names), base_dir, running_as_root)
            if app is not None:
                apps[name] = app
    if not any(document.apps for document in documents):
        problems.add(("apps",), "expected at least one app: define at least one [apps.NAME] table")
    if not any(document.problems.lines for document in documents):
        # Routing is a cross-app check: judged only once every app reads correctly,
        # so one typo is not echoed as a routing conflict.
        _check_routes(owners, listeners, apps)
        _check_tls(owners, listeners, apps)
        _check_attach(owners, listeners, apps)
    _check_balancer_apart(owners, master, apps, running_as_root)
    top.finish(elsewhere=_elsewhere())
    lines = [line for document in documents for line in document.problems.lines]
    if lines:
        raise ConfigError(lines)
    return Config(
        path=main,
        master=master,
        listeners=MappingProxyType(listeners),
        apps=MappingProxyType(apps),
        sources=tuple(([main] if main else []) + [document.problems.source for document in documents[1:]]),
    )


def control_socket_of_file(path: str | os.PathLike) -> str:
    """The control socket of the master started with the config file at `path`, for
    `baton ctl`. Only `[master] control_socket` is read and checked: a config that
    is wrong elsewhere (being edited, or naming users only root may become) must not
    stop an operator from reaching the master that still runs the old one."""
    path = os.path.abspath(os.fspath(path))
    data = _read_document(path, "the config file")
    problems = Problems(path)
    master = data.get("master", {})
    if not isinstance(master, dict):
        master = {}
    socket_path = _control_socket(Table(problems, ("master",), master), os.path.dirname(path))
    if problems.lines:
        raise ConfigError(problems.lines)
    return control_socket_path(Config(path, MasterConfig(control_socket=socket_path),
                                      MappingProxyType({}), MappingProxyType({})))


# -- reading files ------------------------------------------------------------


@dataclass
class _Document:
    """One config file's [listeners] and [apps] tables, and the problems found in it."""
    problems: Problems
    listeners: dict
    apps: dict


def _read_document(path: str, what: str) -> dict:
    """Read and parse one TOML file; raise ConfigError with the one problem naming it."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read {what}: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        found = f"byte {raw[exc.start]:#04x} at offset {exc.start}"
        raise ConfigError([f"{path}: expected UTF-8 text, found {found}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(path, exc)]) from None


def _included(patterns: tuple[str, ...], main: str | None, main_name: str) -> list[_Document]:
    """Every file the include globs match (absolute globs, matches sorted per glob), once
    each and never the main file; matching nothing is fine."""
    seen = {os.path.realpath(main)} if main else set()
    documents = []
    for pattern in patterns:
        for found in sorted(glob.glob(pattern, recursive=True)):
            real = os.path.realpath(found)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            documents.append(_include(os.path.abspath(found), main_name))
    return documents


def _include(path: str, main_name: str) -> _Document:
    problems = Problems(path)
    try:
        data = _read_document(path, "the included file")
    except ConfigError as exc:
        problems.lines += exc.problems
        return _Document(problems, {}, {})
    top = Table(problems, (), data)
    if top.raw("master") is not MISSING:
        problems.add(("master",), f"expected only [listeners.NAME] and [apps.NAME] tables in an included file, "
                                  f"found [master]: it belongs in {main_name}")
    document = _Document(problems, top.table("listeners"), top.table("apps"))
    top.finish(elsewhere=_elsewhere())
    return document


def _claim(owners: dict[tuple[str, str], Problems], section: str, document: _Document) -> dict:
    """The tables of `section` this document defines first; a name defined before, in
    this file or another, is a problem naming both files."""
    defined = {}
    for name, data in getattr(document, section).items():
        key = (section, name)
        if key in owners:
            document.problems.add(key, f"already defined in {owners[key].source}")
        else:
            owners[key] = document.problems
            defined[name] = data
    return defined


# -- reading tables -----------------------------------------------------------


# -- sections -----------------------------------------------------------------


def _master(table: Table, base_dir: str, running_as_root: bool) -> MasterConfig:
    defaults = MasterConfig()
    master = MasterConfig(
        graceful_timeout=table.seconds("graceful_timeout", defaults.graceful_timeout, high=MAX_DURATION_S),
        boot_timeout=table.seconds("boot_timeout", defaults.boot_timeout, high=MAX_DURATION_S, positive=True),
        log_level=table.choice("log_level", defaults.log_level, LOG_LEVELS),
        access_log=table.path("access_log", base_dir, dash=True),
        error_log=table.path("error_log", base_dir, dash=True),
        pidfile=table.path("pidfile", base_dir),
        balancer_user=_identity(table, "balancer_user"),
        crash_backoff_max=table.seconds("crash_backoff_max", defaults.crash_backoff_max, high=MAX_DURATION_S,
                                        positive=True),
        include=table.strings("include", item=lambda text: absolute_path(base_dir, text)) or (),
        control_socket=_control_socket(table, base_dir),
        admins=table.strings("admins", item=_admin) or (),
        health=_health(table, base_dir),
        log_format=table.choice("log_format", defaults.log_format, LOG_FORMATS),
        access_log_format=_access_log_format(table),
        balancers=_balancers(table, os.cpu_count() or 1),
    )
    table.finish()
    # The balancer becomes this user at every (re)start: a name the system does not
    # know would end the master then, long after `baton check` and the reload passed.
    _check_user(table.problems, table.key + ("balancer_user",), master.balancer_user, running_as_root,
                started="the balancer")
    return master


def _balancers(table: Table, cores: int) -> int:
    """`balancers`: an integer from 1 to MAX_BALANCERS, or "auto" (`auto_balancers`)."""
    value = table.raw("balancers")
    if value is MISSING:
        return 1
    if value == "auto":
        return auto_balancers(cores)
    if is_int(value) and 1 <= value <= MAX_BALANCERS:
        return value
    table.problems.expected(table.key + ("balancers",), f'an integer from 1 to {MAX_BALANCERS} or "auto"', value)
    return 1


def _access_log_format(table: Table) -> str | None:
    """A gunicorn-style format, checked by compiling it (the problem names the bad atom)."""
    fmt = table.string("access_log_format", what="a gunicorn-style format string")
    if fmt is None:
        return None
    try:
        accesslog.compile_format(fmt)
    except accesslog.AccessFormatError as exc:
        table.problems.add(table.key + ("access_log_format",), f"expected a gunicorn-style format: {exc}")
        return None
    return fmt


def _health(table: Table, base_dir: str) -> BindAddress | None:
    spec = table.string("health")
    if spec is None:
        return None
    try:
        bind = parse_bind(spec, base_dir)
    except ValueError as exc:
        table.problems.add(table.key + ("health",), str(exc))
        return None
    if bind.kind not in ("tcp", "unix"):
        table.problems.expected(table.key + ("health",), "HOST:PORT or unix:PATH", spec)
        return None
    return bind


def _control_socket(table: Table, base_dir: str) -> str | None:
    path = table.path("control_socket", base_dir)
    if path is not None and len(os.fsencode(path)) > UNIX_PATH_MAX:
        table.problems.add(table.key + ("control_socket",),
                           f"expected a unix socket path of at most {UNIX_PATH_MAX} bytes, "
                           f"found {path!r} ({len(os.fsencode(path))} bytes)")
        return None
    return path


def _admin(text: str) -> str:
    """An `admins` entry: an existing user, or "@group" naming an existing group."""
    if text.startswith("@"):
        if users.group(text[1:]) is None:
            raise ValueError("'@' followed by an existing group name",
                             f", but this system knows no group {text[1:]!r}")
        return text
    if users.user(text) is None:
        raise ValueError("an existing user name, or '@' followed by a group name",
                         f", but this system knows no user {text!r}")
    return text


def _listeners(problems: Problems, data: dict, base_dir: str, listeners: dict[str, ListenerConfig],
               running_as_root: bool) -> None:
    """Add the valid listeners of `data` to `listeners` (those of earlier files)."""
    for name, listener_data in data.items():
        key = ("listeners", name)
        if not _check_name(problems, key, name, "a listener"):
            continue
        if not isinstance(listener_data, dict):
            problems.expected(key, "a table", listener_data)
            continue
        table = Table(problems, key, listener_data)
        spec = table.string("bind", required=f"a bind address ({BIND_FORMS})")
        bind = None
        if spec is not None:
            try:
                bind = parse_bind(spec, base_dir)
            except ValueError as exc:
                problems.add(key + ("bind",), str(exc))
        mode = table.raw("mode")
        if mode is MISSING:
            mode = ListenerConfig.mode
        elif mode not in LISTENER_MODES:
            problems.expected(key + ("mode",), f"one of {or_list(LISTENER_MODES)}", mode)
        backlog = table.integer("backlog", ListenerConfig.backlog, low=1, high=MAX_BACKLOG)
        proxy_protocol = table.boolean("proxy_protocol", ListenerConfig.proxy_protocol)
        proxy_allow_ips = table.strings("proxy_allow_ips", item=proxyproto.allow_entry)
        socket_mode = _octal(table, "socket_mode", "0660")
        socket_dir_mode = _octal(table, "socket_dir_mode", "0750")
        socket_owner = _identity(table, "socket_owner")
        socket_group = _identity(table, "socket_group")
        tls = table.boolean("tls", ListenerConfig.tls)
        redirect_https = _redirect_https(table)
        table.finish()
        if tls and redirect_https is not None:
            problems.add(key + ("redirect_https",), "applies to a plain listener, found one with tls = true")
        socket_keys = [k for k in ("socket_mode", "socket_owner", "socket_group", "socket_dir_mode")
                       if k in listener_data]
        if socket_keys and bind is not None and bind.kind != "unix":
            problems.add(key + (socket_keys[0],), f"applies to a 'unix:PATH' bind only, found {str(bind)!r}")
        _check_socket_identity(problems, key, socket_owner, socket_group, running_as_root)
        if mode == "reuseport" and bind is not None and bind.kind != "tcp":
            problems.add(key + ("mode",), f"mode 'reuseport' needs a HOST:PORT bind, found {str(bind)!r}")
        if bind is not None and bind.kind == "systemd" and "backlog" in listener_data:
            # systemd called listen() already; its copy of the socket would keep our change.
            problems.add(key + ("backlog",), "a 'systemd:NAME' socket is listening already: "
                                             "set Backlog= in its .socket unit instead")
        if bind is not None:
            _check_bind_clash(problems, key, bind, listeners)
            listeners[name] = ListenerConfig(
                name, bind, mode, backlog, proxy_protocol,
                proxy_allow_ips=ListenerConfig.proxy_allow_ips if proxy_allow_ips is None else proxy_allow_ips,
                socket_mode=socket_mode, socket_owner=socket_owner, socket_group=socket_group,
                socket_dir_mode=socket_dir_mode, tls=tls, redirect_https=redirect_https)


def _check_bind_clash(problems: Problems, key: tuple, bind: BindAddress,
                      earlier: Mapping[str, ListenerConfig]) -> None:
    for other in earlier.values():
        if clash(bind, other.bind):
            what = "is already bound by" if bind == other.bind else "overlaps"
            problems.add(key + ("bind",), f"{str(bind)!r} {what} listeners.{other.name} ({str(other.bind)!r})")
            return


def _app(problems: Problems, name: str, data: Any, listener_names: tuple[str, ...], base_dir: str,
         running_as_root: bool) -> AppConfig | None:
    key = ("apps", name)
    if not _check_name(problems, key, name, "an app"):
        return None
    if not isinstance(data, dict):
        problems.expected(key, "a table", data)
        return None
    table = Table(problems, key, data)
    attach_only = "attach" in data and data.get("workers") == 0
    module = table.string("module", required=None if attach_only else modulespec.FORMS)
    if module is not None:
        try:
            modulespec.parse(module)
        except ValueError:
            problems.expected(key + ("module",), modulespec.FORMS, module)
    listeners = table.strings("listeners", required="a non-empty array of listener names", nonempty=True,
                              item=lambda text: _known_listener(text, listener_names))
    if listeners is not None and len(set(listeners)) != len(listeners):
        problems.add(key + ("listeners",), "names a listener twice")
    user = _identity(table, "user")
    group = _identity(table, "group")
    chdir = table.path("chdir", base_dir)
    if chdir is not None and not os.path.isdir(chdir):
        why = "not a directory" if os.path.exists(chdir) else "does not exist"
        problems.add(key + ("chdir",), f"expected an existing directory, found {chdir!r} ({why})")
    pythonpath = table.strings("pythonpath", item=lambda text: absolute_path(chdir or base_dir, text))
    defaults = AppConfig(name, "", ())
    app = AppConfig(
        name=name,
        module=module,
        listeners=listeners,
        workers=table.integer("workers", defaults.workers, low=0 if "attach" in data else 1, high=MAX_WORKERS),
        threads=table.integer("threads", defaults.threads, low=1, high=MAX_THREADS),
        user=user,
        group=group,
        chdir=chdir,
        pythonpath=pythonpath or (),
        env=_env(table),
        umask=_umask(table),
        isolate=_isolate(table, running_as_root),
        keepalive=table.seconds("keepalive", defaults.keepalive, high=MAX_DURATION_S),
        park_after=table.seconds("park_after", defaults.park_after, high=MAX_DURATION_S),
        graceful_timeout=table.seconds("graceful_timeout", None, high=MAX_DURATION_S),
        limit_request_line=table.integer("limit_request_line", defaults.limit_request_line, low=64,
                                         high=MAX_HEAD_LINE),
        limit_request_fields=table.integer("limit_request_fields", defaults.limit_request_fields, low=1,
                                           high=MAX_REQUEST_FIELDS),
        limit_request_field_size=table.integer("limit_request_field_size", defaults.limit_request_field_size,
                                               low=64, high=MAX_HEAD_LINE),
        max_body_size=table.integer("max_body_size", defaults.max_body_size, low=0, high=MAX_BODY_SIZE),
        buffer_body=table.integer("buffer_body", defaults.buffer_body, low=0, high=MAX_BUFFER_BODY),
        header_timeout=table.seconds("header_timeout", defaults.header_timeout, high=MAX_DURATION_S,
                                     positive=True),
        write_timeout=table.seconds("write_timeout", defaults.write_timeout, high=MAX_DURATION_S,
                                    positive=True),
        forwarded_allow_ips=_forwarded_allow_ips(table, defaults.forwarded_allow_ips),
        forwarded_header=_forwarded_header(table, defaults.forwarded_header),
        secure_scheme_headers=_secure_scheme_headers(table, defaults.secure_scheme_headers),
        hosts=table.strings("hosts", item=_host_pattern) or (),
        default=table.boolean("default", defaults.default),
        balance=table.choice("balance", defaults.balance, balancing.POLICIES),
        timeout=table.seconds("timeout", defaults.timeout, high=MAX_DURATION_S),  # 0: never
        max_requests=table.integer("max_requests", defaults.max_requests, low=0, high=MAX_REQUESTS),
        max_requests_jitter=table.integer("max_requests_jitter", defaults.max_requests_jitter, low=0,
                                          high=MAX_REQUESTS),
        max_rss=table.integer("max_rss", defaults.max_rss, low=0, high=MAX_RSS_MB),
        reload_on=table.strings("reload_on", item=lambda text: absolute_path(chdir or base_dir, text)) or (),
        preload=table.boolean("preload", defaults.preload),
        preload_hook=_hook(table, "preload_hook"),
        **{name: _hook(table, name) for name in modulespec.HOOKS},
        certificate=table.path("certificate", base_dir),
        private_key=table.path("private_key", base_dir),
        client_ca=table.path("client_ca", base_dir),
        tls_min_version=table.choice("tls_min_version", defaults.tls_min_version, tls_config.TLS_VERSIONS),
        **_attach(table, base_dir, defaults),
    )
    table.finish(elsewhere={"bind": "a [listeners.NAME] table that this app names in 'listeners'"})
    _check_identity(problems, key, user, group, running_as_root)
    return app


def _check_routes(owners: Mapping[tuple[str, str], Problems], listeners: Mapping[str, ListenerConfig],
                  apps: Mapping[str, AppConfig]) -> None:
    """Apps sharing a `balance` listener must be told apart by `hosts` (or one `default`)."""
    for name, listener in listeners.items():
        sharing = [app for app in apps.values() if name in (app.listeners or ())]
        if len(sharing) < 2:
            continue
        if listener.mode != "balance":
            names = ", ".join(app.name for app in sharing)
            owners["listeners", name].add(
                ("listeners", name, "mode"),
                f"apps {names} share this listener: expected mode 'balance' to route them by host,"
                f" found {listener.mode!r}")
            continue
        for app in sharing:
            if not app.hosts and not app.default:
                owners["apps", app.name].add(
                    ("apps", app.name, "hosts"),
                    f"expected host names (or default = true): listener {name!r} is shared by several apps")
        try:
            routing.HostTable([(app.name, app.hosts, app.default) for app in sharing])
        except ValueError as exc:
            owners["listeners", name].add(("listeners", name), f"apps sharing this listener conflict: {exc}")


def _check_attach(owners: Mapping[tuple[str, str], Problems], listeners: Mapping[str, ListenerConfig],
                  apps: Mapping[str, AppConfig]) -> None:
    """Attached workers are reached through the balancer only, and terminate no TLS (the
    key would have to leave the master for a process it did not start)."""
    for name, app in apps.items():
        if app.attach is None:
            continue
        key = ("apps", name)
        for listener in app.listeners or ():
            config = listeners.get(listener)
            if config is not None and config.mode != "balance":
                owners[key].add(key + ("attach",), f"attached workers are reached through the balancer: "
                                                   f"expected listener {listener!r} in mode 'balance', "
                                                   f"found {config.mode!r}")
            elif config is not None and config.tls:
                owners[key].add(key + ("attach",), f"attached workers terminate no TLS: listener "
                                                   f"{listener!r} has tls = true")


def _check_tls(owners: Mapping[tuple[str, str], Problems], listeners: Mapping[str, ListenerConfig],
               apps: Mapping[str, AppConfig]) -> None:
    """Each app on a `tls = true` listener names a certificate and key that load and
    match (loaded here, as the master will read them: `baton check` and a reload find a
    broken pair before any worker does); no other app names TLS files."""
    for name, app in apps.items():
        key = ("apps", name)
        found = tls_config.consistency(app, [listeners[listener] for listener in app.listeners])
        if not found and app.certificate is not None:
            found = tls_config.check_files(app.certificate, app.private_key, app.client_ca)
        for field_name, message in found:
            owners[key].add(key + (field_name,), message)


def _redirect_https(table: Table) -> int | None:
    value = table.raw("redirect_https")
    if value is MISSING:
        return None
    try:
        return tls_config.redirect_port(value)
    except ValueError as exc:
        table.problems.expected(table.key + ("redirect_https",), str(exc), value)
        return None


def _check_balancer_apart(owners: Mapping[tuple[str, str], Problems], master: MasterConfig,
                          apps: Mapping[str, AppConfig], running_as_root: bool) -> None:
    """No app may run as the balancer's user: whoever shares its uid can stop or kill
    it. Only an explicit `balancer_user` can clash (unset, the balancer gets an id no
    app can have); without root everything runs as the master's user, so none is told
    apart. Users the system does not know are reported where they are named."""
    if not running_as_root or master.balancer_user is None:
        return
    balancer = users.user(master.balancer_user)
    if balancer is None:
        return
    for name, app in apps.items():
        user = effective_user(app, running_as_root)
        entry = users.user(user) if user is not None else None
        if entry is None or entry.pw_uid != balancer.pw_uid:
            continue
        who = repr(app.user) if app.user is not None else f"the default user {DEFAULT_USER!r} (no user is set)"
        owners["apps", name].add(
            ("apps", name, "user"),
            f"expected a user other than the balancer's: this app runs as {who}, uid {entry.pw_uid}, "
            f"the uid of [master] balancer_user = {master.balancer_user!r}, and could stop or kill the "
            f"balancer; give the app another user, or leave balancer_user unset (an id no app uses)")


def _hook(table: Table, name: str) -> str | None:
    """A lifecycle hook: "pkg.mod:function", judged as the worker will import it."""
    spec = table.string(name)
    if spec is None:
        return None
    try:
        modulespec.parse_hook(spec)
    except ValueError:
        table.problems.expected(table.key + (name,), modulespec.HOOK_FORMS, spec)
        return None
    return spec


def _host_pattern(text: str) -> str:
    """A `hosts` entry, kept as written once the balancer's own rule accepts it."""
    try:
        hostnames.host_pattern(text)
    except ValueError:
        raise ValueError(hostnames.PATTERN_FORMS) from None
    return text


def _known_listener(name: str, defined: tuple[str, ...]) -> str:
    if name in defined:
        return name
    hint = did_you_mean(name, defined) if defined else "; no [listeners.NAME] table is defined"
    raise ValueError("the name of a [listeners.NAME] table", hint)


def _identity(table: Table, name: str) -> str | None:
    """A user or group: a name, or a numeric id (a TOML integer or a string of digits)."""
    value = table.raw(name)
    if value is MISSING:
        return None
    if is_text(value):
        return value
    if is_int(value) and value >= 0:
        return str(value)
    table.problems.expected(table.key + (name,), f"a {name} name or numeric id", value)
    return None


def _check_identity(problems: Problems, key: tuple, user: str | None, group: str | None,
                    running_as_root: bool) -> None:
    """Users and groups must exist; without root, workers can only be who the master is."""
    _check_user(problems, key + ("user",), user, running_as_root)
    if group is not None:
        entry = users.group(group)
        _check_known(problems, key + ("group",), group, entry.gr_gid if entry else None, running_as_root,
                     kind="group", id_name="gid", own_id=os.getegid(), switch="workers in another group")


def _check_user(problems: Problems, key: tuple, user: str | None, running_as_root: bool,
                *, started: str = "workers") -> None:
    """The user that what is `started` (an app's workers, the balancer) becomes: one the
    system knows; without root, only the master's own; unset under root, the default
    user, which must then exist."""
    if user is not None:
        entry = users.user(user)
        _check_known(problems, key, user, entry.pw_uid if entry else None, running_as_root,
                     kind="user", id_name="uid", own_id=os.geteuid(), switch=f"{started} as another user")
    elif running_as_root and users.user(DEFAULT_USER) is None:
        problems.add(key, f"expected a user name: the master runs as root and the default user "
                          f"{DEFAULT_USER!r} does not exist on this system")


def _check_known(problems: Problems, key: tuple, name: str, known_id: int | None, running_as_root: bool,
                 *, kind: str, id_name: str, own_id: int, switch: str) -> None:
    """`known_id` is the uid or gid the system gives `name`, None if it knows no such one."""
    if known_id is None:
        problems.add(key, f"expected an existing {kind}, found {name!r}, which this system does not know")
    elif not running_as_root and known_id != own_id:
        problems.add(key, f"expected the master's own {kind} ({id_name} {own_id}), found {name!r} "
                          f"({id_name} {known_id}): the master must run as root to start {switch}")


def _isolate(table: Table, running_as_root: bool) -> tuple[str, ...]:
    """`isolate`: names of namespaces (`namespaces.NAMES`), each once. Only root can
    make one, so without root no worker of the app could start: said here, where
    `baton check` sees it."""
    key = table.key + ("isolate",)
    before = len(table.problems.lines)
    names = table.strings("isolate", item=_namespace_name)
    if names is None or len(table.problems.lines) > before:
        return ()
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        table.problems.add(key, f"names {or_list(tuple(twice))} twice")
        return ()
    if names and not running_as_root:
        table.problems.add(key, "expected a master running as root: only root (with CAP_SYS_ADMIN) can "
                                "create the namespaces isolate names; run the master as root, or remove isolate")
    return names


def _namespace_name(text: str) -> str:
    if text not in namespaces.NAMES:
        raise ValueError(f"one of {or_list(namespaces.NAMES)} (the namespaces isolate may name)",
                         did_you_mean(text, namespaces.NAMES))
    return text


def _env(table: Table) -> Mapping[str, str]:
    env = {}
    for name, value in table.table("env").items():
        key = table.key + ("env", name)
        if not name or "=" in name or "\0" in name:
            table.problems.add(key, f"expected an environment variable name without '=', found {name!r}")
        elif not isinstance(value, str) or "\0" in value:
            table.problems.expected(key, "a string", value)
        else:
            env[name] = value
    return MappingProxyType(env)


def _octal(table: Table, name: str, example: str) -> int | None:
    """A file mode: an octal string ("0660", "660", "0o660") or an integer up to 0o777."""
    value = table.raw(name)
    if value is MISSING:
        return None
    if is_int(value) and 0 <= value <= 0o777:
        return value
    if isinstance(value, str) and re.fullmatch(r"(?:0o|0)?[0-7]{1,3}", value):
        return int(value.removeprefix("0o"), 8)
    table.problems.expected(table.key + (name,), f"an octal string like \"{example}\" or an integer from 0 "
                                                 f"to 0o777", value)
    return None


def _check_socket_identity(problems: Problems, key: tuple, owner: str | None, group: str | None,
                           running_as_root: bool) -> None:
    """A socket file's owner and group must exist; without root, chown gives a file
    only to ourselves, and only to a group we are in."""
    if owner is not None:
        entry = users.user(owner)
        _check_known(problems, key + ("socket_owner",), owner, entry.pw_uid if entry else None,
                     running_as_root, kind="user", id_name="uid", own_id=os.geteuid(),
                     switch="give the socket to another user")
    if group is not None:
        entry = users.group(group)
        if entry is None:
            problems.add(key + ("socket_group",),
                         f"expected an existing group, found {group!r}, which this system does not know")
        elif not running_as_root and entry.gr_gid not in (os.getegid(), *os.getgroups()):
            problems.add(key + ("socket_group",),
                         f"expected one of the master's groups, found {group!r} (gid {entry.gr_gid}): "
                         f"the master must run as root to give the socket to a group it is not in")


def _umask(table: Table) -> int | None:
    value = table.raw("umask")
    if value is MISSING:
        return None
    if is_int(value) and 0 <= value <= 0o777:
        return value
    if isinstance(value, str) and re.fullmatch(r"(?:0o)?[0-7]{1,4}", value):
        umask = int(value.removeprefix("0o"), 8)
        if umask <= 0o777:
            return umask
    table.problems.expected(table.key + ("umask",), "an octal string like \"022\" or an integer from 0 to 0o777",
                            value)
    return None


def _attach(table: Table, base_dir: str, defaults: AppConfig) -> dict:
    """The attach keys (see master.attach_points): an "unix:PATH" socket, its file's
    mode and group, who may attach, and the promote policy."""
    keys = ("attach_mode", "attach_group", "attach_allow", "attach_promote")
    spec = table.string("attach", what='"unix:PATH" (the socket workers started elsewhere attach through)')
    path = None
    if spec is not None:
        try:
            bind = parse_bind(spec, base_dir)
        except ValueError as exc:
            table.problems.add(table.key + ("attach",), str(exc))
        else:
            if bind.kind != "unix":
                table.problems.expected(table.key + ("attach",), '"unix:PATH"', spec)
            else:
                path = bind.path
    elif any(key in table.data for key in keys):
        first = next(key for key in keys if key in table.data)
        table.problems.add(table.key + (first,), 'applies with attach = "unix:PATH" only')
    mode = _octal(table, "attach_mode", "0660")
    allow = table.raw("attach_allow")
    if allow is MISSING:
        allow = None
    elif not isinstance(allow, list) or not all(_allow_entry(item) for item in allow):
        table.problems.expected(table.key + ("attach_allow",),
                                'an array of user names, "@group" names and numeric uids', allow)
        allow = None
    else:
        allow = tuple(allow)
    return {"attach": path, "attach_mode": defaults.attach_mode if mode is None else mode,
            "attach_group": _identity(table, "attach_group"), "attach_allow": allow,
            "attach_promote": table.integer("attach_promote", defaults.attach_promote, low=0, high=MAX_WORKERS)}


def _allow_entry(item) -> bool:
    if is_int(item):
        return item >= 0
    return is_text(item) and item not in ("", "@")


def _forwarded_allow_ips(table: Table, default: tuple[str, ...]) -> tuple[str, ...]:
    addresses = table.strings("forwarded_allow_ips", item=proxyproto.allow_entry)
    return default if addresses is None else addresses


def _forwarded_header(table: Table, default: str) -> str:
    value = table.raw("forwarded_header")
    if value is MISSING:
        return default
    if isinstance(value, str) and value.lower() in FORWARDED_HEADERS:
        return value.lower()
    table.problems.expected(table.key + ("forwarded_header",), "'X-Forwarded-For' or 'Forwarded'", value)
    return default


def _secure_scheme_headers(table: Table, default: Mapping[str, str]) -> Mapping[str, str]:
    """Header name -> the value that means https; an empty table turns them all off."""
    if table.raw("secure_scheme_headers") is MISSING:
        return default
    headers = {}
    for name, value in table.table("secure_scheme_headers").items():
        key = table.key + ("secure_scheme_headers", name)
        if not _HEADER_NAME.fullmatch(name):
            table.problems.add(key, f"expected a header name (letters, digits and '-'), found {name!r}")
        elif not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            table.problems.expected(key, "the header's value meaning https, a non-empty string", value)
        else:
            headers[name] = value
    return MappingProxyType(headers)


# -- small helpers ------------------------------------------------------------


def _check_name(problems: Problems, key: tuple, name: str, kind: str) -> bool:
    if _NAME.fullmatch(name):
        return True
    problems.add(key, f"expected {kind} name made of letters, digits, '_', '.' and '-', found {name!r}")
    return False


def _elsewhere() -> dict[str, str]:
    """Where a key misplaced at the top level belongs, for the unknown-key hint."""
    where = {}
    for cls, section in ((AppConfig, "an [apps.NAME] table"), (ListenerConfig, "a [listeners.NAME] table"),
                         (MasterConfig, "[master]")):  # last wins: graceful_timeout is the master's
        where.update((f.name, section) for f in fields(cls) if f.name != "name")
    return where


def _syntax_problem(path: str, exc: Exception) -> str:
    """tomllib says "Reason (at line L, column C)"; say "file:L:C: invalid TOML: reason"."""
    match = _TOML_POSITION.fullmatch(str(exc))
    if match:
        return f"{path}:{match['line']}:{match['column']}: invalid TOML: {match['reason']}"
    return f"{path}: invalid TOML: {exc}"
