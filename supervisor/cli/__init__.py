"""Command line: `baton run`, `baton serve`, `baton check`, `baton ctl`.

The only place that turns errors into exit statuses; everything below raises.
`serve` turns gunicorn-style flags into a config, `ctl` talks to a running master.
"""
from __future__ import annotations

import argparse
import os
import sys

from supervisor import __version__
from supervisor.cli import ctl as ctl_mod
from supervisor.cli import serve as serve_mod
from supervisor.cli.ctl import (  # noqa: F401
    DEFAULT_CONFIG,
    format_response,
    format_stats,
    format_status,
)
from supervisor.config import reader as config_mod
from supervisor.config.model import ConfigError
from supervisor.ipc.handoff import HandoffError
from supervisor.master.control import ControlError
from supervisor.master.process import Master
from supervisor.system import log as log_mod
from supervisor.system.listeners import ListenerError
from supervisor.system.privileges import PrivilegeError
from supervisor.system.words import count as counted
from supervisor.worker import access as worker_access

EXIT_USAGE = 2   # argparse's status for a command line it cannot take


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

    serve = commands.add_parser("serve", help="serve one app without a config file, like `gunicorn module:app`",
                                description=_SERVE_DESCRIPTION, allow_abbrev=False)
    serve.add_argument("--version", action="version", version=f"baton {__version__}")
    serve_mod.add_options(serve)

    worker = commands.add_parser("worker", help="serve an app as a worker attached to a running master",
                                 description="Attach to an app's attach socket and serve it as one of its workers: "
                                             "this process's own Python, code and user (see README, "
                                             "\"Workers from elsewhere\").")
    worker.add_argument("--attach", required=True, metavar="PATH", help="the app's attach socket")
    worker.add_argument("--tag", default=os.environ.get("BATON_TAG", ""),
                        help="this worker's version tag, for blue/green deploys (default: $BATON_TAG, or \"\")")
    worker.add_argument("--app", default="", help="the app it serves (default: the socket's)")
    worker.add_argument("module", metavar="MODULE:APP", help="the WSGI app, as in config (pkg.mod:app)")

    ctl_mod.add_parser(commands)
    return parser


_SERVE_DESCRIPTION = (f"Serve one WSGI app, as `gunicorn` would, with gunicorn's flag names. Settings come from "
                      f"-c FILE's [{serve_mod.FILE_TABLE}] table, then ${serve_mod.ENV_ARGS} (shell-split), "
                      "then these flags; the later wins.")


def _serve_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, add_help=False)
    serve_mod.add_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extras = build_parser().parse_known_args(argv)
    if extras and args.command != "serve":
        build_parser().parse_args(argv)   # argparse's own message and exit status 2
    if args.command == "ctl":
        return ctl_mod.run(args)
    if args.command == "worker":
        # A worker needs nothing of the master's.
        from supervisor.worker import attach as attach_mod
        return attach_mod.main(args.attach, args.module, args.tag, args.app)
    try:
        if args.command == "check":
            config = config_mod.load(_config_path(args.config))
            worker_access.require_readable(config)   # each app's paths, judged as its user
            print(f"{config.path}: ok ({counted(len(config.apps), 'app')}, {counted(len(config.listeners), 'listener')})")
            return 0
        if args.command == "run":
            return _run_master(config_mod.load(_config_path(args.config)), takeover=args.takeover)
        if args.command == "serve":
            return _serve(args, extras)
    except serve_mod.UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        for problem in exc.problems:
            print(serve_mod.explain(problem), file=sys.stderr)
        return 1
    except (ListenerError, PrivilegeError, ControlError, HandoffError) as exc:
        print(f"baton: {exc}", file=sys.stderr)
        return 1
    return 2


def _config_path(given: str | None) -> str:
    return given if given is not None else DEFAULT_CONFIG


def _serve(args, extras: list[str]) -> int:
    return _run_master(_serve_config(args, extras, dict(os.environ), os.getcwd()))


def serve_config(argv: list[str], environ: dict[str, str], cwd: str):
    """The config `baton serve ARGV` runs, with $BATON_CMD_ARGS read from `environ`
    (raises UsageError or ConfigError as `main` reports them)."""
    args, extras = build_parser().parse_known_args(["serve", *argv])
    return _serve_config(args, extras, environ, cwd)


def _serve_config(args, extras: list[str], environ: dict[str, str], cwd: str):
    if extras:
        raise serve_mod.UsageError(serve_mod.unknown_flag(extras))
    given = {key: value for key, value in vars(args).items() if key != "command"}
    from_env = serve_mod.env_args(environ, _serve_parser)
    config_file = given.get("config", from_env.get("config"))
    from_file = serve_mod.read_file(config_file) if config_file else {}
    settings = serve_mod.merge(from_file, from_env, given)
    mapping = serve_mod.mapping(settings, cwd)
    if "control_socket" not in settings:
        mapping["master"]["control_socket"] = serve_mod.default_control_socket(settings, cwd)
    return config_mod.from_mapping(mapping, None, base_dir=cwd)


def _run_master(config, takeover: str | None = None) -> int:
    master_cfg = config.master
    logs = log_mod.setup(master_cfg.log_level, master_cfg.error_log, master_cfg.access_log,
                         log_format=master_cfg.log_format, access_log_format=master_cfg.access_log_format)
    return Master(config, logs, takeover=takeover).run()
