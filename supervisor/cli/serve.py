"""`baton serve`: the command line a gunicorn user types, turned into one config.

The flags are gunicorn's names wherever Baton has the setting (`OPTIONS`); a gunicorn
flag Baton lacks gets one line naming its equivalent, or saying there is none
(`GUNICORN_ONLY`). Settings come from three sources, each overriding the one before:
a `-c FILE` TOML file's `[serve]` table (keys are the long flag names with `_` for
`-`), the `BATON_CMD_ARGS` environment variable (shell-split, like
`GUNICORN_CMD_ARGS`), then the command line. A later source replaces a repeatable
flag's list (`--bind`) whole; `-e` entries merge by name, the later one winning.

Everything here but `read_file` and `default_control_socket` (which makes its
directory) is pure: argv, a file's parsed data and the environment in, a config
mapping for `reader.from_mapping` out.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import tempfile
import tomllib
from dataclasses import dataclass

from supervisor.config.binds import UNIX_PATH_MAX, parse_bind
from supervisor.config.model import (
    COMMAND_LINE,
    LISTENER_MODES,
    LOG_LEVELS,
    ConfigError,
)
from supervisor.config.tables import (
    MISSING,
    Problems,
    Table,
    is_int,
    is_number,
    is_text,
)

APP_NAME = "app"                  # the one app `baton serve` runs: `baton ctl restart app`
DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_PORT = 8000               # gunicorn's, for a bind that names only a host
DEFAULT_CALLABLE = "application"  # gunicorn's rule: `module` alone means `module:application`
ENV_ARGS = "BATON_CMD_ARGS"
FILE_TABLE = "serve"
RELOAD_GLOB = "**/*.py"           # what --reload watches, under the app's directory


@dataclass(frozen=True)
class Option:
    """One `baton serve` flag. `kind` is how it is read: "int", "float", "str",
    "bool" (with a --no- form), "list" (repeatable; an array or a string in the file),
    "csv" (comma-separated; an array or a string in the file) or "env" (repeatable
    KEY=VALUE; a table in the file). `gunicorn` is gunicorn's name when it differs."""
    flags: tuple[str, ...]
    kind: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    gunicorn: str | None = None

    @property
    def key(self) -> str:
        """The argparse dest and the file's key: the first long flag, `-` as `_`."""
        long = next(flag for flag in self.flags if flag.startswith("--"))
        return long[2:].replace("-", "_")

    @property
    def label(self) -> str:
        return "/".join(flag for flag in self.flags if flag != "--access-log")


