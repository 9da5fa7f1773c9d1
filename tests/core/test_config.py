"""Config loading: every problem names the file, the dotted key, what was expected and
what was found; a valid file becomes frozen dataclasses with absolute paths."""
from __future__ import annotations

import grp
import os
import pwd
from types import MappingProxyType

import pytest

from supervisor.config.model import (
    COMMAND_LINE,
    AppConfig,
    ConfigError,
    auto_balancers,
    control_socket_path,
    effective_user,
)
from supervisor.config.reader import BindAddress, from_mapping, load, parse, parse_bind


def document(*, master: str = "", listener: str = "", app: str = "", extra: str = "") -> str:
    """A valid config, with lines added to its [master], [listeners.web] and [apps.blog]
    tables and more tables after them."""
    return f"""\
[master]
{master}

[listeners.web]
bind = "127.0.0.1:8000"
{listener}

[apps.blog]
module = "blog.wsgi:app"
listeners = ["web"]
{app}

{extra}
"""


def write(tmp_path, text: str, name: str = "baton.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path, text: str, *, running_as_root: bool = False) -> tuple[str, list[str]]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, running_as_root=running_as_root)
    return str(path), info.value.problems


def other_user() -> pwd.struct_passwd:
    return next(entry for entry in pwd.getpwall() if entry.pw_uid != os.geteuid())


def other_group() -> grp.struct_group:
    return next(entry for entry in grp.getgrall() if entry.gr_gid != os.getegid())


# -- one wrong value, one problem ---------------------------------------------

ONE_PROBLEM = [
    # (id, document, dotted key, fragments the problem must contain)
    ("graceful_timeout negative", document(master="graceful_timeout = -1"),
     "master.graceful_timeout", ["expected a number of seconds from 0 to 86400", "found integer -1"]),
    ("graceful_timeout string", document(master='graceful_timeout = "30s"'),
     "master.graceful_timeout", ["expected a number of seconds from 0 to 86400", "found string '30s'"]),
    ("graceful_timeout inf", document(master="graceful_timeout = inf"),
     "master.graceful_timeout", ["expected a number of seconds from 0 to 86400", "found float inf"]),
    ("boot_timeout zero", document(master="boot_timeout = 0"),
     "master.boot_timeout", ["expected a number of seconds > 0 and at most 86400", "found integer 0"]),
    ("log_level", document(master='log_level = "loud"'),
     "master.log_level", ["expected one of 'debug', 'info', 'warning', 'error' or 'critical'", "found string 'loud'"]),
    ("access_log integer", document(master="access_log = 3"),
     "master.access_log", ['expected a file path or "-"', "found integer 3"]),
    ("pidfile dash", document(master='pidfile = "-"'),
     "master.pidfile", ["expected a file path", "found string '-'"]),
    ("balancers zero", document(master="balancers = 0"),
     "master.balancers", ['expected an integer from 1 to 64 or "auto"', "found integer 0"]),
    ("balancers past the bound", document(master="balancers = 65"),
     "master.balancers", ['expected an integer from 1 to 64 or "auto"', "found integer 65"]),
    ("balancers word", document(master='balancers = "many"'),
     "master.balancers", ['expected an integer from 1 to 64 or "auto"', "found string 'many'"]),
    ("balancers boolean", document(master="balancers = true"),
     "master.balancers", ['expected an integer from 1 to 64 or "auto"']),
    ("master not a table", document(extra="").replace("[master]\n", "master = 1\n"),
     "master", ["expected a table", "found integer 1"]),

    ("mode reuseport on unix", document(listener='mode = "reuseport"').replace('"127.0.0.1:8000"', '"unix:web.sock"'),
     "listeners.web.mode", ["mode 'reuseport' needs a HOST:PORT bind"]),
    ("mode unknown", document(listener='mode = "fast"'),
     "listeners.web.mode", ["expected one of 'balance', 'share' or 'reuseport'", "found string 'fast'"]),
    ("balance unknown", document(app='balance = "fastest"'),
     "apps.blog.balance", ["expected one of 'least-connections'", "found string 'fastest'"]),
    ("hosts not strings", document(app="hosts = [1]"),
     "apps.blog.hosts[0]", ["found integer 1"]),
    ("hosts entry with a port", document(app='hosts = ["blog.test", "blog.test:80"]'),
     "apps.blog.hosts[1]", ["expected a host name, an IP address or '*.' and a domain, without a port",
                            "found string 'blog.test:80'"]),
    ("default not bool", document(app='default = "yes"'),
     "apps.blog.default", ["expected true or false"]),
    ("crash_backoff_max zero", document(master="crash_backoff_max = 0"),
     "master.crash_backoff_max", ["found integer 0"]),
    ("shared listener without hosts", document(extra='[apps.shop]\nmodule = "shop:app"\nlisteners = ["web"]\nhosts = ["shop.test"]'),
     "apps.blog.hosts", ["expected host names (or default = true)"]),
    ("shared listener in share mode", document(listener='mode = "share"', app='hosts = ["blog.test"]',
                                               extra='[apps.shop]\nmodule = "shop:app"\nlisteners = ["web"]\nhosts = ["shop.test"]'),
     "listeners.web.mode", ["expected mode 'balance' to route them by host", "found 'share'"]),
    ("two apps claim one host", document(app='hosts = ["same.test"]',
                                         extra='[apps.shop]\nmodule = "shop:app"\nlisteners = ["web"]\nhosts = ["SAME.test"]'),
     "listeners.web", ["apps sharing this listener conflict"]),
    ("backlog zero", document(listener="backlog = 0"),
     "listeners.web.backlog", ["expected an integer from 1 to 65535", "found integer 0"]),
    ("backlog bool", document(listener="backlog = true"),
     "listeners.web.backlog", ["expected an integer from 1 to 65535", "found boolean true"]),
    ("proxy_protocol string", document(listener='proxy_protocol = "yes"'),
     "listeners.web.proxy_protocol", ["expected true or false", "found string 'yes'"]),
    ("bind missing", document(extra="[listeners.api]\nbacklog = 5"),
     "listeners.api.bind", ["expected a bind address", "found nothing (the key is required)"]),
    ("bind not a string", document(extra="[listeners.api]\nbind = 8000"),
     "listeners.api.bind", ["expected a bind address", "found integer 8000"]),
    ("bind unparsable", document(extra='[listeners.api]\nbind = "8000"'),
     "listeners.api.bind", ["expected HOST:PORT", "found '8000'", "did you mean ':8000'?"]),
    ("bind duplicate", document(extra='[listeners.api]\nbind = "127.0.0.1:8000"'),
     "listeners.api.bind", ["'127.0.0.1:8000' is already bound by listeners.web"]),
    ("bind overlaps wildcard", document(extra='[listeners.api]\nbind = "*:8000"'),
     "listeners.api.bind", ["'0.0.0.0:8000' overlaps listeners.web ('127.0.0.1:8000')"]),
    ("listener not a table", document(extra='[listeners]\napi = "x"'),
     "listeners.api", ["expected a table", "found string 'x'"]),
    ("listener name", document(extra='[listeners."my api"]\nbind = ":9000"'),
     'listeners."my api"', ["expected a listener name made of letters, digits", "found 'my api'"]),

    ("module shape", document(extra='[apps.shop]\nmodule = "shop"\nlisteners = ["web"]'),
     "apps.shop.module", ["expected 'pkg.mod:callable' or 'pkg.mod:factory()'", "found string 'shop'"]),
    ("module missing", document(extra='[apps.shop]\nlisteners = ["web"]'),
     "apps.shop.module", ["expected 'pkg.mod:callable'", "found nothing (the key is required)"]),
    ("listeners missing", document(extra='[apps.shop]\nmodule = "shop:app"'),
     "apps.shop.listeners", ["expected a non-empty array of listener names", "found nothing"]),
    ("listeners empty", document(extra='[apps.shop]\nmodule = "shop:app"\nlisteners = []'),
     "apps.shop.listeners", ["expected a non-empty array of listener names", "found an empty array"]),
    ("listeners string", document(extra='[apps.shop]\nmodule = "shop:app"\nlisteners = "web"'),
     "apps.shop.listeners", ["expected a non-empty array of listener names", "found string 'web'"]),
    ("listener undefined", document(extra='[apps.shop]\nmodule = "shop:app"\nlisteners = ["web", "wbe"]'),
     "apps.shop.listeners[1]", ["expected the name of a [listeners.NAME] table", "found string 'wbe'",
                                "did you mean 'web'?"]),
    ("listener twice", document(extra='[apps.shop]\nmodule = "shop:app"\nlisteners = ["web", "web"]'),
     "apps.shop.listeners", ["names a listener twice"]),
    ("app name", document(extra='[apps."my shop"]\nmodule = "shop:app"\nlisteners = ["web"]'),
     'apps."my shop"', ["expected an app name made of letters, digits", "found 'my shop'"]),
    ("app not a table", document(extra='[apps]\nshop = 1'),
     "apps.shop", ["expected a table", "found integer 1"]),
    ("workers bool", document(app="workers = true"),
     "apps.blog.workers", ["expected an integer from 1 to 1024", "found boolean true"]),
    ("workers zero", document(app="workers = 0"),
     "apps.blog.workers", ["expected an integer from 1 to 1024", "found integer 0"]),
    ("threads float", document(app="threads = 1.5"),
     "apps.blog.threads", ["expected an integer from 1 to 1024", "found float 1.5"]),
    ("chdir missing", document(app='chdir = "nowhere"'),
     "apps.blog.chdir", ["expected an existing directory", "nowhere' (does not exist)"]),
    ("chdir a file", document(app='chdir = "baton.toml"'),
     "apps.blog.chdir", ["expected an existing directory", "baton.toml' (not a directory)"]),
    ("pythonpath string", document(app='pythonpath = "src"'),
     "apps.blog.pythonpath", ["expected an array of strings", "found string 'src'"]),
    ("pythonpath element", document(app='pythonpath = ["src", ""]'),
     "apps.blog.pythonpath[1]", ["expected a non-empty string", "found an empty string"]),
    ("env not a table", document(app='env = ["A=1"]'),
     "apps.blog.env", ["expected a table", "found array ['A=1']"]),
    ("env value", document(app="env = { PORT = 8000 }"),
     "apps.blog.env.PORT", ["expected a string", "found integer 8000"]),
    ("env name", document(app='env = { "A=B" = "x" }'),
     'apps.blog.env."A=B"', ["expected an environment variable name without '='", "found 'A=B'"]),
    ("umask string", document(app='umask = "999"'),
     "apps.blog.umask", ['expected an octal string like "022"', "found string '999'"]),
    ("umask too big", document(app="umask = 0o1000"),
     "apps.blog.umask", ["an integer from 0 to 0o777", "found integer 512"]),
    ("keepalive negative", document(app="keepalive = -1"),
     "apps.blog.keepalive", ["expected a number of seconds from 0 to 86400", "found integer -1"]),
    ("graceful_timeout string", document(app='graceful_timeout = "5"'),
     "apps.blog.graceful_timeout", ["expected a number of seconds from 0 to 86400", "found string '5'"]),
    ("limit_request_line small", document(app="limit_request_line = 10"),
     "apps.blog.limit_request_line", ["expected an integer from 64 to 65535", "found integer 10"]),
    ("limit_request_fields zero", document(app="limit_request_fields = 0"),
     "apps.blog.limit_request_fields", ["expected an integer from 1 to 32768", "found integer 0"]),
    ("limit_request_field_size small", document(app="limit_request_field_size = 63"),
     "apps.blog.limit_request_field_size", ["expected an integer from 64 to 65535", "found integer 63"]),
    ("max_body_size negative", document(app="max_body_size = -1"),
     "apps.blog.max_body_size", ["expected an integer from 0 to 1099511627776", "found integer -1"]),
    ("header_timeout zero", document(app="header_timeout = 0.0"),
     "apps.blog.header_timeout", ["expected a number of seconds > 0 and at most 86400", "found float 0.0"]),
    ("forwarded_allow_ips name", document(app='forwarded_allow_ips = ["127.0.0.1", "localhost"]'),
     "apps.blog.forwarded_allow_ips[1]", ["expected an IP address, a network in CIDR form", "found string 'localhost'"]),
    ("forwarded_allow_ips host bits", document(app='forwarded_allow_ips = ["10.0.0.1/8"]'),
     "apps.blog.forwarded_allow_ips[0]", ["expected an IP address, a network in CIDR form", "found string '10.0.0.1/8'"]),
    ("forwarded_header unknown", document(app='forwarded_header = "X-Real-IP"'),
     "apps.blog.forwarded_header", ["expected 'X-Forwarded-For' or 'Forwarded'", "found string 'X-Real-IP'"]),
    ("secure_scheme_headers name", document(app='secure_scheme_headers = { "X_Proto" = "https" }'),
     "apps.blog.secure_scheme_headers.X_Proto", ["expected a header name"]),
    ("secure_scheme_headers value", document(app='secure_scheme_headers = { "X-Proto" = 1 }'),
     "apps.blog.secure_scheme_headers.X-Proto", ["expected the header's value meaning https", "found integer 1"]),
    ("proxy_allow_ips host bits", document(listener='proxy_protocol = true\nproxy_allow_ips = ["10.0.0.1/8"]'),
     "listeners.web.proxy_allow_ips[0]", ["expected an IP address, a network in CIDR form", "found string '10.0.0.1/8'"]),
    ("proxy_allow_ips name", document(listener='proxy_allow_ips = ["127.0.0.1", "lb.internal"]'),
     "listeners.web.proxy_allow_ips[1]", ["expected an IP address, a network in CIDR form", "found string 'lb.internal'"]),
    ("proxy_allow_ips prefix", document(listener='proxy_allow_ips = ["::/129"]'),
     "listeners.web.proxy_allow_ips[0]", ["expected an IP address", "found string '::/129'"]),
    ("proxy_allow_ips not a list", document(listener='proxy_allow_ips = "10.0.0.0/8"'),
     "listeners.web.proxy_allow_ips", ["expected an array of strings"]),
    ("user bool", document(app="user = true"),
     "apps.blog.user", ["expected a user name or numeric id", "found boolean true"]),
    ("group negative", document(app="group = -1"),
     "apps.blog.group", ["expected a group name or numeric id", "found integer -1"]),
    ("isolate unknown name", document(app='isolate = ["network", "pid"]'),
     "apps.blog.isolate[1]", ["expected one of 'network' (the namespaces isolate may name)", "found string 'pid'"]),
    ("isolate misspelt", document(app='isolate = ["net"]'),
     "apps.blog.isolate[0]", ["expected one of 'network'", "found string 'net'; did you mean 'network'?"]),
    ("isolate twice", document(app='isolate = ["network", "network"]'),
     "apps.blog.isolate", ["names 'network' twice"]),
    ("isolate not an array", document(app='isolate = "network"'),
     "apps.blog.isolate", ["expected an array of strings", "found string 'network'"]),
    ("isolate not a string", document(app="isolate = [true]"),
     "apps.blog.isolate[0]", ["expected a non-empty string", "found boolean true"]),

    ("unknown master key", document(master="graceful_timout = 5"),
     "master.graceful_timout", ["unknown key; did you mean 'graceful_timeout'?"]),
    ("unknown listener key", document(listener="backlg = 5"),
     "listeners.web.backlg", ["unknown key; did you mean 'backlog'?"]),
    ("unknown app key", document(app="wrkers = 4"),
     "apps.blog.wrkers", ["unknown key; did you mean 'workers'?"]),
    ("unknown app key, listener's", document(app='bind = ":80"'),
     "apps.blog.bind", ["unknown key; it belongs in a [listeners.NAME] table"]),
    ("unknown top-level table", document(extra='[app.shop]\nmodule = "shop:app"'),
     "app", ["unknown key; did you mean 'apps'?"]),
    ("top-level key of master", "graceful_timeout = 5\n" + document(),
     "graceful_timeout", ["unknown key; it belongs in [master]"]),
    ("top-level key of apps", "workers = 5\n" + document(),
     "workers", ["unknown key; it belongs in an [apps.NAME] table"]),
    ("unknown key, nothing close", document(app="zzz = 1"),
     "apps.blog.zzz", ["unknown key"]),
    ("no apps", document().split("[apps.blog]")[0],
     "apps", ["define at least one [apps.NAME] table"]),
]


@pytest.mark.parametrize("text, key, fragments", [case[1:] for case in ONE_PROBLEM],
                         ids=[case[0] for case in ONE_PROBLEM])
def test_one_problem_names_file_key_expectation(tmp_path, text, key, fragments):
    path, found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {key}: "), found[0]
    for fragment in fragments:
        assert fragment in found[0]


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    _, found = problems(tmp_path, document(app="zzz = 1"))
    assert found[0].endswith("apps.blog.zzz: unknown key")


def test_several_problems_reported_at_once_in_reading_order(tmp_path):
    text = document(master="boot_timeout = -1", listener='mode = "fast"',
                    app="workers = 0\nthreads = true",
                    extra='[apps.shop]\nmodule = "shop"\nlisteners = ["gone"]')
    path, found = problems(tmp_path, text)
    keys = [line[len(path) + 2:].split(":")[0] for line in found]
    assert keys == ["master.boot_timeout", "listeners.web.mode", "apps.blog.workers", "apps.blog.threads",
                    "apps.shop.module", "apps.shop.listeners[0]"]
    assert all(line.startswith(f"{path}: ") for line in found)


def test_config_error_message_joins_problems(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, document(app="workers = 0\nthreads = 0")), running_as_root=False)
    assert str(info.value) == "\n".join(info.value.problems)
    assert len(info.value.problems) == 2


