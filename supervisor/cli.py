"""Command line: `baton run`, `baton serve`, `baton check`, `baton ctl`.

The only place that turns errors into exit statuses; everything below raises.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from supervisor import __version__
from supervisor.config import reader as config_mod
from supervisor.config.model import ConfigError
from supervisor.ipc.handoff import HandoffError
from supervisor.master.control import (
    DEFAULT_CALL_TIMEOUT_S,
    ControlClient,
    ControlError,
    ControlUnreachable,
)
from supervisor.master.process import Master
from supervisor.system import log as log_mod
from supervisor.system.listeners import ListenerError
from supervisor.system.privileges import PrivilegeError

DEFAULT_CONFIG = os.path.join("etc", "baton.toml")
EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2   # `baton ctl`: answered ok / answered not ok / no answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Serve WSGI apps; reload without dropping a request.")
    parser.add_argument("--version", action="version", version=f"baton {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the master in the foreground")
    run.add_argument("-c", "--config", default=None, help=f"config file (default: {DEFAULT_CONFIG})")
    run.add_argument("--takeover", metavar="SOCKET",
                     help="take the listening sockets over from the master whose takeover socket this is"
                          " (the control socket's path plus .takeover), then let it drain")

    check = commands.add_parser("check", help="validate a config file; print every error")
    check.add_argument("-c", "--config", default=None, help=f"config file (default: {DEFAULT_CONFIG})")

    serve = commands.add_parser("serve", help="serve one app without a config file, like `gunicorn module:app`")
    serve.add_argument("module", metavar="MODULE:CALLABLE")
    serve.add_argument("-b", "--bind", action="append", metavar="ADDR",
                       help="HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N; repeatable (default 127.0.0.1:8000)")
    serve.add_argument("-w", "--workers", type=int, default=1)
    serve.add_argument("--threads", type=int, default=1)
    serve.add_argument("-u", "--user")
    serve.add_argument("-g", "--group")
    serve.add_argument("--chdir", default=None, help="directory to import the app from (default: the current one)")
    serve.add_argument("--access-log", default=None, metavar="FILE", help="'-' for stdout")
    serve.add_argument("--log-level", default="info")

    _add_ctl(commands)
    return parser


def _add_ctl(commands) -> None:
    ctl = commands.add_parser("ctl", help="talk to a running master over its control socket",
                              description="Exit status: 0 when the master says ok, 1 when it refuses "
                                          "(errors on stderr), 2 when it cannot be reached.")
    where = ctl.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", default=None,
                       help=f"the master's config file, to find its control socket (default: {DEFAULT_CONFIG})")
    where.add_argument("--socket", default=None, metavar="PATH", help="the control socket itself")
    ctl.add_argument("--json", action="store_true", help="print the master's answer as JSON")
    ctl.add_argument("--timeout", type=float, default=DEFAULT_CALL_TIMEOUT_S, metavar="SECONDS",
                     help=f"how long to wait for the answer (default: {DEFAULT_CALL_TIMEOUT_S:g})")
    actions = ctl.add_subparsers(dest="action", required=True, metavar="COMMAND")
    actions.add_parser("status", help="the master, every app and its workers, every listener")
    actions.add_parser("stats", help="the master's counters")
    actions.add_parser("reload", help="re-read the config and apply the difference (like SIGHUP)")
    restart = actions.add_parser("restart", help="start a new generation of one app's workers")
    restart.add_argument("app", metavar="APP")
    scale = actions.add_parser("scale", help="set how many workers an app runs")
    scale.add_argument("app", metavar="APP")
    scale.add_argument("workers", type=int, metavar="N")
    stop = actions.add_parser("stop", help="stop the master: gracefully, or --now")
    stop.add_argument("--now", action="store_true", help="do not wait for running requests")
    actions.add_parser("upgrade", help="start a new master that takes over the listeners (like SIGUSR2)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ctl":
        return _ctl(args)
    try:
        if args.command == "check":
            config = config_mod.load(_config_path(args.config))
            print(f"{config.path}: ok ({len(config.apps)} apps, {len(config.listeners)} listeners)")
            return 0
        if args.command == "run":
            return _run_master(config_mod.load(_config_path(args.config)), takeover=args.takeover)
        if args.command == "serve":
            return _run_master(config_mod.from_mapping(_serve_mapping(args), None, base_dir=os.getcwd()))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except (ListenerError, PrivilegeError, ControlError, HandoffError) as exc:
        print(f"baton: {exc}", file=sys.stderr)
        return 1
    return 2


def _config_path(given: str | None) -> str:
    return given if given is not None else DEFAULT_CONFIG


def _serve_mapping(args) -> dict:
    binds = args.bind or ["127.0.0.1:8000"]
    app = {
        "module": args.module,
        "listeners": [f"bind{i}" for i in range(len(binds))],
        "workers": args.workers,
        "threads": args.threads,
        "chdir": args.chdir or os.getcwd(),
    }
    if args.user:
        app["user"] = args.user
    if args.group:
        app["group"] = args.group
    master = {"log_level": args.log_level}
    if args.access_log:
        master["access_log"] = args.access_log
    return {
        "master": master,
        "listeners": {f"bind{i}": {"bind": spec} for i, spec in enumerate(binds)},
        "apps": {"app": app},
    }


def _run_master(config, takeover: str | None = None) -> int:
    master_cfg = config.master
    logs = log_mod.setup(master_cfg.log_level, master_cfg.error_log, master_cfg.access_log,
                         log_format=master_cfg.log_format, access_log_format=master_cfg.access_log_format)
    return Master(config, logs, takeover=takeover).run()


# -- baton ctl ----------------------------------------------------------------


def _ctl(args) -> int:
    try:
        path = args.socket or config_mod.control_socket_of_file(_config_path(args.config))
        response = ControlClient(path, timeout_s=args.timeout).call(args.action, **_ctl_arguments(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("baton: cannot tell where the master's control socket is; give --socket PATH", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlUnreachable as exc:
        print(f"baton: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(response, indent=2))
    elif response["ok"]:
        print(format_response(args.action, response))
    if not response["ok"]:
        if not args.json:
            for line in response.get("errors") or ["the master refused without saying why"]:
                print(line, file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _ctl_arguments(args) -> dict:
    if args.action == "restart":
        return {"app": args.app}
    if args.action == "scale":
        return {"app": args.app, "workers": args.workers}
    if args.action == "stop":
        return {"now": args.now}
    return {}


def format_response(action: str, response: dict) -> str:
    """A successful answer as a person reads it."""
    if action == "status":
        return format_status(response)
    if action == "stats":
        return format_stats(response)
    return str(response.get("message") or "ok")


def format_status(response: dict) -> str:
    """The master line, then tables: apps, their workers, listeners. Missing fields show '-'."""
    master = response.get("master") or {}
    lines = [f"master pid {_cell(master.get('pid'))}, config {_cell(master.get('config'))}, "
             f"up {_duration(master.get('uptime_s'))}, {_cell(master.get('reloads'))} reloads, "
             f"{_cell(master.get('generation_switches'))} generation switches"]
    apps = response.get("apps") or []
    lines += ["", *_table(("APP", "GEN", "WORKERS", "USER"), [
        (app.get("name"), app.get("generation"), f"{len(app.get('workers') or [])}/{_cell(app.get('target'))}",
         app.get("user")) for app in apps])]
    workers = [(app.get("name"), worker) for app in apps for worker in (app.get("workers") or [])]
    if workers:
        lines += ["", *_table(("APP", "PID", "#", "GEN", "STATE", "REQUESTS", "CONNS", "BUSY", "RSS", "UP"), [
            (name, w.get("pid"), w.get("index"), w.get("generation"), w.get("state"), w.get("requests"),
             w.get("connections"), w.get("busy"), _size_kb(w.get("rss_kb")), _duration(w.get("uptime_s")))
            for name, w in workers])]
    listeners = response.get("listeners") or []
    lines += ["", *_table(("LISTENER", "ADDRESS", "MODE", "QUEUE"), [
        (listener.get("name"), listener.get("address"), listener.get("mode"), listener.get("queue"))
        for listener in listeners])]
    return "\n".join(lines)


def format_stats(response: dict) -> str:
    counters = response.get("counters") or {}
    width = max((len(name) for name in counters), default=0)
    return "\n".join(f"{name:<{width}}  {_cell(counters[name])}" for name in sorted(counters))


def _table(headers: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """Columns two spaces apart; numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows) and bool(rows)
               for i in range(len(headers))]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]

    def line(values) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()
    return [line(headers)] + [line(row) for row in cells]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _duration(seconds) -> str:
    """12.5 -> "12s", 185 -> "3m05s", 7500 -> "2h05m", 97200 -> "1d03h"."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _size_kb(kb) -> str:
    if not isinstance(kb, (int, float)) or isinstance(kb, bool):
        return "-"
    if kb < 1024:
        return f"{kb:g}K"
    if kb < 1024 * 1024:
        return f"{kb / 1024:.1f}M"
    return f"{kb / 1024 / 1024:.1f}G"
