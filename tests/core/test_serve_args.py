"""`baton serve`'s command line: every flag to its setting, gunicorn's flags Baton lacks
to one line each, and the three sources (-c FILE, $BATON_CMD_ARGS, flags) in order.

Each case runs the real parser and the real config reader (`cli.serve_config`); only
the master is not started (tests/process/test_cli.py starts it)."""
from __future__ import annotations

import os
import tempfile

import pytest

from supervisor import cli
from supervisor.cli import serve as serve_mod
from supervisor.config.model import ConfigError


@pytest.fixture
def where(tmp_path):
    """A working directory, and a control socket path in it (no /run/baton needed)."""
    return tmp_path, ["--control-socket", str(tmp_path / "serve.ctl")]


def config_of(where, *argv, environ=None):
    cwd, control = where
    return cli.serve_config([*argv, *control], environ or {}, str(cwd))


def test_module_alone_means_its_application_callable(where):
    assert config_of(where, "myproject.wsgi").apps["app"].module == "myproject.wsgi:application"
    assert config_of(where, "myproject.wsgi:app").apps["app"].module == "myproject.wsgi:app"
    assert config_of(where, "myproject:create()").apps["app"].module == "myproject:create()"


# (flags, where the setting lands: "app.", "master." or "listener." + field, expected value)
FLAG_CASES = [
    (["-w", "3"], "app.workers", 3),
    (["--workers", "3"], "app.workers", 3),
    (["--threads", "4"], "app.threads", 4),
    (["--timeout", "12"], "app.timeout", 12.0),
    (["-t", "0"], "app.timeout", 0.0),
    (["--graceful-timeout", "7"], "master.graceful_timeout", 7.0),
    (["--keep-alive", "2"], "app.keepalive", 2.0),
    (["--max-requests", "100"], "app.max_requests", 100),
    (["--max-requests-jitter", "10"], "app.max_requests_jitter", 10),
    (["-e", "A=1", "--env", "B=x=y", "-e", "A=2"], "app.env", {"A": "2", "B": "x=y"}),
    (["-e", "EMPTY="], "app.env", {"EMPTY": ""}),
    (["--pid", "run/baton.pid"], "master.pidfile", "{cwd}/run/baton.pid"),
    (["-p", "/tmp/b.pid"], "master.pidfile", "/tmp/b.pid"),
    (["--access-logfile", "-"], "master.access_log", "-"),
    (["--access-log", "acc.log"], "master.access_log", "{cwd}/acc.log"),
    (["--access-logformat", "%(h)s %(s)s"], "master.access_log_format", "%(h)s %(s)s"),
    (["--error-logfile", "err.log"], "master.error_log", "{cwd}/err.log"),
    (["--log-file", "-"], "master.error_log", "-"),
    (["--log-level", "debug"], "master.log_level", "debug"),
    (["--forwarded-allow-ips", "10.0.0.1, 10.0.0.2"], "app.forwarded_allow_ips", ("10.0.0.1", "10.0.0.2")),
    (["--proxy-protocol"], "listener.proxy_protocol", True),
    (["--proxy-protocol", "--no-proxy-protocol"], "listener.proxy_protocol", False),
    (["--proxy-allow-from", "10.0.0.0/8,::1"], "listener.proxy_allow_ips", ("10.0.0.0/8", "::1")),
    (["--mode", "share"], "listener.mode", "share"),
    (["--mode", "reuseport"], "listener.mode", "reuseport"),
    (["--backlog", "64"], "listener.backlog", 64),
    (["-u", "nobody"], "app.user", "nobody"),
    (["-g", "nogroup"], "app.group", "nogroup"),
    (["-m", "027"], "app.umask", 0o027),
    (["--chdir", "."], "app.chdir", "{cwd}"),
    (["--pythonpath", "lib,vendor"], "app.pythonpath", ("{cwd}/lib", "{cwd}/vendor")),
    (["--limit-request-line", "1000"], "app.limit_request_line", 1000),
    (["--limit-request-fields", "20"], "app.limit_request_fields", 20),
    (["--limit-request-field_size", "2000"], "app.limit_request_field_size", 2000),
    (["--reload"], "app.reload_on", ("{cwd}/**/*.py",)),
    (["--reload", "--reload-extra-file", "conf.ini"], "app.reload_on", ("{cwd}/**/*.py", "{cwd}/conf.ini")),
    ([], "app.workers", 1),
    ([], "app.chdir", "{cwd}"),
    ([], "app.reload_on", ()),
]


def setting(config, place: str):
    section, field = place.split(".")
    target = {"app": config.apps["app"], "master": config.master,
              "listener": next(iter(config.listeners.values()))}[section]
    value = getattr(target, field)
    return dict(value) if field == "env" else value


def expand(value, cwd):
    if isinstance(value, str):
        return value.format(cwd=cwd)
    if isinstance(value, tuple):
        return tuple(expand(item, cwd) for item in value)
    return value