# -- file-level problems --------------------------------------------------------

@pytest.mark.parametrize("text, line, column", [
    ('[master]\nlog_level = \n', 2, 13),
    ('[apps.blog]\nmodule = "a:b"\nmodule = "c:d"\n', 3, 15),
    ('[listeners.web\nbind = ":80"\n', 1, 15),
])
def test_toml_syntax_error_names_file_line_and_column(tmp_path, text, line, column):
    path, found = problems(tmp_path, text)
    assert len(found) == 1
    assert found[0].startswith(f"{path}:{line}:{column}: invalid TOML: "), found[0]


def test_missing_file_is_one_clear_problem(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [f"{path}: cannot read the config file: No such file or directory"]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [f"{path}: expected UTF-8 text, found byte 0xe9 at offset 5"]


def test_parse_names_the_given_path():
    with pytest.raises(ConfigError) as info:
        parse(document(app="workers = 0"), "/srv/site/baton.toml", running_as_root=False)
    assert info.value.problems[0].startswith("/srv/site/baton.toml: apps.blog.workers: ")


def test_reference_to_listener_when_none_is_defined(tmp_path):
    text = '[apps.blog]\nmodule = "blog:app"\nlisteners = ["web"]\n'
    path, found = problems(tmp_path, text)
    assert found == [f"{path}: apps.blog.listeners[0]: expected the name of a [listeners.NAME] table, "
                     "found string 'web'; no [listeners.NAME] table is defined"]


def test_listener_with_a_bad_bind_is_still_defined_for_apps(tmp_path):
    path, found = problems(tmp_path, document(extra='[listeners.api]\nbind = "nope"\n'
                                                    '[apps.shop]\nmodule = "shop:app"\nlisteners = ["api"]'))
    assert len(found) == 1 and found[0].startswith(f"{path}: listeners.api.bind: ")


# -- users and groups -----------------------------------------------------------

@pytest.mark.parametrize("running_as_root", [True, False])
@pytest.mark.parametrize("key", ["user", "group"])
def test_nonexistent_user_or_group(tmp_path, running_as_root, key):
    path, found = problems(tmp_path, document(app=f'{key} = "no-such-{key}-here"'), running_as_root=running_as_root)
    assert found == [f"{path}: apps.blog.{key}: expected an existing {key}, found 'no-such-{key}-here', "
                     "which this system does not know"]


def test_non_root_cannot_name_another_user(tmp_path):
    other = other_user()
    path, found = problems(tmp_path, document(app=f'user = "{other.pw_name}"'), running_as_root=False)
    assert len(found) == 1
    assert found[0].startswith(f"{path}: apps.blog.user: expected the master's own user (uid {os.geteuid()}), "
                               f"found '{other.pw_name}' (uid {other.pw_uid})")
    assert "the master must run as root" in found[0]


def test_non_root_cannot_name_another_group(tmp_path):
    other = other_group()
    path, found = problems(tmp_path, document(app=f'group = "{other.gr_name}"'), running_as_root=False)
    assert len(found) == 1
    assert found[0].startswith(f"{path}: apps.blog.group: expected the master's own group")
    assert "the master must run as root" in found[0]


def test_non_root_may_name_itself_by_name_or_id(tmp_path):
    me = pwd.getpwuid(os.geteuid())
    mine = grp.getgrgid(os.getegid())
    config = load(write(tmp_path, document(
        app=f'user = "{me.pw_name}"\ngroup = {mine.gr_gid}')), running_as_root=False)
    assert (config.apps["blog"].user, config.apps["blog"].group) == (me.pw_name, str(mine.gr_gid))


def test_root_may_name_any_existing_user_and_group(tmp_path):
    other, group = other_user(), other_group()
    config = load(write(tmp_path, document(app=f'user = "{other.pw_uid}"\ngroup = "{group.gr_name}"')),
                  running_as_root=True)
    assert (config.apps["blog"].user, config.apps["blog"].group) == (str(other.pw_uid), group.gr_name)


@pytest.mark.parametrize("line, running_as_root, expected", [
    ("", True, ()),
    ("isolate = []", False, ()),
    ('isolate = ["network"]', True, ("network",)),
])
def test_isolate_names_namespaces(tmp_path, line, running_as_root, expected):
    config = load(write(tmp_path, document(app=line)), running_as_root=running_as_root)
    assert config.apps["blog"].isolate == expected


def test_non_root_cannot_isolate(tmp_path):
    path, found = problems(tmp_path, document(app='isolate = ["network"]'), running_as_root=False)
    assert found == [f"{path}: apps.blog.isolate: expected a master running as root: only root (with "
                     "CAP_SYS_ADMIN) can create the namespaces isolate names; run the master as root, "
                     "or remove isolate"]


def test_nonexistent_balancer_user(tmp_path):
    # Accepted, the master died at the next balancer (re)start: privileges.resolve raised in it.
    for running_as_root in (True, False):
        path, found = problems(tmp_path, document(master='balancer_user = "no-such-user-here"'),
                               running_as_root=running_as_root)
        assert found == [(f"{path}: master.balancer_user: expected an existing user, found 'no-such-user-here', "
                          "which this system does not know")]


def test_non_root_cannot_name_another_balancer_user(tmp_path):
    other = other_user()
    path, found = problems(tmp_path, document(master=f'balancer_user = "{other.pw_name}"'), running_as_root=False)
    assert len(found) == 1
    assert found[0].startswith(f"{path}: master.balancer_user: expected the master's own user "
                               f"(uid {os.geteuid()}), found '{other.pw_name}' (uid {other.pw_uid})")


def test_balancer_user_may_be_any_existing_user_under_root_and_itself_otherwise(tmp_path):
    other, me = other_user(), pwd.getpwuid(os.geteuid())
    config = load(write(tmp_path, document(master=f"balancer_user = {other.pw_uid}")), running_as_root=True)
    assert config.master.balancer_user == str(other.pw_uid)
    config = load(write(tmp_path, document(master=f'balancer_user = "{me.pw_name}"')), running_as_root=False)
    assert config.master.balancer_user == me.pw_name


def test_effective_user():
    app = AppConfig("blog", "blog:app", ("web",))
    assert effective_user(app, running_as_root=True) == "nobody"
    assert effective_user(app, running_as_root=False) is None
    named = AppConfig("blog", "blog:app", ("web",), user="www-data")
    assert effective_user(named, running_as_root=True) == "www-data"
    assert effective_user(named, running_as_root=False) == "www-data"


# -- upper bounds ------------------------------------------------------------------
# A value past its bound passed `baton check` and then failed deep in the master: a
# timeout over ~24.8 days overflows epoll's int of milliseconds (OverflowError in the
# loop's wait); `workers = 100000` forks without end.

BOUNDS = [
    # (table, key, the largest value accepted, what a larger one is told it should be)
    ("master", "graceful_timeout", 86400, "a number of seconds from 0 to 86400"),
    ("master", "boot_timeout", 86400, "a number of seconds > 0 and at most 86400"),
    ("master", "crash_backoff_max", 86400, "a number of seconds > 0 and at most 86400"),
    ("app", "keepalive", 86400, "a number of seconds from 0 to 86400"),
    ("app", "graceful_timeout", 86400, "a number of seconds from 0 to 86400"),
    ("app", "header_timeout", 86400, "a number of seconds > 0 and at most 86400"),
    ("app", "timeout", 86400, "a number of seconds from 0 to 86400"),
    ("app", "workers", 1024, "an integer from 1 to 1024"),
    ("app", "threads", 1024, "an integer from 1 to 1024"),
    ("app", "max_requests", 1_000_000_000, "an integer from 0 to 1000000000"),
    ("app", "max_requests_jitter", 1_000_000_000, "an integer from 0 to 1000000000"),
    ("app", "max_rss", 1 << 20, "an integer from 0 to 1048576"),
    ("app", "max_body_size", 1 << 40, "an integer from 0 to 1099511627776"),
    ("app", "buffer_body", 64 << 20, "an integer from 0 to 67108864"),
    ("app", "limit_request_line", 65535, "an integer from 64 to 65535"),
    ("app", "limit_request_fields", 32768, "an integer from 1 to 32768"),
    ("app", "limit_request_field_size", 65535, "an integer from 64 to 65535"),
    ("listener", "backlog", 65535, "an integer from 1 to 65535"),
]
_SECTION = {"master": "master", "app": "apps.blog", "listener": "listeners.web"}


def _bounded(table, key, value):
    return document(**{table: f"{key} = {value}"})


@pytest.mark.parametrize("table, key, bound, expected", BOUNDS, ids=[f"{b[0]}.{b[1]}" for b in BOUNDS])
def test_a_value_at_its_bound_is_accepted(tmp_path, table, key, bound, expected):
    config = load(write(tmp_path, _bounded(table, key, bound)), running_as_root=False)
    section = {"master": config.master, "app": config.apps["blog"], "listener": config.listeners["web"]}[table]
    assert getattr(section, key) == bound


@pytest.mark.parametrize("table, key, bound, expected", BOUNDS, ids=[f"{b[0]}.{b[1]}" for b in BOUNDS])
def test_a_value_over_its_bound_names_file_key_and_bound(tmp_path, table, key, bound, expected):
    path, found = problems(tmp_path, _bounded(table, key, bound + 1))
    assert found == [f"{path}: {_SECTION[table]}.{key}: expected {expected}, found integer {bound + 1}"]


@pytest.mark.parametrize("table, key, bound, expected", [b for b in BOUNDS if "seconds" in b[3]],
                         ids=[f"{b[0]}.{b[1]}" for b in BOUNDS if "seconds" in b[3]])
def test_a_timeout_epoll_cannot_wait_is_refused(tmp_path, table, key, bound, expected):
    path, found = problems(tmp_path, _bounded(table, key, 2147483.648))   # INT_MAX milliseconds, and more
    assert found == [f"{path}: {_SECTION[table]}.{key}: expected {expected}, found float 2147483.648"]


def test_serve_arguments_are_bounded_too(tmp_path):
    data = {"listeners": {"bind0": {"bind": "unix:web.sock"}},
            "apps": {"app": {"module": "hello:app", "listeners": ["bind0"], "workers": 100000, "threads": 5000}}}
    with pytest.raises(ConfigError) as info:
        from_mapping(data, None, running_as_root=False, base_dir=str(tmp_path))
    assert info.value.problems == [
        f"{COMMAND_LINE}: apps.app.workers: expected an integer from 1 to 1024, found integer 100000",
        f"{COMMAND_LINE}: apps.app.threads: expected an integer from 1 to 1024, found integer 5000"]


# -- valid configs ----------------------------------------------------------------

def test_minimal_config_gets_the_defaults(tmp_path):
    path = write(tmp_path, document())
    config = load(path, running_as_root=False)
    assert config.path == str(path)
    master = config.master
    assert (master.graceful_timeout, master.boot_timeout, master.log_level) == (30.0, 30.0, "info")
    assert (master.access_log, master.error_log, master.pidfile) == (None, None, None)
    web = config.listeners["web"]
    assert (web.name, web.bind, web.mode, web.backlog, web.proxy_protocol) == (
        "web", BindAddress("tcp", host="127.0.0.1", port=8000), "balance", 2048, False)
    assert config.apps["blog"] == AppConfig("blog", "blog.wsgi:app", ("web",))
    blog = config.apps["blog"]
    assert (blog.workers, blog.threads, blog.keepalive, blog.header_timeout) == (1, 1, 5.0, 10.0)
    assert (blog.limit_request_line, blog.limit_request_fields, blog.limit_request_field_size) == (8190, 100, 8190)
    assert blog.forwarded_allow_ips == ("127.0.0.1", "::1")
    assert (blog.graceful_timeout, blog.umask, blog.chdir) == (None, None, None)
    assert (blog.max_body_size, blog.buffer_body) == (100 << 20, 65536)


def test_full_config_round_trip(tmp_path):
    (tmp_path / "site").mkdir()
    me = pwd.getpwuid(os.geteuid()).pw_name
    text = f"""\
[master]
graceful_timeout = 12
boot_timeout = 2.5
log_level = "DEBUG"
access_log = "-"
error_log = "logs/error.log"
pidfile = "/run/baton.pid"

[listeners.web]
bind = "[::]:8080"
backlog = 128
proxy_protocol = true

[listeners.local]
bind = "unix:run/web.sock"
mode = "share"

[listeners.inherited]
bind = "fd://3"

[apps.blog]
module = "blog.wsgi:create_app()"
listeners = ["web", "local"]
workers = 4
threads = 8
user = "{me}"
chdir = "site"
pythonpath = ["src", "/opt/lib"]
env = {{ DJANGO_SETTINGS_MODULE = "blog.settings", EMPTY = "" }}
umask = "027"
keepalive = 2
graceful_timeout = 7.5
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 1024
max_body_size = 1_000_000
header_timeout = 3
forwarded_allow_ips = ["10.0.0.1", "::ffff:10.0.0.2", "0:0::1", "10.1.0.0/16", "*"]
forwarded_header = "Forwarded"
secure_scheme_headers = {{ "X-Scheme" = "https" }}

[apps."shop.v2"]
module = "shop:app"
listeners = ["inherited"]
umask = 0o022
"""
    path = write(tmp_path, text)
    config = load(path, running_as_root=False)
    here = str(tmp_path)
    assert config.master.graceful_timeout == 12.0 and isinstance(config.master.graceful_timeout, float)
    assert (config.master.boot_timeout, config.master.log_level) == (2.5, "debug")
    assert config.master.access_log == "-"
    assert config.master.error_log == f"{here}/logs/error.log"
    assert config.master.pidfile == "/run/baton.pid"

    assert list(config.listeners) == ["web", "local", "inherited"]
    assert isinstance(config.listeners, MappingProxyType)
    assert config.listeners["web"].bind == BindAddress("tcp", host="::", port=8080)
    assert (config.listeners["web"].backlog, config.listeners["web"].proxy_protocol) == (128, True)
    assert config.listeners["local"].bind == BindAddress("unix", path=f"{here}/run/web.sock")
    assert config.listeners["inherited"].bind == BindAddress("fd", fd=3)

    assert list(config.apps) == ["blog", "shop.v2"]
    assert isinstance(config.apps, MappingProxyType)
    blog = config.apps["blog"]
    assert blog.module == "blog.wsgi:create_app()"
    assert blog.listeners == ("web", "local")
    assert (blog.workers, blog.threads, blog.user, blog.group) == (4, 8, me, None)
    assert blog.chdir == f"{here}/site"
    assert blog.pythonpath == (f"{here}/site/src", "/opt/lib")
    assert isinstance(blog.env, MappingProxyType)
    assert dict(blog.env) == {"DJANGO_SETTINGS_MODULE": "blog.settings", "EMPTY": ""}
    assert blog.umask == 0o027
    assert (blog.keepalive, blog.graceful_timeout, blog.header_timeout) == (2.0, 7.5, 3.0)
    assert (blog.limit_request_line, blog.limit_request_fields, blog.limit_request_field_size) == (4094, 50, 1024)
    assert blog.max_body_size == 1_000_000
    assert blog.forwarded_allow_ips == ("10.0.0.1", "::ffff:a00:2", "::1", "10.1.0.0/16", "*")
    assert (blog.forwarded_header, dict(blog.secure_scheme_headers)) == ("forwarded", {"X-Scheme": "https"})
    assert config.apps["shop.v2"].umask == 0o022
    assert config.apps["shop.v2"].pythonpath == ()


def test_pythonpath_without_chdir_resolves_against_config_dir(tmp_path):
    config = load(write(tmp_path, document(app='pythonpath = ["src", "../lib"]')), running_as_root=False)
    assert config.apps["blog"].pythonpath == (str(tmp_path / "src"), str(tmp_path.parent / "lib"))


@pytest.mark.parametrize("first, second", [
    ("[::]:8000", "0.0.0.0:8000"),          # IPv6 listeners are V6ONLY
    ("127.0.0.1:0", "127.0.0.1:0"),         # two kernel-chosen ports
    ("127.0.0.1:8000", "127.0.0.2:8000"),
    ("unix:a.sock", "unix:b.sock"),
    ("fd://3", "fd://4"),
    ("systemd:web", "systemd:api"),
    ("systemd:web", "unix:web"),
])
def test_binds_that_can_coexist(tmp_path, first, second):
    text = document().replace('"127.0.0.1:8000"', f'"{first}"') + f'[listeners.api]\nbind = "{second}"\n'
    load(write(tmp_path, text), running_as_root=False)


@pytest.mark.parametrize("first, second", [
    ("unix:run/a.sock", "unix:" + "run/../run/a.sock"),
    ("fd://3", "fd://3"),
    ("systemd:web", "systemd:web"),
    ("[::]:8000", "[::1]:8000"),
    ("[::1]:8000", "[0::1]:8000"),
])
def test_binds_that_clash(tmp_path, first, second):
    text = document().replace('"127.0.0.1:8000"', f'"{first}"') + f'[listeners.api]\nbind = "{second}"\n'
    path, found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith(f"{path}: listeners.api.bind: "), found


def test_systemd_bind_names_an_inherited_socket(tmp_path):
    text = document().replace('"127.0.0.1:8000"', '"systemd:web"')
    listener = load(write(tmp_path, text), running_as_root=False).listeners["web"]
    assert listener.bind == BindAddress("systemd", fdname="web")
    assert (listener.bind.path, str(listener.bind)) == (None, "systemd:web")  # nothing to unlink at close


@pytest.mark.parametrize("line, problem", [
    ("backlog = 128", "listeners.web.backlog: a 'systemd:NAME' socket is listening already: "
                      "set Backlog= in its .socket unit instead"),
    ('mode = "reuseport"', "listeners.web.mode: mode 'reuseport' needs a HOST:PORT bind, found 'systemd:web'"),
])
def test_systemd_bind_refuses_what_only_binding_ourselves_can_do(tmp_path, line, problem):
    text = document(listener=line).replace('"127.0.0.1:8000"', '"systemd:web"')
    path, found = problems(tmp_path, text)
    assert found == [f"{path}: {problem}"]


def test_from_mapping_names_the_command_line(tmp_path):
    data = {"listeners": {"bind0": {"bind": "unix:web.sock"}},
            "apps": {"app": {"module": "hello:app", "listeners": ["bind0"], "workers": 0}}}
    with pytest.raises(ConfigError) as info:
        from_mapping(data, None, running_as_root=False, base_dir=str(tmp_path))
    assert info.value.problems == [f"{COMMAND_LINE}: apps.app.workers: expected an integer from 1 to 1024, found integer 0"]
    data["apps"]["app"]["workers"] = 2
    config = from_mapping(data, None, running_as_root=False, base_dir=str(tmp_path))
    assert config.path is None
    assert config.listeners["bind0"].bind.path == str(tmp_path / "web.sock")


# -- bind specs ---------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("127.0.0.1:8000", BindAddress("tcp", host="127.0.0.1", port=8000)),
    ("localhost:80", BindAddress("tcp", host="localhost", port=80)),
    ("web-1.example.com.:443", BindAddress("tcp", host="web-1.example.com.", port=443)),
    ("LocalHost:80", BindAddress("tcp", host="LocalHost", port=80)),       # as written: the resolver decides
    ("compose_web:8000", BindAddress("tcp", host="compose_web", port=8000)),  # as in [apps.X] hosts
    (":8000", BindAddress("tcp", host="0.0.0.0", port=8000)),
    ("*:8000", BindAddress("tcp", host="0.0.0.0", port=8000)),
    ("0.0.0.0:0", BindAddress("tcp", host="0.0.0.0", port=0)),
    ("1.2.3.4:65535", BindAddress("tcp", host="1.2.3.4", port=65535)),
    ("[::]:8080", BindAddress("tcp", host="::", port=8080)),
    ("[::1]:8080", BindAddress("tcp", host="::1", port=8080)),
    ("[2001:DB8:0::1]:80", BindAddress("tcp", host="2001:db8::1", port=80)),
    ("[fe80::1%eth0]:80", BindAddress("tcp", host="fe80::1%eth0", port=80)),
    ("unix:/run/baton.sock", BindAddress("unix", path="/run/baton.sock")),
    ("unix:run/baton.sock", BindAddress("unix", path="/etc/baton/run/baton.sock")),
    ("unix:../baton.sock", BindAddress("unix", path="/etc/baton.sock")),
    ("fd://0", BindAddress("fd", fd=0)),
    ("fd://12", BindAddress("fd", fd=12)),
    ("systemd:web", BindAddress("systemd", fdname="web")),
    ("systemd:baton.socket", BindAddress("systemd", fdname="baton.socket")),  # systemd's default name
    ("systemd:a b/c", BindAddress("systemd", fdname="a b/c")),
    ("systemd:" + "n" * 255, BindAddress("systemd", fdname="n" * 255)),
])
def test_parse_bind(spec, expected):
    assert parse_bind(spec, "/etc/baton") == expected