OPTIONS: tuple[Option, ...] = (
    Option(("-b", "--bind"), "list", f"HOST:PORT, [IPV6]:PORT, :PORT, HOST (port {DEFAULT_PORT}), unix:PATH or "
           f"fd://N; repeatable (default {DEFAULT_BIND})", "ADDR"),
    Option(("-w", "--workers"), "int", "worker processes (default 1)", "N"),
    Option(("--threads",), "int", "threads per worker: requests one worker serves at once (default 1)", "N"),
    Option(("--mode",), "str", "how connections reach workers (default balance; see the README)",
           choices=LISTENER_MODES),
    Option(("--backlog",), "int", "listen queue length (default 2048)", "N"),
    Option(("-t", "--timeout"), "float", "seconds a request may run before its worker is replaced; 0: never "
           "(default 30)", "SECONDS"),
    Option(("--graceful-timeout",), "float", "seconds running requests get at a stop or a restart (default 30)",
           "SECONDS"),
    Option(("--keep-alive",), "float", "seconds an idle keep-alive connection stays open (default 5)", "SECONDS"),
    Option(("--max-requests",), "int", "replace a worker after this many requests; 0: never (default)", "N"),
    Option(("--max-requests-jitter",), "int", "plus a random 0..N, so workers are not replaced together", "N"),
    Option(("-e", "--env"), "env", "KEY=VALUE in the app's environment; repeatable", "KEY=VALUE",
           gunicorn="-e/--env (raw_env)"),
    Option(("--reload",), "bool", f"restart the app (no downtime) when a {RELOAD_GLOB} file under its "
           "directory changes"),
    Option(("--reload-extra-file",), "list", "restart the app when this file changes too; repeatable", "FILE"),
    Option(("--preload",), "bool", "import the app once, in a template process per generation that forks "
           "the workers (they share its memory; a reload imports afresh)"),
    Option(("-p", "--pid"), "str", "write the master's pid to FILE", "FILE"),
    Option(("--access-logfile", "--access-log"), "str", "access log: a path or '-' for stdout (default: off)",
           "FILE"),
    Option(("--access-logformat",), "str", "access log format, gunicorn's atoms", "FORMAT"),
    Option(("--error-logfile", "--log-file"), "str", "error log: a path or '-' for stderr (default)", "FILE"),
    Option(("--log-level",), "str", "debug, info (default), warning, error or critical", choices=LOG_LEVELS),
    Option(("--forwarded-allow-ips",), "csv", "comma-separated addresses or CIDR networks, or '*', whose "
           "X-Forwarded-* headers are believed (default 127.0.0.1,::1)", "IPS"),
    Option(("--proxy-protocol",), "bool", "every connection opens with a PROXY v1/v2 header"),
    Option(("--proxy-allow-from",), "csv", "comma-separated peers allowed to send PROXY headers "
           "(default 127.0.0.1,::1)", "IPS"),
    Option(("-u", "--user"), "str", "run the workers as this user (as root, default nobody)", "USER"),
    Option(("-g", "--group"), "str", "run the workers with this group", "GROUP"),
    Option(("-m", "--umask"), "str", "the workers' umask, octal (e.g. 022)", "MASK"),
    Option(("--chdir",), "str", "directory to import the app from (default: the current one)", "DIR"),
    Option(("--pythonpath",), "csv", "comma-separated directories added to the app's sys.path", "DIRS"),
    Option(("--limit-request-line",), "int", "longest request line, bytes (default 8190)", "BYTES"),
    Option(("--limit-request-fields",), "int", "most header fields (default 100)", "N"),
    Option(("--limit-request-field-size", "--limit-request-field_size"), "int",
           "longest header field, bytes (default 8190)", "BYTES", gunicorn="--limit-request-field_size"),
    Option(("--certfile",), "str", "serve HTTPS: the PEM certificate (then its chain); needs --keyfile", "FILE"),
    Option(("--keyfile",), "str", "the certificate's PEM private key (may be readable by root only)", "FILE"),
    Option(("--ca-certs",), "str", "require a client certificate signed by these PEM CAs (mutual TLS)", "FILE"),
    Option(("--control-socket",), "str", "where `baton ctl` reaches this master (default: printed at start, "
           "serve-PORT.ctl in /run/baton as root, else in $XDG_RUNTIME_DIR/baton)", "PATH"),
)
_BY_KEY = {option.key: option for option in OPTIONS}

# Gunicorn flags Baton does not take, and what to use instead (one line each).
_TLS = ("no equivalent: Baton's TLS takes --certfile, --keyfile and --ca-certs, with OpenSSL's default ciphers "
        "and TLS 1.2 at least (tls_min_version in a `baton run` config)")