@pytest.mark.parametrize("flags, place, expected", FLAG_CASES, ids=[" ".join(c[0]) or "defaults" for c in FLAG_CASES])
def test_each_flag_reaches_its_setting(where, flags, place, expected):
    config = config_of(where, "tests.apps.probe", *flags)
    assert setting(config, place) == expand(expected, where[0])


# (bind flags, the listeners' addresses)
BIND_CASES = [
    ([], ["127.0.0.1:8000"]),
    (["-b", "127.0.0.1:9000"], ["127.0.0.1:9000"]),
    (["-b", "[::]:9000"], ["[::]:9000"]),
    (["-b", ":9000"], ["0.0.0.0:9000"]),
    (["-b", "0.0.0.0"], ["0.0.0.0:8000"]),
    (["-b", "tcp://127.0.0.1:9000"], ["127.0.0.1:9000"]),
    (["-b", "[::1]"], ["[::1]:8000"]),
    (["-b", "unix:/tmp/app.sock"], ["unix:/tmp/app.sock"]),
    (["-b", "fd://3"], ["fd://3"]),
    (["-b", "127.0.0.1:9000", "--bind", "unix:/tmp/app.sock"], ["127.0.0.1:9000", "unix:/tmp/app.sock"]),
]


@pytest.mark.parametrize("flags, addresses", BIND_CASES, ids=[" ".join(c[0]) or "default" for c in BIND_CASES])
def test_bind_forms(where, flags, addresses):
    config = config_of(where, "tests.apps.probe", *flags)
    assert [str(listener.bind) for listener in config.listeners.values()] == addresses
    assert config.apps["app"].listeners == tuple(config.listeners)


def test_every_bind_gets_the_listener_flags(where):
    config = config_of(where, "m", "-b", ":9001", "-b", ":9002", "--mode", "share", "--proxy-protocol")
    assert [(listener.mode, listener.proxy_protocol) for listener in config.listeners.values()] == [
        ("share", True), ("share", True)]


# (gunicorn flags, the start of what follows "baton serve: ")
GUNICORN_CASES = [
    (["--worker-class", "gevent"], "--worker-class (gunicorn): Baton has one worker kind"),
    (["--worker-class=gevent"], "--worker-class (gunicorn): Baton has one worker kind"),
    (["-k", "gevent"], "-k (gunicorn): Baton has one worker kind: a process with threads; use --threads"),
    (["-kgevent"], "-k (gunicorn): Baton has one worker kind"),
    (["--worker-connections", "1000"], "--worker-connections (gunicorn): no equivalent"),
    (["--ssl-version", "TLSv1_2"], "--ssl-version (gunicorn): no equivalent: Baton's TLS takes --certfile"),
    (["--ciphers", "DEFAULT"], "--ciphers (gunicorn): no equivalent: Baton's TLS takes --certfile"),
    (["--daemon"], "--daemon (gunicorn): Baton stays in the foreground: run it under systemd"),
    (["-D"], "-D (gunicorn): Baton stays in the foreground"),
    (["--statsd-host", "localhost:8125"], "--statsd-host (gunicorn): no StatsD"),
    (["--capture-output"], "--capture-output (gunicorn): not needed"),
    (["--paste", "dev.ini"], "--paste (gunicorn): no PasteDeploy"),
    (["--reuse-port"], "--reuse-port (gunicorn): use --mode reuseport"),
    (["--log-syslog"], "--log-syslog (gunicorn): no syslog"),
    (["--no-such-flag"], "unknown flag --no-such-flag; `baton serve --help` lists them"),
]