@pytest.mark.parametrize("spec, reason", [
    ("8000", "expected HOST:PORT, [IPV6]:PORT, :PORT, unix:PATH, fd://N or systemd:NAME, found '8000'; "
             "did you mean ':8000'?"),
    ("localhost", "expected HOST:PORT, [IPV6]:PORT, :PORT, unix:PATH, fd://N or systemd:NAME, found 'localhost'"),
    ("", "expected HOST:PORT"),
    ("127.0.0.1:", "expected a port number after the last ':', found ''"),
    ("127.0.0.1:http", "expected a port number after the last ':', found 'http'"),
    ("127.0.0.1:-1", "expected a port number after the last ':', found '-1'"),
    ("127.0.0.1:65536", "expected a port from 0 to 65535, found 65536"),
    ("::1:8000", "expected an IPv6 address in brackets, as in '[::1]:8000'"),
    ("[::1:8000", "expected an IPv6 address in brackets"),
    ("[1.2.3.4]:80", "expected an IPv6 address between the brackets, found '1.2.3.4'"),
    ("[nope]:80", "expected an IPv6 address between the brackets, found 'nope'"),
    ("256.1.1.1:80", "expected an IPv4 address, found '256.1.1.1'"),
    ("bad_host!:80", "expected a host name or IP address before ':80', found 'bad_host!'"),
    ("0x7f.0.0.1:80", "expected a host name or IP address before ':80', found '0x7f.0.0.1'"),  # not a guess
    ("a.123:80", "expected a host name or IP address before ':80', found 'a.123'"),
    ("unix:", "expected a socket path after 'unix:', found ''"),
    ("unix:/" + "x" * 120, "expected a unix socket path of at most 107 bytes"),
    ("fd://", "expected a file descriptor number >= 0 after 'fd://', found ''"),
    ("fd://-1", "expected a file descriptor number >= 0 after 'fd://', found '-1'"),
    ("fd://three", "found 'three'"),
    ("systemd:", "expected a socket name after 'systemd:' (the socket unit's FileDescriptorName=: "
                 "1 to 255 printable ASCII characters, no ':'), found ''"),
    ("systemd:a:b", "found 'a:b'"),
    ("systemd:tab\there", "found 'tab\\there'"),
    ("systemd:caf\u00e9", "found 'café'"),
    ("systemd:" + "n" * 256, "1 to 255 printable ASCII characters"),
])
def test_parse_bind_rejects(spec, reason):
    with pytest.raises(ValueError) as info:
        parse_bind(spec, "/etc/baton")
    assert reason in str(info.value)