_STDIO = "not needed: a worker's stdout and stderr always reach the error log, tagged with app and pid"
_SYSLOG = "no syslog: Baton logs to stderr or --error-logfile; under systemd the journal takes it"
_LOGCONF = "no logging config: Baton writes text lines, or JSON with [master] log_format in a `baton run` config"
_STRICT = "no equivalent: Baton reads requests strictly and does not relax it (see the README)"
_STATSD = "no StatsD: Prometheus metrics are served at /metrics by [master] health in a `baton run` config"
_PASTE = "no PasteDeploy: name the WSGI callable, MODULE:CALLABLE, or a factory, MODULE:FACTORY()"
GUNICORN_ONLY: dict[str, str] = {
    "-k": "Baton has one worker kind: a process with threads; use --threads N (and -w N)",
    "--worker-class": "Baton has one worker kind: a process with threads; use --threads N (and -w N)",
    "--worker-connections": "no equivalent: workers are threaded, not async; --threads N sets how many "
                            "requests one worker serves at once",
    "-D": "Baton stays in the foreground: run it under systemd instead (etc/baton.service)",
    "--daemon": "Baton stays in the foreground: run it under systemd instead (etc/baton.service)",
    "--ssl-version": _TLS, "--cert-reqs": _TLS,
    "--ciphers": _TLS, "--do-handshake-on-connect": _TLS, "--suppress-ragged-eofs": _TLS,
    "--capture-output": _STDIO, "-R": _STDIO, "--enable-stdio-inheritance": _STDIO,
    "--statsd-host": _STATSD, "--statsd-prefix": _STATSD, "--dogstatsd-tags": _STATSD,
    "--paste": _PASTE, "--paster": _PASTE, "--paste-global": _PASTE,
    "--reload-engine": "no choice to make: --reload always watches through Baton's watcher process (watchdog)",
    "--reuse-port": "use --mode reuseport: every worker gets its own SO_REUSEPORT socket",
    "--initgroups": "not needed: with -u, the workers always get that user's supplementary groups",
    "--worker-tmp-dir": "not needed: workers send heartbeats over their channel, no temporary file",
    "--no-sendfile": "no equivalent: a wsgi.file_wrapper response is always sent with sendfile",
    "-n": "no equivalent: Baton titles its processes itself (baton: master, baton: worker ...)",
    "--name": "no equivalent: Baton titles its processes itself (baton: master, baton: worker ...)",
    "--spew": "no equivalent",
    "--check-config": "no equivalent for flags (they are checked at start); `baton check -c FILE` checks a config",
    "--print-config": "no equivalent; `baton ctl status` shows what runs",
    "--logger-class": _LOGCONF, "--log-config": _LOGCONF, "--log-config-json": _LOGCONF,
    "--log-config-dict": _LOGCONF,
    "--log-syslog": _SYSLOG, "--log-syslog-to": _SYSLOG, "--log-syslog-prefix": _SYSLOG,
    "--log-syslog-facility": _SYSLOG, "--disable-redirect-access-to-syslog": _SYSLOG,
    "--strip-header-spaces": _STRICT, "--permit-unconventional-http-method": _STRICT,
    "--permit-unconventional-http-version": _STRICT, "--casefold-http-method": _STRICT,
    "--permit-obsolete-folding": _STRICT, "--header-map": _STRICT, "--forwarder-headers": _STRICT,
}


class UsageError(Exception):
    """A `baton serve` command line Baton cannot run: one line for the user (exit 2)."""