@pytest.mark.parametrize("flags, message", GUNICORN_CASES, ids=[c[0][0] for c in GUNICORN_CASES])
def test_gunicorn_flags_baton_lacks_get_one_line_and_exit_2(flags, message, capsys):
    assert cli.main(["serve", "tests.apps.probe", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"baton serve: {message}")
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1


def test_gunicorn_flags_in_baton_cmd_args_are_named_so(where):
    with pytest.raises(serve_mod.UsageError, match=r"^BATON_CMD_ARGS: --daemon \(gunicorn\): Baton stays"):
        config_of(where, "m", environ={"BATON_CMD_ARGS": "--daemon"})


def test_preload_sets_the_apps_preload(where):
    assert config_of(where, "m", "--preload").apps["app"].preload is True
    assert config_of(where, "m").apps["app"].preload is False


# (flags, the one problem line)
BAD_CASES = [
    (["-w", "0"], "baton serve: -w/--workers: expected an integer from 1 to 1024, found integer 0"),
    (["-b", "127.0.0.1:99999"], "baton serve: -b/--bind: expected a port from 0 to 65535, found 99999"),
    (["--chdir", "/nonexistent-dir"], "baton serve: --chdir: expected an existing directory, "
                                      "found '/nonexistent-dir' (does not exist)"),
    (["--keep-alive", "-1"], "baton serve: --keep-alive: expected a number of seconds from 0 to 86400, "
                             "found float -1.0"),
]


@pytest.mark.parametrize("flags, line", BAD_CASES, ids=[c[0][0] for c in BAD_CASES])
def test_a_bad_value_names_its_flag(where, flags, line, capsys):
    _, control = where
    assert cli.main(["serve", "m", *flags, *control]) == 1
    assert capsys.readouterr().err == line + "\n"


def test_env_needs_key_equals_value(where):
    with pytest.raises(serve_mod.UsageError, match=r"-e/--env: expected KEY=VALUE, found 'NOEQUALS'"):
        config_of(where, "m", "-e", "NOEQUALS")


def test_no_module_is_a_usage_error(where):
    with pytest.raises(serve_mod.UsageError, match="expected the app, MODULE"):
        config_of(where)


# -- the sources: -c FILE < $BATON_CMD_ARGS < the command line --------------------------


def test_file_then_env_then_flags(where):
    cwd, _ = where
    path = cwd / "serve.toml"
    path.write_text('[serve]\nmodule = "tests.apps.probe"\nworkers = 2\nthreads = 3\ntimeout = 9\n'
                    'bind = "127.0.0.1:9100"\nenv = { A = "file", B = "file" }\nreload = true\n')
    config = config_of(where, "-c", str(path))
    app = config.apps["app"]
    assert (app.module, app.workers, app.threads, app.timeout) == ("tests.apps.probe:application", 2, 3, 9.0)
    assert dict(app.env) == {"A": "file", "B": "file"} and app.reload_on
    assert [str(listener.bind) for listener in config.listeners.values()] == ["127.0.0.1:9100"]

    environ = {"BATON_CMD_ARGS": "--threads 4 -e B=env --bind '127.0.0.1:9200' --no-reload"}
    config = config_of(where, "-c", str(path), "-w", "5", "-e", "A=flag", environ=environ)
    app = config.apps["app"]
    assert (app.workers, app.threads, app.timeout, dict(app.env)) == (5, 4, 9.0, {"A": "flag", "B": "env"})
    assert app.reload_on == ()
    assert [str(listener.bind) for listener in config.listeners.values()] == ["127.0.0.1:9200"]

    config = config_of(where, "-c", str(path), "--bind", ":9300", "tests.apps.probe:app", environ=environ)
    assert [str(listener.bind) for listener in config.listeners.values()] == ["0.0.0.0:9300"]
    assert config.apps["app"].module == "tests.apps.probe:app"


def test_the_file_may_come_from_baton_cmd_args(where):
    cwd, _ = where
    path = cwd / "serve.toml"
    path.write_text("[serve]\nworkers = 2\n")
    assert config_of(where, "m", environ={"BATON_CMD_ARGS": f"-c {path}"}).apps["app"].workers == 2


def test_file_problems_name_the_file_and_key(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nworkers = "2"\nwokers = 2\nbind = [1]\n[other]\n')
    with pytest.raises(ConfigError) as info:
        serve_mod.read_file(str(path))
    assert info.value.problems == [
        f"{path}: serve.bind: expected a string or an array of strings, found array [1]",
        f"{path}: serve.workers: expected an integer, found string '2'",
        f"{path}: serve.wokers: unknown key; did you mean 'workers'?",
        f"{path}: other: unknown key",
    ]


def test_a_run_config_given_to_serve_says_so(tmp_path):
    path = tmp_path / "baton.toml"
    path.write_text('[apps.x]\nmodule = "x"\n')
    with pytest.raises(ConfigError, match=r"this is a `baton run` config"):
        serve_mod.read_file(str(path))


def test_a_gunicorn_conf_py_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ConfigError, match=r"gunicorn.conf.py is Python; Baton reads TOML"):
        serve_mod.read_file(str(tmp_path / "gunicorn.conf.py"))


# -- the control socket ---------------------------------------------------------------------


@pytest.mark.parametrize("bind, name", [
    ("127.0.0.1:8000", "serve-8000.ctl"), ("[::1]:9000", "serve-9000.ctl"), ("localhost", "serve-8000.ctl"),
    ("unix:/run/my app.sock", "serve-my_app.sock.ctl"), ("fd://3", "serve-fd3.ctl"),
])
def test_control_socket_names(bind, name):
    assert serve_mod.control_socket_name(bind, "/") == name


@pytest.mark.parametrize("euid, environ, directories", [
    (0, {}, ["/run/baton"]),
    (0, {"XDG_RUNTIME_DIR": "/run/user/0"}, ["/run/user/0/baton", "/run/baton"]),
    (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, ["/run/user/1000/baton", f"{tempfile.gettempdir()}/baton-1000"]),
    (1000, {}, [f"{tempfile.gettempdir()}/baton-1000"]),
])
def test_control_socket_dirs(euid, environ, directories):
    assert serve_mod.control_socket_dirs(euid, environ) == directories


def test_the_default_control_socket_is_set(where):
    cwd, _ = where
    config = cli.serve_config(["m", "-b", "127.0.0.1:8123"], {}, str(cwd))
    assert config.master.control_socket == os.path.join(serve_mod.control_socket_dir(), "serve-8123.ctl")