def test_bind_address_round_trips_through_str():
    for spec in ("127.0.0.1:80", "[::1]:80", "unix:/run/a.sock", "fd://3", "localhost:8000", "systemd:web"):
        assert str(parse_bind(spec, "/")) == spec


# -- include and reload_on ----------------------------------------------------------

def test_include_adds_listeners_and_apps_sorted_and_lists_sources(tmp_path):
    (tmp_path / "apps.d").mkdir()
    write(tmp_path, '[apps.shop]\nmodule = "shop:app"\nlisteners = ["api"]\n', "apps.d/b.toml")
    write(tmp_path, '[listeners.api]\nbind = "unix:api.sock"\n', "apps.d/a.toml")
    write(tmp_path, '[apps.ignored]\nmodule = "x:app"\nlisteners = ["web"]\n', "apps.d/c.txt")
    path = write(tmp_path, document(master='include = ["apps.d/*.toml"]'))
    config = load(path, running_as_root=False)
    assert list(config.listeners) == ["web", "api"]
    assert list(config.apps) == ["blog", "shop"]
    # Relative paths in an included file resolve against the main config's directory.
    assert config.listeners["api"].bind.path == str(tmp_path / "api.sock")
    assert config.master.include == (str(tmp_path / "apps.d/*.toml"),)
    assert config.sources == (str(path), str(tmp_path / "apps.d/a.toml"), str(tmp_path / "apps.d/b.toml"))


