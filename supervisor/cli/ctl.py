"""`baton ctl`: talk to a running master over its control socket.

Its own flags (`--socket`, `-c`, `--json`, `--timeout`) are accepted before the
action and after it (`baton ctl stats --json`); given in both places, the later wins.
Without `--socket` or `-c`, the socket is found from etc/baton.toml when that file
exists, else the one live `baton serve` socket in the first of `serve.control_socket_dirs()`
that has any.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import sys

from supervisor import __version__
from supervisor.cli import serve as serve_mod
from supervisor.config import reader as config_mod
from supervisor.config.model import ConfigError
from supervisor.master.control import (
    DEFAULT_CALL_TIMEOUT_S,
    ControlClient,
    ControlUnreachable,
)

DEFAULT_CONFIG = os.path.join("etc", "baton.toml")
EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2   # answered ok / answered not ok / no answer

RELOAD_HELP = ("re-read the config file and restart every app as a new generation, like SIGHUP: the new "
               "workers boot beside the serving ones, routing switches once all are ready, the old ones "
               "finish their requests and hand over their idle connections. A config that does not "
               "validate changes nothing (the errors are printed). Saving the config file reloads too, "
               "but restarts only the apps whose settings changed. `baton serve` has no config file: "
               "there it (and SIGHUP) restarts the app, its code imported afresh.")


def _global_flags(top: bool) -> argparse.ArgumentParser:
    """The flags every `baton ctl` action takes; after the action (top False) they
    default to SUPPRESS, so one not repeated there keeps the value given before it."""
    flags = argparse.ArgumentParser(add_help=False)
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    flags.add_argument("-c", "--config", default=default(None),
                       help=f"the master's config file, to find its control socket (default: {DEFAULT_CONFIG})")
    flags.add_argument("--socket", default=default(None), metavar="PATH", help="the control socket itself")
    flags.add_argument("--json", action="store_true", default=default(False),
                       help="print the master's answer as JSON")
    flags.add_argument("--timeout", type=float, default=default(DEFAULT_CALL_TIMEOUT_S), metavar="SECONDS",
                       help=f"how long to wait for the answer (default: {DEFAULT_CALL_TIMEOUT_S:g})")
    return flags


def add_parser(commands) -> None:
    ctl = commands.add_parser("ctl", help="talk to a running master over its control socket",
                              parents=[_global_flags(top=True)],
                              description="Exit status: 0 when the master says ok, 1 when it refuses "
                                          "(errors on stderr), 2 when it cannot be reached.")
    ctl.add_argument("--version", action="version", version=f"baton {__version__}")
    actions = ctl.add_subparsers(dest="action", required=True, metavar="COMMAND")
    after = [_global_flags(top=False)]

    def action(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=help, description=description or help, parents=after)

    action("status", "the master, every app and its workers, every listener")
    action("stats", "the master's counters")
    action("reload", "restart every app as a new generation from the config file (like SIGHUP)", RELOAD_HELP)
    restart = action("restart", "start a new generation of one app's workers")
    restart.add_argument("app", metavar="APP")
    scale = action("scale", "set how many workers an app runs")
    scale.add_argument("app", metavar="APP")
    scale.add_argument("workers", type=int, metavar="N")
    stop = action("stop", "stop the master: gracefully, or --now")
    stop.add_argument("--now", action="store_true", help="do not wait for running requests")
    action("upgrade", "start a new master that takes over the listeners (like SIGUSR2)")
    promote = action("promote", "route an app's attached workers of TAG; the others stand by (blue/green)",
                     "Route the app's attached workers of TAG (those ready); workers of its other tags stand by, "
                     "handing their kept connections back as they go idle. Rolling back is promoting the old tag.")
    promote.add_argument("app", metavar="APP")
    promote.add_argument("tag", metavar="TAG")


def run(args) -> int:
    if args.config is not None and args.socket is not None:
        print("baton ctl: give either -c/--config or --socket, not both", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        path = args.socket or _socket_of(args.config)
        response = ControlClient(path, timeout_s=args.timeout).call(args.action, **_arguments(args))
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


def _socket_of(config: str | None) -> str:
    if config is not None or os.path.exists(DEFAULT_CONFIG):
        return config_mod.control_socket_of_file(config or DEFAULT_CONFIG)
    directories = serve_mod.control_socket_dirs()
    for directory in directories:
        live = [path for path in sorted(glob.glob(os.path.join(glob.escape(directory), "serve-*.ctl")))
                if _answers(path)]
        if len(live) == 1:
            return live[0]
        if live:
            raise ConfigError([f"baton: {len(live)} `baton serve` masters run ({', '.join(live)}): "
                               "give --socket PATH"])
    raise ConfigError([f"baton: no {DEFAULT_CONFIG} here and no `baton serve` answers in "
                       f"{' or '.join(directories)}"])


def _answers(path: str) -> bool:
    """Whether someone listens on the socket at `path` (a leftover of a killed master does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _arguments(args) -> dict:
    if args.action == "restart":
        return {"app": args.app}
    if args.action == "scale":
        return {"app": args.app, "workers": args.workers}
    if args.action == "stop":
        return {"now": args.now}
    if args.action == "promote":
        return {"app": args.app, "tag": args.tag}
    return {}


def format_response(action: str, response: dict) -> str:
    """A successful answer as a person reads it."""
    if action == "status":
        return format_status(response)
    if action == "stats":
        return format_stats(response)
    return str(response.get("message") or "ok")


def format_status(response: dict) -> str:
    """The master line, then tables: apps, their workers, listeners, balancers. Missing
    fields show '-'."""
    master = response.get("master") or {}
    lines = [f"master pid {_cell(master.get('pid'))}, config {_cell(master.get('config'))}, "
             f"up {_duration(master.get('uptime_s'))}, {_cell(master.get('reloads'))} reloads, "
             f"{_cell(master.get('generation_switches'))} generation switches"]
    apps = response.get("apps") or []
    lines += ["", *_table(("APP", "GEN", "WORKERS", "USER"), [
        (app.get("name"), app.get("generation"), f"{len(app.get('workers') or [])}/{_cell(app.get('target'))}",
         app.get("user")) for app in apps])]
    # A preloaded app's template (# "T") is listed before the workers it forks.
    workers = [(app.get("name"), {**template, "index": "T"}) for app in apps for template in (app.get("templates") or [])]
    workers += [(app.get("name"), worker) for app in apps for worker in (app.get("workers") or [])]
    if workers:
        # PSS (a share of each shared page) and private dirty memory, when the master could read them.
        shares = any(w.get("pss_kb") is not None for _, w in workers)
        headers = ("APP", "PID", "#", "GEN", "STATE", "REQUESTS", "CONNS", "BUSY", "RSS",
                   *(("PSS", "PRIVATE") if shares else ()), "UP")
        lines += ["", *_table(headers, [
            (name, w.get("pid"), w.get("index"), w.get("generation"), w.get("state"), w.get("requests"),
             w.get("connections"), w.get("busy"), _size_kb(w.get("rss_kb")),
             *((_size_kb(w.get("pss_kb")), _size_kb(w.get("private_dirty_kb"))) if shares else ()),
             _duration(w.get("uptime_s")))
            for name, w in workers])]
    attached = [(app.get("name"), worker) for app in apps for worker in (app.get("attached") or [])]
    if attached:
        # The pid and uid as SO_PEERCRED saw them (pid 0: in a PID namespace the master cannot see).
        lines += ["", *_table(("APP", "ATTACHED PID", "UID", "TAG", "STATE", "REQUESTS", "CONNS", "UP"), [
            (name, w.get("pid"), w.get("uid"), w.get("tag") or '""', w.get("state"), w.get("requests"),
             w.get("connections"), _duration(w.get("uptime_s")))
            for name, w in attached])]
    listeners = response.get("listeners") or []
    lines += ["", *_table(("LISTENER", "ADDRESS", "MODE", "QUEUE"), [
        (listener.get("name"), listener.get("address"), listener.get("mode"), listener.get("queue"))
        for listener in listeners])]
    balancers = response.get("balancers") or []
    if balancers:
        lines += ["", *_table(("BALANCER", "PID", "ACCEPTED", "UP"), [
            (b.get("name"), b.get("pid"), b.get("accepted"), _duration(b.get("uptime_s"))) for b in balancers])]
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
