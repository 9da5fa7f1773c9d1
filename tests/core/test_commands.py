"""The master's commands: arguments are checked before a command runs, and a bug inside
one reaches the log with its traceback instead of being passed off as a bad argument."""
from __future__ import annotations

import logging
import signal

import pytest

from supervisor.config.reader import from_mapping
from supervisor.master import commands
from supervisor.master.process import Master
from supervisor.system import log as log_mod


@pytest.fixture
def master(tmp_path):
    config = from_mapping({"listeners": {"web": {"bind": "127.0.0.1:0"}},
                           "apps": {"web": {"module": "app:app", "listeners": ["web"]}}},
                          str(tmp_path / "baton.toml"), running_as_root=False, base_dir=str(tmp_path))
    logs = log_mod.setup("info")
    master = Master(config, logs)
    yield master
    master.loop.close()
    logs.close()


@pytest.mark.parametrize("name, args, error", [
    ("scale", {"app": "web", "workers": "3"},
     "scale: 'workers': expected an integer from 1 to 1024, found string '3'"),
    ("scale", {"app": "web"}, "scale: expected 'workers', found nothing (it is required)"),
    ("stop", {"now": True, "later": 1}, "stop: unknown argument 'later' (it takes 'now')"),
    ("scale_all", {"delta": 5}, "scale_all: 'delta': expected 1 or -1, found number 5"),
    ("restart", {}, "restart: expected 'app', found nothing (it is required)"),
    ("frobnicate", {}, "unknown command 'frobnicate'"),
])
def test_bad_arguments_are_an_answer_and_nothing_runs(master, name, args, error, monkeypatch):
    ran = []
    for attribute in ("scale", "scale_all", "stop", "restart_app"):
        monkeypatch.setattr(master, attribute, lambda *a, **k: ran.append(a))
    assert master.command(name, args) == {"ok": False, "errors": [error]}
    assert ran == []


def test_an_internal_error_in_a_command_propagates_with_its_type(master, monkeypatch):
    """The old master caught every TypeError around a command, so a bug deep inside
    reload() came back as a "bad argument" answer and never reached the log."""
    def broken(restart_all=False):
        raise TypeError("a bug deep inside reload")
    monkeypatch.setattr(master, "reload", broken)
    with pytest.raises(TypeError, match="a bug deep inside reload"):
        master.command("reload", {})


def test_a_signal_whose_command_fails_logs_the_traceback_and_the_master_lives(master, monkeypatch, caplog):
    def broken(restart_all=False):
        raise TypeError("a bug deep inside reload")
    monkeypatch.setattr(master, "reload", broken)
    with caplog.at_level(logging.ERROR, logger=master.log.name):
        master._on_signal(signal.SIGHUP)
    record = next(r for r in caplog.records if "internal error handling SIGHUP" in r.getMessage())
    assert record.exc_info and "a bug deep inside reload" in str(record.exc_info[1])


def test_every_signal_names_a_command_with_valid_arguments(master):
    for signum, (name, args) in commands.SIGNALS.items():
        spec = commands.SPECS[name]
        assert commands.control.check_arguments(name, spec, args) is not None, signal.Signals(signum).name