def test_include_matching_nothing_is_fine(tmp_path):
    path = write(tmp_path, document(master='include = ["apps.d/*.toml", "nothing/**/*.toml"]'))
    config = load(path, running_as_root=False)
    assert config.sources == (str(path),)
    assert list(config.apps) == ["blog"]


def test_include_never_reads_the_main_file_twice(tmp_path):
    path = write(tmp_path, document(master='include = ["*.toml", "baton.toml"]'))
    assert load(path, running_as_root=False).sources == (str(path),)


def test_sources_without_include(tmp_path):
    path = write(tmp_path, document())
    assert load(path, running_as_root=False).sources == (str(path),)


def test_an_included_file_may_hold_every_app(tmp_path):
    write(tmp_path, '[apps.blog]\nmodule = "blog:app"\nlisteners = ["web"]\n', "blog.toml")
    text = '[master]\ninclude = ["blog.toml"]\n[listeners.web]\nbind = "127.0.0.1:8000"\n'
    config = load(write(tmp_path, text), running_as_root=False)
    assert list(config.apps) == ["blog"]


@pytest.mark.parametrize("key, table", [
    ("apps.blog", '[apps.blog]\nmodule = "other:app"\nlisteners = ["web"]\n'),
    ("listeners.web", '[listeners.web]\nbind = "127.0.0.1:9000"\n'),
])
def test_a_name_defined_in_two_files_names_both(tmp_path, key, table):
    extra = write(tmp_path, table, "more.toml")
    path = write(tmp_path, document(master='include = ["more.toml"]'))
    with pytest.raises(ConfigError) as info:
        load(path, running_as_root=False)
    assert info.value.problems == [f"{extra}: {key}: already defined in {path}"]


