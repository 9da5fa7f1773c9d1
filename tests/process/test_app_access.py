"""Issue #13 item 5: running as root without surprises.

As root an app that names no user runs as nobody, which cannot read a project under
a 0700 directory (root's home, pytest's own tmp_path). `baton check` says so, naming
the file, the key and the fix; a master says so when the worker fails to boot, and
its log says at start who each app runs as and why. Real users, real permissions.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, answers, free_port, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

APP = 'def app(environ, start_response):\n    start_response("200 OK", [])\n    return [b"hi"]\n'


def check(config: Path, python: str = sys.executable, env: dict | None = None):
    return subprocess.run([python, "-m", "supervisor", "check", "-c", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)


def project(base: Path, *, private: bool) -> Path:
    """base/home/site/myapp.py, with home 0700 when `private` (like /root)."""
    home = base / "home"
    site = home / "site"
    site.mkdir(parents=True)
    (site / "myapp.py").write_text(APP)
    (site / "myapp.py").chmod(0o644)
    site.chmod(0o755)
    home.chmod(0o700 if private else 0o755)
    return site


def write_config(path: Path, port: int, chdir: Path, extra: str = "") -> Path:
    path.write_text(textwrap.dedent(f"""
        [master]
        boot_timeout = 10

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.site]
        module = "myapp:app"
        listeners = ["web"]
        chdir = "{chdir}"
    """) + extra + "\n")
    return path


def test_check_names_the_path_and_the_user_key_when_the_default_user_cannot_read_the_project(scratch, tmp_path,
                                                                                              port):
    site = project(scratch, private=True)
    config = write_config(tmp_path / "baton.toml", port, site)
    result = check(config)
    assert result.returncode == 1, result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{config}: apps.site.chdir: nobody (uid 65534) cannot read {site}, the app's chdir: "
                           f"it cannot enter {site.parent}; the app names no user")
    assert "set apps.site.user to a user that can" in line
    # The fix it names is enough.
    fix = line.rsplit(", or ", 1)[1]
    assert fix == f"chmod o+x {site.parent} && chmod o+rx {site}"
    for command in fix.split(" && "):
        subprocess.run(command.split(), check=True)
    result = check(config)
    assert result.returncode == 0, result.stderr


def test_check_is_ok_when_the_app_runs_as_root(scratch, tmp_path, port):
    site = project(scratch, private=True)
    config = write_config(tmp_path / "baton.toml", port, site, 'user = "root"')
    result = check(config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config}: ok (1 app, 1 listener)"


def test_check_names_a_module_file_and_a_pythonpath_entry_the_user_cannot_read(scratch, tmp_path, port):
    site = project(scratch, private=False)
    (site / "myapp.py").chmod(0o600)
    libs = scratch / "libs"
    libs.mkdir(mode=0o700)
    # The app in an included file: that is the file its problems name.
    included = tmp_path / "apps.d" / "site.toml"
    included.parent.mkdir()
    included.write_text(textwrap.dedent(f"""
        [apps.site]
        module = "myapp:app"
        listeners = ["web"]
        chdir = "{site}"
        user = "www-data"
        pythonpath = ["{libs}"]
    """))
    main = tmp_path / "baton.toml"
    main.write_text(textwrap.dedent(f"""
        [master]
        include = ["{included.parent}/*.toml"]

        [listeners.web]
        bind = "127.0.0.1:{port}"
    """))
    result = check(main)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.splitlines()
    assert lines == [
        f"{included}: apps.site.pythonpath: www-data (uid 33) cannot read {libs}, a pythonpath entry: "
        f"set apps.site.user to a user that can, or chmod o+rx {libs}",
        f"{included}: apps.site.module: www-data (uid 33) cannot read {site}/myapp.py, the file of module myapp: "
        f"set apps.site.user to a user that can, or chmod o+r {site}/myapp.py",
    ]


def test_check_names_a_hook_module_the_user_cannot_read_by_its_key(scratch, tmp_path, port):
    site = project(scratch, private=False)
    (site / "hookmod.py").write_text("def fork(worker):\n    pass\n")
    (site / "hookmod.py").chmod(0o600)
    config = write_config(tmp_path / "baton.toml", port, site, 'user = "www-data"\npost_fork = "hookmod:fork"')
    result = check(config)
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines() == [
        f"{config}: apps.site.post_fork: www-data (uid 33) cannot read {site}/hookmod.py, the file of module hookmod: "
        f"set apps.site.user to a user that can, or chmod o+r {site}/hookmod.py",
    ]


def test_a_worker_that_cannot_read_its_project_fails_to_boot_saying_who_and_how_to_fix_it(baton, scratch, port):
    site = project(scratch, private=True)
    master = baton(f"""
        [master]
        boot_timeout = 10

        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.site]
        module = "myapp:app"
        listeners = ["web"]
        chdir = "{site}"
    """)
    master.wait_log("app site cannot boot")
    log = master.log()
    assert "PermissionError" in log   # the traceback stays
    assert (f"worker runs as nobody (uid 65534), which cannot read {site} (the app's chdir; it cannot enter "
            f"{site.parent}): set `user = ...` in [apps.site] of {master.config} (it names no user: a root "
            f"master runs it as nobody), or make the path readable (chmod o+x {site.parent} && "
            f"chmod o+rx {site})") in log
    assert ("app 'site' names no user; its workers run as nobody (the master is root; set user = ... in "
            "[apps.site])") in log


def test_the_log_says_who_each_app_runs_as_and_why(baton, scratch, port, tmp_path):
    site = project(scratch, private=False)
    other = free_port()
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"

        [listeners.other]
        bind = "127.0.0.1:{other}"

        [apps.site]
        module = "myapp:app"
        listeners = ["web"]
        chdir = "{site}"
        user = "www-data"

        [apps.plain]
        module = "myapp:app"
        listeners = ["other"]
        chdir = "{site}"
    """)
    master.wait_workers(2)
    log = master.log()
    assert "app 'site' runs as www-data (its user)" in log
    assert "app 'plain' names no user; its workers run as nobody (the master is root; set user = ... in " \
           "[apps.plain])" in log


