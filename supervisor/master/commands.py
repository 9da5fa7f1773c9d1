"""What the master can be asked to do, from a signal or from `baton ctl`, checked first.

`SIGNALS` maps each signal the master handles to a command, the way gunicorn users
expect (see the README's table). `Commands.run` checks a command's arguments against
its spec before anything runs, so a wrong argument is an answer ("scale: 'workers':
expected an integer >= 1, found string '3'"), never a TypeError; an error raised
*inside* a command is a bug, and propagates with its traceback to whoever asked (the
control socket logs it and answers "internal error"; the signal path logs it), and the
master lives on.
"""
from __future__ import annotations

import signal
from typing import Any

from supervisor.master import control

SIGNALS: dict[int, tuple[str, dict]] = {
    signal.SIGTERM: ("stop", {}),
    signal.SIGINT: ("stop", {"now": True}),
    signal.SIGQUIT: ("stop", {"now": True}),
    signal.SIGHUP: ("reload", {}),
    signal.SIGTTIN: ("scale_all", {"delta": 1}),
    signal.SIGTTOU: ("scale_all", {"delta": -1}),
    signal.SIGUSR2: ("upgrade", {}),
    signal.SIGUSR1: ("reopen_logs", {}),
}


def _delta(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in (-1, 1):
        return value
    raise ValueError("1 or -1")


# Every command: what `baton ctl` may send (control.COMMANDS), plus those only a signal sends.
SPECS = {**control.COMMANDS, "scale_all": {"delta": (_delta, control.REQUIRED)}, "reopen_logs": {}}


class Commands:
    """Runs checked commands against a master (see `supervisor.master.process`)."""

    def __init__(self, master):
        self.master = master

    def run(self, name: str, args: dict) -> dict:
        spec = SPECS.get(name)
        if spec is None:
            return control.error(f"unknown command {name!r}")
        try:
            checked = control.check_arguments(name, spec, args)
        except control.ControlError as exc:
            return control.error(*exc.errors)
        return getattr(self, "_" + name)(**checked)

    def _status(self) -> dict:
        return self.master.status()

    def _stats(self) -> dict:
        return self.master.stats()

    def _reload(self) -> dict:
        return self.master.reload(restart_all=True)

    def _restart(self, app: str) -> dict:
        if app not in self.master.core.apps:
            return control.error(f"no app named {app!r}")
        self.master.restart_app(app)
        return {"ok": True}

    def _scale(self, app: str, workers: int) -> dict:
        if app not in self.master.core.apps:
            return control.error(f"no app named {app!r}")
        self.master.scale(app, workers)
        return {"ok": True}

    def _scale_all(self, delta: int) -> dict:
        self.master.scale_all(delta)
        return {"ok": True}

    def _stop(self, now: bool) -> dict:
        self.master.stop(now=now)
        return {"ok": True}

    def _promote(self, app: str, tag: str) -> dict:
        """Route an app's attached workers of `tag`; the others stand by (blue/green)."""
        try:
            lines = self.master.attached.promote(app, tag)
        except ValueError as exc:
            return control.error(str(exc))
        return {"ok": True, "message": "; ".join(lines) or f"tag {tag!r} of app {app} is live already"}

    def _upgrade(self) -> dict:
        return self.master.upgrade()

    def _reopen_logs(self) -> dict:
        self.master.reopen_logs()
        return {"ok": True}