def test_a_name_defined_in_two_included_files(tmp_path):
    app = '[apps.shop]\nmodule = "shop:app"\nlisteners = ["web"]\n'
    first, second = write(tmp_path, app, "a.toml"), write(tmp_path, app, "b.toml")
    path = write(tmp_path, document(master='include = ["?.toml"]'))
    with pytest.raises(ConfigError) as info:
        load(path, running_as_root=False)
    assert info.value.problems == [f"{second}: apps.shop: already defined in {first}"]


def test_master_in_an_included_file_is_refused(tmp_path):
    extra = write(tmp_path, "[master]\ngraceful_timeout = 1\n", "more.toml")
    path = write(tmp_path, document(master='include = ["more.toml"]'))
    with pytest.raises(ConfigError) as info:
        load(path, running_as_root=False)
    [problem] = info.value.problems
    assert problem.startswith(f"{extra}: master: expected only [listeners.NAME] and [apps.NAME] tables")
    assert problem.endswith(f"it belongs in {path}")


def test_syntax_error_in_an_included_file_names_it(tmp_path):
    extra = write(tmp_path, "[apps.shop\n", "more.toml")
    path = write(tmp_path, document(master='include = ["more.toml"]'))
    with pytest.raises(ConfigError) as info:
        load(path, running_as_root=False)
    [problem] = info.value.problems
    assert problem.startswith(f"{extra}:1:")
    assert "invalid TOML" in problem