def test_a_venv_the_user_cannot_read_is_a_clear_boot_failure_and_fails_the_check(scratch, tmp_path, port):
    """The worker execs the master's interpreter as the app's user: from a venv under a
    0700 directory that exec would fail (or Python would die before any Baton code);
    the forked child checks first and says why."""
    private = scratch / "private"
    private.mkdir(mode=0o700)
    venv = private / "venv"
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    site = project(scratch, private=False)
    config = write_config(tmp_path / "baton.toml", port, site)
    python = str(venv / "bin" / "python")
    # Baton's dependencies from our own venv; Baton itself from the repository (cwd).
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    env = dict(os.environ, PYTHONPATH=site_packages, PYTHONUNBUFFERED="1")
    result = check(config, python, env)
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines()[0].startswith(
        f"{config}: apps.site.user: nobody (uid 65534) cannot run {python}, the Python interpreter: "
        f"it cannot enter {private}")
    log_path = tmp_path / "master.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, "-m", "supervisor", "run", "-c", str(config)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "no app could boot" in log_path.read_text(), timeout=30,
                 message=lambda: f"the boot failure; log:\n{log_path.read_text()}")
        text = log_path.read_text()
        assert (f"worker runs as nobody (uid 65534), which cannot run {python} (the Python interpreter; it "
                f"cannot enter {private}): set `user = ...` in [apps.site] of {config}") in text
        assert proc.wait(30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not answers(port)


def test_a_module_file_the_user_cannot_read_is_named_in_the_boot_failure(baton, scratch, port):
    site = project(scratch, private=False)
    (site / "myapp.py").chmod(0o600)
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.site]
        module = "myapp:app"
        listeners = ["web"]
        chdir = "{site}"
        user = "www-data"
    """)
    master.wait_log("app site cannot boot")
    log = master.log()
    assert "app 'site' runs as www-data (its user)" in log
    assert (f"worker runs as www-data (uid 33), which cannot read {site}/myapp.py (the file of module myapp): "
            f"set `user = ...` in [apps.site] of {master.config}, or make the path readable "
            f"(chmod o+r {site}/myapp.py)") in log


def test_a_file_the_app_opens_at_import_is_named_when_the_user_cannot_read_it(baton, scratch, port):
    site = project(scratch, private=False)
    secret = scratch / "secret.key"
    secret.write_text("k")
    secret.chmod(0o600)
    (site / "myapp.py").write_text(f"KEY = open({str(secret)!r}).read()\n" + APP)
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.site]
        module = "myapp:app"
        listeners = ["web"]
        chdir = "{site}"
    """)
    master.wait_log("app site cannot boot")
    assert (f"worker runs as nobody (uid 65534), which cannot read {secret} (a path the app opened): "
            f"set `user = ...` in [apps.site] of {master.config} (it names no user: a root master runs it "
            f"as nobody), or make the path readable (chmod o+r {secret})") in master.log()


def test_a_readonly_sqlite_database_says_who_cannot_write_it(baton, scratch, port):
    import sqlite3
    site = project(scratch, private=False)
    database = site / "db.sqlite3"
    sqlite3.connect(database).close()
    database.chmod(0o644)   # root's: nobody reads it and cannot write it
    (site / "myapp.py").write_text(
        f"import sqlite3\nsqlite3.connect({str(database)!r}).execute('create table t (x)')\n" + APP)
    master = baton(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"

        [apps.site]
        module = "myapp:app"
        listeners = ["web"]
        chdir = "{site}"
    """)
    master.wait_log("app site cannot boot")
    assert "readonly database" in master.log()
    assert (f"worker runs as nobody (uid 65534), which cannot write the database: set `user = ...` in "
            f"[apps.site] of {master.config}, or make the database file and its directory writable by it"
            ) in master.log()
