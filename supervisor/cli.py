"""Command line: `baton run`, `baton serve`, `baton check`.

The only place that turns errors into exit statuses; everything below raises.
"""
from __future__ import annotations

import argparse
import os
import sys

from supervisor import __version__, config as config_mod, log as log_mod
from supervisor.config import ConfigError
from supervisor.listeners import ListenerError
from supervisor.master import Master
from supervisor.privileges import PrivilegeError

DEFAULT_CONFIG = os.path.join("etc", "baton.toml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Serve WSGI apps; reload without dropping a request.")
    parser.add_argument("--version", action="version", version=f"baton {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the master in the foreground")
    run.add_argument("-c", "--config", default=None, help=f"config file (default: {DEFAULT_CONFIG})")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            config = config_mod.load(_config_path(args.config))
            print(f"{config.path}: ok ({len(config.apps)} apps, {len(config.listeners)} listeners)")
            return 0
        if args.command == "run":
            return _run_master(config_mod.load(_config_path(args.config)))
        if args.command == "serve":
            return _run_master(config_mod.from_mapping(_serve_mapping(args), None, base_dir=os.getcwd()))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except (ListenerError, PrivilegeError) as exc:
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


def _run_master(config) -> int:
    master_cfg = config.master
    logs = log_mod.setup(master_cfg.log_level, master_cfg.error_log, master_cfg.access_log)
    return Master(config, logs).run()