def test_problems_in_an_included_file_name_it_and_come_after_the_main_file(tmp_path):
    extra = write(tmp_path, '[apps.shop]\nmodule = "shop:app"\nlisteners = ["gone"]\nworkers = 0\nzzz = 1\n'
                            'graceful_timeout_s = 3\n', "more.toml")
    path = write(tmp_path, document(master='include = ["more.toml"]', app="threads = 0"))
    with pytest.raises(ConfigError) as info:
        load(path, running_as_root=False)
    found = info.value.problems
    assert found[0] == f"{path}: apps.blog.threads: expected an integer from 1 to 1024, found integer 0"
    assert [line.split(": ")[:2] for line in found[1:]] == [
        [str(extra), "apps.shop.listeners[0]"], [str(extra), "apps.shop.workers"],
        [str(extra), "apps.shop.zzz"], [str(extra), "apps.shop.graceful_timeout_s"]]


def test_routing_conflict_names_the_file_of_the_app(tmp_path):
    extra = write(tmp_path, '[apps.shop]\nmodule = "shop:app"\nlisteners = ["web"]\n', "more.toml")
    path = write(tmp_path, document(master='include = ["more.toml"]', app='hosts = ["blog.example"]'))
    with pytest.raises(ConfigError) as info:
        load(path, running_as_root=False)
    assert [line.split(": ")[:2] for line in info.value.problems] == [[str(extra), "apps.shop.hosts"]]


def test_an_app_may_use_a_listener_of_another_file(tmp_path):
    write(tmp_path, '[apps.shop]\nmodule = "shop:app"\nlisteners = ["api"]\n', "a.toml")
    write(tmp_path, '[listeners.api]\nbind = "127.0.0.1:9000"\n', "b.toml")
    config = load(write(tmp_path, document(master='include = ["a.toml", "b.toml"]')), running_as_root=False)
    assert config.apps["shop"].listeners == ("api",)


@pytest.mark.parametrize("value, problem", [
    ('"apps.d/*.toml"', "master.include: expected an array of strings, found string 'apps.d/*.toml'"),
    ("[1]", "master.include[0]: expected a non-empty string, found integer 1"),
])
def test_include_must_be_an_array_of_strings(tmp_path, value, problem):
    path, found = problems(tmp_path, document(master=f"include = {value}"))
    assert found == [f"{path}: {problem}"]


def test_reload_on_resolves_against_chdir_or_the_config_dir(tmp_path):
    (tmp_path / "site").mkdir()
    text = document(app='reload_on = ["src/**/*.py", "/etc/blog/*.ini"]',
                    extra='[apps.shop]\nmodule = "shop:app"\nlisteners = ["api"]\nchdir = "site"\n'
                          'reload_on = ["*.py"]\n[listeners.api]\nbind = "127.0.0.1:9000"\n')
    config = load(write(tmp_path, text), running_as_root=False)
    assert config.apps["blog"].reload_on == (str(tmp_path / "src/**/*.py"), "/etc/blog/*.ini")
    assert config.apps["shop"].reload_on == (str(tmp_path / "site/*.py"),)


@pytest.mark.parametrize("value, problem", [
    ('"src/*.py"', "apps.blog.reload_on: expected an array of strings, found string 'src/*.py'"),
    ('["src/*.py", 3]', "apps.blog.reload_on[1]: expected a non-empty string, found integer 3"),
    ('[""]', "apps.blog.reload_on[0]: expected a non-empty string, found an empty string"),
])
def test_reload_on_must_be_an_array_of_strings(tmp_path, value, problem):
    path, found = problems(tmp_path, document(app=f"reload_on = {value}"))
    assert found == [f"{path}: {problem}"]


# -- the control socket: [master] control_socket and admins ---------------------

def test_control_socket_defaults_beside_the_config_file(tmp_path):
    config = load(write(tmp_path, document(), name="site.toml"), running_as_root=False)
    assert (config.master.control_socket, config.master.admins) == (None, ())
    assert control_socket_path(config) == f"{tmp_path}/site.ctl"


def test_control_socket_resolves_against_the_config_dir(tmp_path):
    config = load(write(tmp_path, document(master='control_socket = "run/baton.ctl"')), running_as_root=False)
    assert config.master.control_socket == f"{tmp_path}/run/baton.ctl"
    assert control_socket_path(config) == f"{tmp_path}/run/baton.ctl"
    absolute = load(write(tmp_path, document(master='control_socket = "/run/b.ctl"')), running_as_root=False)
    assert control_socket_path(absolute) == "/run/b.ctl"


def test_serve_has_no_control_socket_unless_asked(tmp_path):
    data = {"listeners": {"web": {"bind": "127.0.0.1:8000"}},
            "apps": {"app": {"module": "m:app", "listeners": ["web"]}}}
    assert control_socket_path(from_mapping(data, None, running_as_root=False, base_dir=str(tmp_path))) is None
    data["master"] = {"control_socket": "x.ctl"}
    config = from_mapping(data, None, running_as_root=False, base_dir=str(tmp_path))
    assert control_socket_path(config) == f"{tmp_path}/x.ctl"


def test_admins_names_users_and_groups(tmp_path):
    config = load(write(tmp_path, document(master='admins = ["www-data", "@www-data", "nobody"]')),
                  running_as_root=False)
    assert config.master.admins == ("www-data", "@www-data", "nobody")


@pytest.mark.parametrize("line, key, fragments", [
    ('control_socket = 3', "master.control_socket", ["expected a file path", "found integer 3"]),
    ('control_socket = "-"', "master.control_socket", ["expected a file path", "found string '-'"]),
    (f'control_socket = "/{"x" * 120}.ctl"', "master.control_socket", ["at most 107 bytes"]),
    ('admins = "www-data"', "master.admins", ["expected an array of strings", "found string 'www-data'"]),
    ('admins = [""]', "master.admins[0]", ["expected a non-empty string", "found an empty string"]),
    ('admins = ["no-such-user-x"]', "master.admins[0]",
     ["expected an existing user name, or '@' followed by a group name", "knows no user 'no-such-user-x'"]),
    ('admins = ["nobody", "@no-such-group-x"]', "master.admins[1]",
     ["expected '@' followed by an existing group name", "knows no group 'no-such-group-x'"]),
])
def test_control_keys_refuse(tmp_path, line, key, fragments):
    path, found = problems(tmp_path, document(master=line))
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {key}: "), found
    assert all(fragment in found[0] for fragment in fragments), found