# -- the parser --------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    """`baton serve`'s arguments. Every default is SUPPRESS, so a parsed namespace
    holds only what was given: that is what lets a later source override an earlier."""
    parser.add_argument("module", nargs="?", default=argparse.SUPPRESS, metavar="MODULE[:CALLABLE]",
                        help=f"the WSGI app: MODULE (meaning MODULE:{DEFAULT_CALLABLE}), MODULE:CALLABLE "
                             "or a factory, MODULE:FACTORY()")
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"TOML file whose [{FILE_TABLE}] table gives defaults: the long flag names "
                             "with _ for - (flags and $" + ENV_ARGS + " win)")
    for option in OPTIONS:
        kwargs: dict = {"dest": option.key, "default": argparse.SUPPRESS, "help": option.help}
        if option.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = option.metavar or option.key.upper()
            kwargs["type"] = {"int": int, "float": float}.get(option.kind, str)
            if option.kind in ("list", "env"):
                kwargs["action"] = "append"
            if option.choices:
                kwargs["choices"] = option.choices
                kwargs.pop("metavar")
        parser.add_argument(*option.flags, **kwargs)


def unknown_flag(extras: list[str], where: str = "baton serve") -> str:
    """The one line for arguments argparse did not take (`parse_known_args`'s extras)."""
    for token in extras:
        if token.startswith("-") and token != "-":
            flag = token.split("=", 1)[0] if token.startswith("--") else token[:2]
            advice = GUNICORN_ONLY.get(flag)
            if advice is not None:
                return f"{where}: {flag} (gunicorn): {advice}"
            return f"{where}: unknown flag {flag}; `baton serve --help` lists them"
    return f"{where}: unexpected argument {extras[0]!r}: give one MODULE[:CALLABLE]"


def env_args(environ: dict[str, str], build_parser) -> dict:
    """The settings in $BATON_CMD_ARGS, parsed by a fresh `baton serve` parser."""
    text = environ.get(ENV_ARGS, "")
    if not text.strip():
        return {}
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{ENV_ARGS}: cannot split it as a shell would: {exc}") from None
    parser = build_parser(ENV_ARGS)
    namespace, extras = parser.parse_known_args(argv)
    if extras:
        raise UsageError(unknown_flag(extras, ENV_ARGS))
    return vars(namespace)


# -- the -c file ---------------------------------------------------------------------


def read_file(path: str) -> dict:
    """The settings of a `-c FILE`: its [serve] table, checked key by key (ConfigError
    lists every problem, each naming the file and the key)."""
    if path.endswith(".py"):
        raise ConfigError([f"{path}: a gunicorn.conf.py is Python; Baton reads TOML: put the same settings, "
                           f"named as the long flags with _ for -, in a [{FILE_TABLE}] table"])
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read it: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return file_settings(data, path)


def file_settings(data: dict, path: str) -> dict:
    """Pure half of `read_file`: the settings of a parsed -c file."""
    problems = Problems(path)
    if FILE_TABLE not in data and ("apps" in data or "listeners" in data):
        raise ConfigError([f"{path}: this is a `baton run` config (it has [apps] or [listeners]): "
                           f"run it with `baton run -c {path}`, or put `baton serve`'s settings in [{FILE_TABLE}]"])
    top = Table(problems, (), data)
    table = top.section(FILE_TABLE)
    settings: dict = {}
    value = table.raw("module")
    if value is not MISSING:
        if is_text(value):
            settings["module"] = value
        else:
            problems.expected(table.key + ("module",), "a string, MODULE[:CALLABLE]", value)
    for option in OPTIONS:
        value = table.raw(option.key)
        if value is not MISSING:
            checked = _file_value(option, value)
            if checked is None:
                problems.expected(table.key + (option.key,), _FILE_KINDS[option.kind], value)
            else:
                settings[option.key] = checked
    table.finish()
    top.finish()
    if problems.lines:
        raise ConfigError(problems.lines)
    return settings


_FILE_KINDS = {
    "int": "an integer", "float": "a number", "str": "a non-empty string", "bool": "true or false",
    "list": "a string or an array of strings", "csv": "a comma-separated string or an array of strings",
    "env": "a table of strings, KEY = \"VALUE\"",
}


def _file_value(option: Option, value):
    """The value as argparse would have produced it, or None when it has the wrong type."""
    kind = option.kind
    if kind == "int":
        return value if is_int(value) else None
    if kind == "float":
        return float(value) if is_number(value) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "str":
        if not is_text(value) or (option.choices and value not in option.choices):
            return None
        return value
    if kind in ("list", "csv"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(is_text(item) for item in items):
            return None
        return list(items) if kind == "list" else ",".join(items)
    if kind == "env":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            return None
        return [f"{name}={text}" for name, text in value.items()]
    raise AssertionError(kind)


# -- merging and mapping (pure) -------------------------------------------------------


def merge(*sources: dict) -> dict:
    """Later sources win; `env` entries merge by name."""
    merged: dict = {}
    for source in sources:
        for key, value in source.items():
            if key == "env" and "env" in merged:
                merged["env"] = merged["env"] + list(value)
            else:
                merged[key] = value
    return merged


def app_spec(module: str) -> str:
    """gunicorn's rule: a spec without a callable names `application` in the module."""
    return module if ":" in module else f"{module}:{DEFAULT_CALLABLE}"


def bind_spec(spec: str) -> str:
    """gunicorn's bind forms in Baton's: "tcp://" dropped, a bare host gets port 8000."""
    spec = spec.removeprefix("tcp://")
    if spec.startswith(("unix:", "fd://", "systemd:")):
        return spec
    if spec.startswith("[") and spec.endswith("]"):
        return f"{spec}:{DEFAULT_PORT}"
    if spec and ":" not in spec and not spec.isdigit():
        return f"{spec}:{DEFAULT_PORT}"
    return spec


def env_entries(entries: list[str]) -> dict[str, str]:
    env = {}
    for entry in entries:
        name, equals, value = entry.partition("=")
        if not equals or not name:
            raise UsageError(f"baton serve: -e/--env: expected KEY=VALUE, found {entry!r}")
        env[name] = value
    return env


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def mapping(settings: dict, cwd: str) -> dict:
    """The config `reader.from_mapping` reads (relative paths resolve against `cwd`):
    one listener per bind, all of one mode, and one app named `APP_NAME`."""
    if "module" not in settings:
        raise UsageError("baton serve: expected the app, MODULE[:CALLABLE] (or `module` in the -c file's "
                         f"[{FILE_TABLE}] table)")
    binds = [bind_spec(spec) for spec in settings.get("bind") or [DEFAULT_BIND]]
    listener: dict = {}
    _copy(settings, listener, mode="mode", backlog="backlog", proxy_protocol="proxy_protocol")
    if "proxy_allow_from" in settings:
        listener["proxy_allow_ips"] = _csv(settings["proxy_allow_from"])
    if "certfile" in settings or "keyfile" in settings:
        listener["tls"] = True
    chdir = settings.get("chdir") or cwd
    app: dict = {"module": app_spec(settings["module"]), "listeners": [f"bind{i}" for i in range(len(binds))],
                 "chdir": chdir}
    _copy(settings, app, workers="workers", threads="threads", user="user", group="group", umask="umask",
          timeout="timeout", keepalive="keep_alive", max_requests="max_requests",
          max_requests_jitter="max_requests_jitter", preload="preload", limit_request_line="limit_request_line",
          limit_request_fields="limit_request_fields", limit_request_field_size="limit_request_field_size")
    if "env" in settings:
        app["env"] = env_entries(settings["env"])
    if "forwarded_allow_ips" in settings:
        app["forwarded_allow_ips"] = _csv(settings["forwarded_allow_ips"])
    if "pythonpath" in settings:
        app["pythonpath"] = _csv(settings["pythonpath"])
    _copy(settings, app, certificate="certfile", private_key="keyfile", client_ca="ca_certs")
    reload_on = ([RELOAD_GLOB] if settings.get("reload") else []) + list(settings.get("reload_extra_file") or [])
    if reload_on:
        app["reload_on"] = reload_on
    master: dict = {}
    _copy(settings, master, graceful_timeout="graceful_timeout", pidfile="pid", access_log="access_logfile",
          access_log_format="access_logformat", error_log="error_logfile", log_level="log_level",
          control_socket="control_socket")
    return {
        "master": master,
        "listeners": {f"bind{i}": {"bind": spec, **listener} for i, spec in enumerate(binds)},
        "apps": {APP_NAME: app},
    }


def _copy(settings: dict, into: dict, **keys: str) -> None:
    for config_key, setting in keys.items():
        if setting in settings:
            into[config_key] = settings[setting]


# Which flag a problem with a config key came from, to name it in the message.
_KEY_FLAGS = {
    "master.graceful_timeout": "graceful_timeout", "master.pidfile": "pid", "master.access_log": "access_logfile",
    "master.access_log_format": "access_logformat", "master.error_log": "error_logfile",
    "master.log_level": "log_level", "master.control_socket": "control_socket",
    "bind": "bind", "mode": "mode", "backlog": "backlog", "proxy_protocol": "proxy_protocol",
    "proxy_allow_ips": "proxy_allow_from",
    f"apps.{APP_NAME}.keepalive": "keep_alive", f"apps.{APP_NAME}.env": "env",
    f"apps.{APP_NAME}.reload_on": "reload_extra_file",
    f"apps.{APP_NAME}.certificate": "certfile", f"apps.{APP_NAME}.private_key": "keyfile",
    f"apps.{APP_NAME}.client_ca": "ca_certs",
}
_PROBLEM = re.compile(re.escape(COMMAND_LINE) + r": (?P<key>[^:\s]+): (?P<message>.*)", re.S)


def explain(problem: str) -> str:
    """A reader problem about the serve mapping, with the flag named instead of the key:
    "<command line>: apps.app.workers: expected ..." -> "baton serve: -w/--workers: expected ..."."""
    match = _PROBLEM.fullmatch(problem)
    if match is None:
        return problem
    key = re.sub(r"\[\d+\]", "", match["key"])
    parts = key.split(".")
    if parts[0] == "listeners" and len(parts) >= 3:
        key = parts[2]
    elif parts[:2] == ["apps", APP_NAME] and len(parts) >= 3:
        key = ".".join(parts[:3])
    setting = _KEY_FLAGS.get(key) or (parts[2] if parts[:2] == ["apps", APP_NAME] and len(parts) >= 3 else None)
    if setting == "module":
        return f"baton serve: MODULE: {match['message']}"
    option = _BY_KEY.get(setting) if setting else None
    if option is None:
        return f"baton serve: {match['key']}: {match['message']}"
    return f"baton serve: {option.label}: {match['message']}"


# -- where its control socket lives ------------------------------------------------------


def control_socket_dirs(euid: int | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """Where `baton serve` puts its default control socket (the first) and where
    `baton ctl` looks for one: $XDG_RUNTIME_DIR/baton when it is set, /run/baton as
    root, else a baton-UID directory in the temporary directory."""
    euid = os.geteuid() if euid is None else euid
    environ = os.environ if environ is None else environ
    dirs = []
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        dirs.append(os.path.join(runtime, "baton"))
    dirs.append("/run/baton" if euid == 0 else os.path.join(tempfile.gettempdir(), f"baton-{euid}"))
    return dirs


def control_socket_dir(euid: int | None = None, environ: dict[str, str] | None = None) -> str:
    return control_socket_dirs(euid, environ)[0]


def control_socket_name(first_bind: str, cwd: str) -> str:
    """serve-PORT.ctl for a TCP bind; serve-NAME.ctl for unix:.../NAME, fd://N, systemd:NAME."""
    bind = parse_bind(bind_spec(first_bind), cwd)
    if bind.kind == "tcp":
        tag = str(bind.port)
    elif bind.kind == "unix":
        tag = os.path.basename(bind.path)
    elif bind.kind == "fd":
        tag = f"fd{bind.fd}"
    else:
        tag = bind.fdname
    return f"serve-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}.ctl"


def default_control_socket(settings: dict, cwd: str) -> str:
    """The control socket path for settings that name none, its directory made (0700)
    and checked to be ours and closed to others, so no one can plant a socket in it."""
    directory = control_socket_dir()
    try:
        name = control_socket_name((settings.get("bind") or [DEFAULT_BIND])[0], cwd)
    except ValueError:
        return os.path.join(directory, "serve.ctl")   # the reader names the bad bind
    path = os.path.join(directory, name)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(f"baton serve: the control socket path {path!r} is too long; give --control-socket PATH")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        raise UsageError(f"baton serve: cannot make {directory} for the control socket: {exc.strerror or exc}; "
                         "give --control-socket PATH") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise UsageError(f"baton serve: {directory} is not a directory only we may write to; "
                         "give --control-socket PATH")
    return path
