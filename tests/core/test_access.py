"""The words of `worker.access`: the fix it proposes, the lines it writes (issue #13 item 5)."""
from __future__ import annotations

import os

import pytest

from supervisor.config.model import AppConfig, Config, MasterConfig
from supervisor.worker import access
from supervisor.worker.access import Denied, Need, Who

RX, R, X = os.R_OK | os.X_OK, os.R_OK, os.X_OK


@pytest.mark.parametrize("path, mode, blocked, expected", [
    # Reachable but unreadable: only the path itself.
    ("/srv/site", RX, None, "chmod o+rx /srv/site"),
    ("/srv/site/app.py", R, None, "chmod o+r /srv/site/app.py"),
    ("/opt/py/bin/python", X, None, "chmod o+x /opt/py/bin/python"),
    # Stopped on the way: every directory from there down is entered, the path read.
    ("/root/project", RX, "/root", "chmod o+x /root && chmod o+rx /root/project"),
    ("/root/a/b/app.py", R, "/root", "chmod o+x /root /root/a /root/a/b && chmod o+r /root/a/b/app.py"),
    ("/home/u/venv/bin/python", X, "/home/u", "chmod o+x /home/u /home/u/venv /home/u/venv/bin && "
                                             "chmod o+x /home/u/venv/bin/python"),
])
def test_fix(path, mode, blocked, expected):
    assert access.fix(Denied(Need(path, "x", "user", mode), blocked)) == expected


def test_fix_follows_the_symlink_that_is_blocked():
    # A venv's python linking into a Python installed under root's home.
    need = Need("/srv/venv/bin/python", "the Python interpreter", "user", X)
    item = Denied(need, "/root", "/root/.pyenv/bin/python3.11")
    assert access.fix(item) == "chmod o+x /root /root/.pyenv /root/.pyenv/bin && chmod o+x /root/.pyenv/bin/python3.11"


CHDIR = Denied(Need("/root/project", "the app's chdir", "chdir", RX), "/root")
NOBODY = Who("nobody", 65534, user_set=False)
WWW = Who("www-data", 33, user_set=True)


@pytest.mark.parametrize("item, who, source, expected", [
    (CHDIR, NOBODY, "/etc/baton.toml",
     "worker runs as nobody (uid 65534), which cannot read /root/project (the app's chdir; it cannot enter "
     "/root): set `user = ...` in [apps.blog] of /etc/baton.toml (it names no user: a root master runs it as "
     "nobody), or make the path readable (chmod o+x /root && chmod o+rx /root/project)"),
    (Denied(Need("/srv/app.py", "the file of module app", "module", R), None), WWW, None,
     "worker runs as www-data (uid 33), which cannot read /srv/app.py (the file of module app): set "
     "`user = ...` in [apps.blog], or make the path readable (chmod o+r /srv/app.py)"),
    (Denied(Need("/v/bin/python", "the Python interpreter", "user", X), None), WWW, "/b.toml",
     "worker runs as www-data (uid 33), which cannot run /v/bin/python (the Python interpreter): set "
     "`user = ...` in [apps.blog] of /b.toml, or make the path readable (chmod o+x /v/bin/python)"),
])
def test_explain(item, who, source, expected):
    assert access.explain(item, who, "blog", source) == expected


@pytest.mark.parametrize("item, who, expected", [
    (CHDIR, NOBODY,
     "/etc/baton.toml: apps.blog.chdir: nobody (uid 65534) cannot read /root/project, the app's chdir: it "
     "cannot enter /root; the app names no user, so as root its workers run as nobody: set apps.blog.user to "
     "a user that can, or chmod o+x /root && chmod o+rx /root/project"),
    (Denied(Need("/lib", "a pythonpath entry", "pythonpath", RX), None), WWW,
     "/etc/baton.toml: apps.blog.pythonpath: www-data (uid 33) cannot read /lib, a pythonpath entry: set "
     "apps.blog.user to a user that can, or chmod o+rx /lib"),
])
def test_problem(item, who, expected):
    assert access.problem(item, who, "blog", "/etc/baton.toml") == expected


@pytest.mark.parametrize("user, name, root, expected", [
    (None, "nobody", True, "app 'blog' names no user; its workers run as nobody (the master is root; "
                           "set user = ... in [apps.blog])"),
    ("www-data", "www-data", True, "app 'blog' runs as www-data (its user)"),
    (None, "alice", False, "app 'blog' runs as alice (the master's user: only root can switch)"),
])
def test_user_line(user, name, root, expected):
    app = AppConfig("blog", "blog:app", ("web",), user=user)
    assert access.user_line(app, name, root) == expected


def test_app_source_is_the_included_file_that_defines_the_app(tmp_path):
    main, included = tmp_path / "baton.toml", tmp_path / "blog.toml"
    main.write_text("[apps.shop]\n")
    included.write_text("[apps.blog]\nmodule = 'blog:app'\n")
    apps = {name: AppConfig(name, f"{name}:app", ("web",)) for name in ("blog", "shop")}
    config = Config(str(main), MasterConfig(), {}, apps, sources=(str(main), str(included)))
    assert access.app_source(config, "blog") == str(included)
    assert access.app_source(config, "shop") == str(main)
    assert access.app_source(Config(None, MasterConfig(), {}, apps), "blog") is None


def test_app_needs_find_the_module_without_importing_it(tmp_path):
    package = tmp_path / "blogpkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise SystemExit('imported')\n")
    (package / "wsgi.py").write_text("raise SystemExit('imported')\n")
    app = AppConfig("blog", "blogpkg.wsgi:app", ("web",), chdir=str(tmp_path))
    needs = access.app_needs(app, [])
    assert [(n.path, n.key) for n in needs] == [
        (str(tmp_path), "chdir"),
        (str(package / "__init__.py"), "module"),
        (str(package), "module"),
        (str(package / "wsgi.py"), "module"),
    ]