# -- log formats ----------------------------------------------------------------


def test_log_format_and_access_log_format_default_to_text_and_none(tmp_path):
    master = load(write(tmp_path, document()), running_as_root=False).master
    assert (master.log_format, master.access_log_format) == ("text", None)


def test_log_format_json_and_a_custom_access_log_format(tmp_path):
    fmt = '%(h)s "%(r)s" %(s)s %(M)s %({X-Request-Id}i)s %({Content-Type}o)s %({REMOTE_USER}e)s 100%%'
    text = document(master=f'log_format = "JSON"\naccess_log_format = {fmt!r}')
    master = load(write(tmp_path, text), running_as_root=False).master
    assert (master.log_format, master.access_log_format) == ("json", fmt)


@pytest.mark.parametrize("line, key, fragments", [
    ('log_format = "xml"', "master.log_format", ["expected one of 'text' or 'json'", "found string 'xml'"]),
    ('access_log_format = 1', "master.access_log_format",
     ["expected a gunicorn-style format string", "found integer 1"]),
    ('access_log_format = "%(h)s %(x)s"', "master.access_log_format",
     ["expected a gunicorn-style format", "unknown atom %(x)s"]),
    ('access_log_format = "%(h)s %({bad}z)s"', "master.access_log_format", ["unknown atom %({bad}z)s"]),
    ('access_log_format = "%(h)d"', "master.access_log_format", ["%(h)d must end with 's'"]),
    ('access_log_format = "100% %(h)s"', "master.access_log_format", ["starts no atom"]),
])
def test_log_format_keys_refuse(tmp_path, line, key, fragments):
    path, found = problems(tmp_path, document(master=line))
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {key}: "), found
    assert all(fragment in found[0] for fragment in fragments), found


def test_proxy_allow_ips_default_and_forms(tmp_path):
    config = load(write(tmp_path, document(listener="proxy_protocol = true")))
    assert config.listeners["web"].proxy_allow_ips == ("127.0.0.1", "::1")
    text = document(listener='proxy_protocol = true\nproxy_allow_ips = ["10.0.0.0/8", "fd00::/8", "192.0.2.7", "*"]')
    config = load(write(tmp_path, text))
    assert config.listeners["web"].proxy_allow_ips == ("10.0.0.0/8", "fd00::/8", "192.0.2.7", "*")


# -- [master] balancers ---------------------------------------------------------


@pytest.mark.parametrize("cores, balancers", [(1, 1), (3, 1), (4, 1), (7, 1), (8, 2), (16, 4), (64, 16),
                                              (256, 64), (1024, 64)])
def test_auto_balancers_is_one_per_four_cores_within_the_bounds(cores, balancers):
    assert auto_balancers(cores) == balancers


@pytest.mark.parametrize("line, expected", [("", 1), ("balancers = 1", 1), ("balancers = 2", 2),
                                            ("balancers = 64", 64),
                                            ('balancers = "auto"', auto_balancers(os.cpu_count() or 1))])
def test_balancers(tmp_path, line, expected):
    assert load(write(tmp_path, document(master=line))).master.balancers == expected


# -- attach sockets: [apps.NAME] attach and its keys ----------------------------------

ATTACHED = 'attach = "unix:/run/baton/blog.sock"'


def test_attach_keys_default_to_the_apps_user_and_group(tmp_path):
    app = load(write(tmp_path, document(app=ATTACHED)), running_as_root=True).apps["blog"]
    assert (app.attach, app.attach_mode, app.attach_group, app.attach_allow, app.attach_promote) == (
        "/run/baton/blog.sock", 0o660, None, None, 0)
    assert load(write(tmp_path, document()), running_as_root=True).apps["blog"].attach is None


def test_attach_only_needs_no_module_and_may_have_no_workers(tmp_path):
    text = document(app=f'{ATTACHED}\nworkers = 0\nattach_mode = "0600"\nattach_group = "nogroup"\n'
                        'attach_allow = ["nobody", "@nogroup", 33]\nattach_promote = 2')
    app = load(write(tmp_path, text.replace('module = "blog.wsgi:app"\n', "")), running_as_root=True).apps["blog"]
    assert (app.module, app.workers, app.attach_mode, app.attach_group, app.attach_allow, app.attach_promote) == (
        None, 0, 0o600, "nogroup", ("nobody", "@nogroup", 33), 2)


@pytest.mark.parametrize("text, key, fragments", [
    (document(listener='mode = "share"', app=ATTACHED), "apps.blog.attach",
     ["attached workers are reached through the balancer", "expected listener 'web' in mode 'balance'",
      "found 'share'"]),
    (document(app='attach = "127.0.0.1:9"'), "apps.blog.attach",
     ['expected "unix:PATH"', "found string '127.0.0.1:9'"]),
    (document(app="attach = 9"), "apps.blog.attach", ['expected "unix:PATH"', "found integer 9"]),
    (document(app=f'{ATTACHED}\nattach_allow = [""]'), "apps.blog.attach_allow",
     ['expected an array of user names, "@group" names and numeric uids', "found array ['']"]),
    (document(app=f'{ATTACHED}\nattach_allow = ["@"]'), "apps.blog.attach_allow", ["found array ['@']"]),
    (document(app=f"{ATTACHED}\nattach_allow = [-1]"), "apps.blog.attach_allow", ["found array [-1]"]),
    (document(app=f'{ATTACHED}\nattach_allow = "nobody"'), "apps.blog.attach_allow",
     ['expected an array of user names', "found string 'nobody'"]),
    (document(app=f'{ATTACHED}\nattach_mode = "0999"'), "apps.blog.attach_mode",
     ['expected an octal string like "0660"', "found string '0999'"]),
    (document(app=f"{ATTACHED}\nattach_promote = -1"), "apps.blog.attach_promote",
     ["expected an integer from 0 to", "found integer -1"]),
    (document(app='attach_mode = "0600"'), "apps.blog.attach_mode", ['applies with attach = "unix:PATH" only']),
    (document(app='attach_allow = ["nobody"]'), "apps.blog.attach_allow", ['applies with attach = "unix:PATH" only']),
    (document(app="workers = 0"), "apps.blog.workers", ["expected an integer from 1 to", "found integer 0"]),
], ids=["share listener", "tcp address", "not a string", "empty name", "bare @", "negative uid",
        "not an array", "mode", "promote", "mode without attach", "allow without attach",
        "no workers without attach"])
def test_attach_keys_refuse(tmp_path, text, key, fragments):
    path, found = problems(tmp_path, text, running_as_root=True)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {key}: "), found
    assert all(fragment in found[0] for fragment in fragments), found


def test_attached_workers_terminate_no_tls(tmp_path):
    text = document(listener="tls = true", app=f'{ATTACHED}\ncertificate = "/x.pem"\nprivate_key = "/x.key"')
    path, found = problems(tmp_path, text, running_as_root=True)
    assert f"{path}: apps.blog.attach: attached workers terminate no TLS: listener 'web' has tls = true" in found
